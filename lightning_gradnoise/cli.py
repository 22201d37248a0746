"""``gradnoise``: plan batch sizes before training and report on a run after it.

    gradnoise nqm     sweep the noisy quadratic model: steps to target against batch size
    gradnoise fit     fit B_noise, S_min, E_min (and eps_max) from a CSV of runs
    gradnoise plan    predicted steps, examples and time per batch size from a measured B_simple
    gradnoise report  read a run's TensorBoard logs, plot B_simple, GR_S, GR_T, GSNR, recommend a batch range

Every subcommand has ``--help``. Plots need matplotlib (``pip install "lightning-gradnoise[plot]"``).
"""

from __future__ import annotations

import argparse
import csv
import glob
import math
import os
import statistics
import sys
from typing import Optional, Sequence

import torch

__all__ = ["main", "read_tensorboard_scalars"]

GRADNOISE_KEYS = ("gradnoise/b_simple", "gradnoise/gr_s", "gradnoise/gr_t", "gradnoise/gsnr", "gradnoise/batch_size")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit('plotting needs matplotlib: pip install "lightning-gradnoise[plot]" (or pip install matplotlib)') from None
    return plt


def _table(rows: list[dict], columns: Sequence[str], fmt: dict[str, str] | None = None) -> str:
    fmt = fmt or {}
    cells = [[format(r[c], fmt.get(c, ".4g")) if isinstance(r[c], float) else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


# -- nqm ------------------------------------------------------------------------------------------
def cmd_nqm(args: argparse.Namespace) -> int:
    from lightning_gradnoise.nqm import NQM
    from lightning_gradnoise.scaling import fit_b_noise

    model = NQM.paper(d=args.d, bins=args.bins)
    batch = torch.logspace(math.log2(args.batch_min), math.log2(args.batch_max), args.num, base=2.0, dtype=torch.float64)
    curves = {}
    for p in args.powers:
        for name, opt in (("sgd", {}), (f"momentum {args.momentum}", {"momentum": args.momentum}), (f"ema {args.ema}", {"ema": args.ema})):
            if (name.startswith("momentum") and not args.momentum) or (name.startswith("ema") and not args.ema):
                continue
            steps, lr = model.best_lr(batch, args.target, precond=p, **opt)
            curves[(p, name)] = (steps, lr)
    rows = []
    for (p, name), (steps, lr) in curves.items():
        ok = torch.isfinite(steps)
        try:
            b_crit = fit_b_noise(steps[ok], steps[ok] * batch[ok]).b_crit if int(ok.sum()) >= 2 else math.nan
        except ValueError:
            b_crit = math.nan
        rows.append({"p": float(p), "optimizer": name, "critical batch": b_crit,
                     "steps at smallest B": float(steps[0]), "steps at largest B": float(steps[-1])})
    print(f"NQM: d={args.d} (binned {args.bins}), h_i = 1/i, C = H, target risk {args.target}; learning rate tuned per point")
    print(_table(rows, ["p", "optimizer", "critical batch", "steps at smallest B", "steps at largest B"]))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["precond", "optimizer", "batch_size", "steps", "lr"])
            for (p, name), (steps, lr) in curves.items():
                for b, s, l in zip(batch.tolist(), steps.tolist(), lr.tolist()):
                    w.writerow([p, name, b, s, l])
        print(f"curves written to {args.csv}")
    if args.plot:
        plt = _pyplot()
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for (p, name), (steps, lr) in curves.items():
            style = "-" if name == "sgd" else ("--" if name.startswith("momentum") else ":")
            line = ax.loglog(batch, steps, style, label=f"p={p:g} {name}")[0]
            ax2.loglog(batch, lr, style, color=line.get_color())
        ax.loglog(batch, model.lower_bound_steps(batch, args.target), "k--", lw=0.8, label="lower bound d/(2N)")
        ax.set(xlabel="batch size", ylabel="steps to target", title="NQM: steps to target")
        ax2.set(xlabel="batch size", ylabel="best constant learning rate", title="NQM: best learning rate")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot written to {args.plot}")
    return 0


# -- fit ------------------------------------------------------------------------------------------
def _read_runs(path: str) -> dict[str, list[float]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{path}: no rows")
    cols = {k.strip().lower(): k for k in rows[0]}
    if "steps" not in cols or not ({"batch_size", "examples"} & set(cols)):
        raise SystemExit(f"{path}: needs columns 'steps' and 'batch_size' (or 'examples'); found {list(rows[0])}")
    out: dict[str, list[float]] = {"steps": [float(r[cols["steps"]]) for r in rows]}
    if "batch_size" in cols:
        out["batch_size"] = [float(r[cols["batch_size"]]) for r in rows]
    out["examples"] = [float(r[cols["examples"]]) for r in rows] if "examples" in cols else [s * b for s, b in zip(out["steps"], out["batch_size"])]
    if "batch_size" not in out:
        out["batch_size"] = [e / s for e, s in zip(out["examples"], out["steps"])]
    if "lr" in cols:
        out["lr"] = [float(r[cols["lr"]]) for r in rows]
    return out


def cmd_fit(args: argparse.Namespace) -> int:
    from lightning_gradnoise.scaling import fit_b_noise, fit_eps_max

    runs = _read_runs(args.csv)
    try:
        fit = fit_b_noise(runs["steps"], runs["examples"])
    except ValueError as e:
        raise SystemExit(f"cannot fit: {e}") from None
    print(f"B_noise = B_crit = {fit.b_noise:.4g}   S_min = {fit.s_min:.4g}   E_min = {fit.e_min:.4g}   R^2 = {fit.r2:.3f}")
    if "lr" in runs:
        eps = fit_eps_max(args.rule, runs["lr"], runs["batch_size"], fit.b_noise)
        print(f"eps_max ({args.rule} rule) = {eps:.4g}")
    if args.plot:
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(5.5, 4.2))
        ax.loglog(runs["examples"], runs["steps"], "o", label="runs")
        e = torch.logspace(math.log10(fit.e_min * 1.05), math.log10(max(runs["examples"]) * 3), 200, dtype=torch.float64)
        s = fit.s_min * (1 + 1 / (e / fit.e_min - 1))
        ax.loglog(e, s, "-", label=f"(S/S_min-1)(E/E_min-1)=1, B_noise={fit.b_noise:.3g}")
        ax.set(xlabel="examples to target", ylabel="steps to target")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot written to {args.plot}")
    return 0


# -- plan -----------------------------------------------------------------------------------------
def _interp(points: list[tuple[float, float]]):
    pts = sorted(points)

    def f(b: float) -> float:
        if b <= pts[0][0]:
            return pts[0][1]
        if b >= pts[-1][0]:
            return pts[-1][1]
        for (b0, t0), (b1, t1) in zip(pts, pts[1:]):
            if b0 <= b <= b1:
                return t0 + (t1 - t0) * (b - b0) / (b1 - b0)
        return pts[-1][1]

    return f


def cmd_plan(args: argparse.Namespace) -> int:
    from lightning_gradnoise.scaling import plan_batch_sizes
    from lightning_gradnoise.stats import batch_range_for_gr_s

    sizes = args.batch_sizes or [2.0**k for k in range(max(0, int(math.log2(args.b_simple)) - 5), int(math.log2(args.b_simple)) + 6)]
    timing = None
    if args.step_time:
        try:
            timing = _interp([tuple(map(float, s.split(":"))) for s in args.step_time])
        except ValueError:
            raise SystemExit("--step-time takes BATCH:SECONDS pairs, e.g. --step-time 32:0.05 256:0.2") from None
    ref = (args.reference_batch, args.reference_steps) if args.reference_batch and args.reference_steps else None
    rows = plan_batch_sizes(args.b_simple, sizes, reference=ref, seconds_per_step=timing)
    cols = ["batch", "steps", "examples", "steps/S_min", "examples/E_min"] + (["time"] if timing else [])
    lo, hi = batch_range_for_gr_s(args.b_simple, tuple(args.band))
    print(f"B_noise ~ B_simple = {args.b_simple:.4g}" + ("" if ref else "  (steps in units of S_min: pass --reference-batch/--reference-steps for absolute numbers)"))
    print(_table(rows, cols))
    print(f"GR_S band {args.band[0]}-{args.band[1]}: global batch {max(lo, 1):.0f} to {max(hi, 1):.0f}")
    return 0


# -- report ---------------------------------------------------------------------------------------
def read_tensorboard_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """Every ``gradnoise/*`` scalar of the newest event file under ``logdir``: key -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True), key=os.path.getmtime)
    if not files:
        raise SystemExit(f"no TensorBoard event files under {logdir}")
    acc = EventAccumulator(os.path.dirname(files[-1]), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"] if tag.startswith("gradnoise/")}


def cmd_report(args: argparse.Namespace) -> int:
    from lightning_gradnoise.stats import GR_T_TARGET, batch_range_for_gr_s

    series = read_tensorboard_scalars(args.logdir)
    if "gradnoise/b_simple" not in series:
        raise SystemExit(f"{args.logdir}: no gradnoise/b_simple; was GradNoiseMonitor logging with b_simple on?")

    def tail(key: str) -> float:
        values = [v for _, v in series.get(key, [])]
        if not values:
            return math.nan
        return statistics.median(values[-max(1, len(values) // 5) :])

    b_simple, batch = tail("gradnoise/b_simple"), tail("gradnoise/batch_size")
    lo, hi = batch_range_for_gr_s(b_simple, tuple(args.band))
    print(f"run: {args.logdir}  ({len(series['gradnoise/b_simple'])} logged points; values are medians of the last fifth)")
    rows = [{"statistic": k.split("/")[1], "value": tail(k)} for k in GRADNOISE_KEYS if k in series]
    print(_table(rows, ["statistic", "value"]))
    verdict = "inside" if lo <= batch <= hi else ("below: larger batches would use examples as well" if batch < lo else "above: smaller batches would save examples")
    print(f"recommended global batch for GR_S in {args.band[0]}-{args.band[1]}: {max(lo, 1):.0f} to {max(hi, 1):.0f} (current {batch:.0f}, {verdict})")
    gr_t = tail("gradnoise/gr_t")
    if not math.isnan(gr_t):
        hint = "learning rate could rise" if gr_t < GR_T_TARGET / 2 else ("learning rate may be high" if gr_t > 2 * GR_T_TARGET else "near target")
        print(f"GR_T {gr_t:.1f} against a target near {GR_T_TARGET:.0f}: {hint}")
    if args.out:
        plt = _pyplot()
        keys = [k for k in GRADNOISE_KEYS[:4] if k in series]
        fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True, squeeze=False)
        for ax, key in zip(axes[:, 0], keys):
            steps, values = zip(*series[key])
            ax.plot(steps, values, lw=1.2)
            ax.set_ylabel(key.split("/")[1])
            if key == "gradnoise/gr_s":
                ax.axhspan(args.band[0], args.band[1], color="green", alpha=0.15, label="ideal band")
                ax.legend(fontsize=7, loc="upper right")
            if key == "gradnoise/gr_t":
                ax.axhline(GR_T_TARGET, color="green", ls="--", lw=0.8)
        axes[-1, 0].set_xlabel("optimizer step")
        fig.suptitle(os.path.basename(os.path.normpath(args.logdir)))
        fig.tight_layout()
        fig.savefig(args.out, dpi=120)
        print(f"plot written to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradnoise", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n".join(__doc__.splitlines()[2:7]))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("nqm", help="sweep the noisy quadratic model", description="Steps to a target risk against batch size in the NQM (Zhang et al. 2019), with the learning rate tuned per point.")
    p.add_argument("--d", type=int, default=10_000, help="dimensions (default 10000)")
    p.add_argument("--bins", type=int, default=200, help="eigenvalue bins (default 200)")
    p.add_argument("--target", type=float, default=0.01, help="target risk (default 0.01)")
    p.add_argument("--powers", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], help="preconditioning powers p")
    p.add_argument("--momentum", type=float, default=0.9, help="heavy-ball momentum curve (0: none; default 0.9)")
    p.add_argument("--ema", type=float, default=0.0, help="iterate-EMA curve (0: none)")
    p.add_argument("--batch-min", type=float, default=1.0)
    p.add_argument("--batch-max", type=float, default=2.0**19)
    p.add_argument("--num", type=int, default=20, help="batch sizes, log-spaced (default 20)")
    p.add_argument("--plot", help="write the curves to this PNG")
    p.add_argument("--csv", help="write the curves to this CSV")
    p.set_defaults(func=cmd_nqm)

    p = sub.add_parser("fit", help="fit B_noise from runs", description="Fit 1/S = -B_noise/E + 1/S_min (Surge Eq. 22) to runs at several batch sizes. CSV columns: steps, and batch_size or examples; optional lr (the run's best learning rate) for eps_max.")
    p.add_argument("csv", help="CSV of runs")
    p.add_argument("--rule", choices=["adam", "sgd"], default="adam", help="learning-rate rule for eps_max (default adam)")
    p.add_argument("--plot", help="write the fit to this PNG")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("plan", help="plan batch sizes from a measured B_simple", description="Predicted steps and examples per batch size, S = S_min(1 + B_noise/B), with B_noise taken as a measured B_simple.")
    p.add_argument("--b-simple", type=float, required=True, help="measured gradient noise scale")
    p.add_argument("--batch-sizes", type=float, nargs="+", help="candidates (default: powers of two around B_simple)")
    p.add_argument("--reference-batch", type=float, help="batch size of a run that reached the target")
    p.add_argument("--reference-steps", type=float, help="steps that run needed")
    p.add_argument("--step-time", nargs="+", metavar="BATCH:SECONDS", help="measured seconds per step, interpolated in batch size")
    p.add_argument("--band", type=float, nargs=2, default=[0.5, 0.65], help="GR_S band (default 0.5 0.65)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("report", help="report on a run's TensorBoard logs", description="Read gradnoise/* scalars from a run's TensorBoard event files, print the final values and the batch range the GR_S band implies, and plot them.")
    p.add_argument("logdir", help="a TensorBoard log directory (the newest event file under it is read)")
    p.add_argument("--out", help="write the curves to this PNG")
    p.add_argument("--band", type=float, nargs=2, default=[0.5, 0.65], help="GR_S band (default 0.5 0.65)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
