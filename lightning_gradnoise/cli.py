"""The gradnoise command: plan batch sizes before training and report on a run after it.

    gradnoise nqm     sweep the noisy quadratic model: steps to target against batch size
    gradnoise fit     fit B_noise, S_min, E_min (and eps_max) from a CSV of runs
    gradnoise plan    predicted steps, examples and time per batch size from a measured B_simple
    gradnoise report  read a run's TensorBoard logs, plot B_simple, GR_S, GR_T, GSNR, recommend a batch range

Every subcommand has --help. Plots need matplotlib: pip install "lightning-gradnoise[plot]".
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from typing import Callable, Optional, Sequence

from lightning_gradnoise import __version__
from lightning_gradnoise._cli_io import UsageError, check_output_path, read_runs, read_tensorboard_scalars
from lightning_gradnoise._validate import check_int, check_number

__all__ = ["build_parser", "current_interval", "current_value", "main", "read_tensorboard_scalars", "usual_steps"]

GRADNOISE_KEYS = ("gradnoise/b_simple", "gradnoise/gr_s", "gradnoise/gr_t", "gradnoise/gsnr", "gradnoise/batch_size")
MAX_SIZE = 1e12  # a batch size or noise scale beyond this is a typo, not a plan


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError('plotting needs matplotlib: pip install "lightning-gradnoise[plot]" (or pip install matplotlib)') from None
    return plt


def _table(rows: list[dict], columns: Sequence[str]) -> str:
    cells = [[format(r[c], ".4g") if isinstance(r[c], float) else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _arg(check: Callable, **bounds) -> Callable[[str], float]:
    """An argparse type: parse the text, then check it, with the check's message on failure."""

    def parse(text: str):
        try:
            value = float(text) if check is check_number else int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'number' if check is check_number else 'whole number'}") from None
        try:
            return check("value", value, **bounds)
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e).replace("value=", "", 1)) from None

    parse.__name__ = "number"
    return parse


POSITIVE = _arg(check_number, low=0, low_open=True)
SIZE = _arg(check_number, low=0, low_open=True, high=MAX_SIZE)
FRACTION = _arg(check_number, low=0, high=1, high_open=True)
UNIT = _arg(check_number, low=0, high=1)
OPEN_UNIT = _arg(check_number, low=0, low_open=True, high=1, high_open=True)


# -- nqm ------------------------------------------------------------------------------------------
def cmd_nqm(args: argparse.Namespace) -> int:
    import torch

    from lightning_gradnoise.nqm import NQM
    from lightning_gradnoise.scaling import fit_b_noise

    if args.batch_min >= args.batch_max:
        raise UsageError(f"--batch-min {args.batch_min:g} must be below --batch-max {args.batch_max:g}")
    model = NQM.paper(d=args.d, bins=args.bins)
    batch = torch.logspace(math.log2(args.batch_min), math.log2(args.batch_max), args.num, base=2.0, dtype=torch.float64)
    curves = {}
    for p in args.powers:
        for name, opt in (("sgd", {}), (f"momentum {args.momentum}", {"momentum": args.momentum}), (f"ema {args.ema}", {"ema": args.ema})):
            if (name.startswith("momentum") and not args.momentum) or (name.startswith("ema") and not args.ema):
                continue
            curves[(p, name)] = model.best_lr(batch, args.target, precond=p, **opt)
    rows = []
    for (p, name), (steps, _) in curves.items():
        ok = torch.isfinite(steps)
        try:
            b_crit = fit_b_noise(steps[ok], steps[ok] * batch[ok]).b_crit if int(ok.sum()) >= 2 else math.nan
        except ValueError:  # no trade-off within the range: perfect scaling all the way
            b_crit = math.inf
        crit = f"> {args.batch_max:g}" if b_crit > args.batch_max else ("n/a" if math.isnan(b_crit) else f"{b_crit:.4g}")
        rows.append({"p": float(p), "optimizer": name, "critical batch": crit,
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
def cmd_fit(args: argparse.Namespace) -> int:
    from lightning_gradnoise.scaling import fit_b_noise, fit_eps_max

    runs = read_runs(args.csv)
    try:
        fit = fit_b_noise(runs["steps"], runs["examples"])
    except ValueError as e:
        raise UsageError(f"cannot fit: {e}") from None
    print(f"B_noise = B_crit = {fit.b_noise:.4g}   S_min = {fit.s_min:.4g}   E_min = {fit.e_min:.4g}   R^2 = {fit.r2:.3f}")
    if "lr" in runs:
        eps = fit_eps_max(args.rule, runs["lr"], runs["batch_size"], fit.b_noise)
        print(f"eps_max ({args.rule} rule) = {eps:.4g}")
    if args.plot:
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(5.5, 4.2))
        ax.loglog(runs["examples"], runs["steps"], "o", label="runs")
        top = max(runs["examples"]) * 3
        e = [fit.e_min * 1.05 * (top / (fit.e_min * 1.05)) ** (i / 199) for i in range(200)]
        ax.loglog(e, [fit.s_min * (1 + 1 / (x / fit.e_min - 1)) for x in e], "-",
                  label=f"(S/S_min-1)(E/E_min-1)=1, B_noise={fit.b_noise:.3g}")
        ax.set(xlabel="examples to target", ylabel="steps to target")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot written to {args.plot}")
    return 0


# -- plan -----------------------------------------------------------------------------------------
def step_time_model(pairs: Sequence[str]) -> tuple[Callable[[float], float], float, float]:
    """Seconds per step against batch size from ``BATCH:SECONDS`` pairs: straight lines between
    the measured points in log-log, and the nearest segment's power law beyond them (a step's
    time grows with the batch, never stays flat). Returns ``(model, smallest, largest)``."""
    points = {}
    for text in pairs:
        try:
            b, t = (float(v) for v in text.split(":"))
        except ValueError:
            raise UsageError(f"--step-time {text!r}: expected BATCH:SECONDS, e.g. --step-time 32:0.05 256:0.2") from None
        if not (0 < b <= MAX_SIZE and 0 < t < math.inf):
            raise UsageError(f"--step-time {text!r}: batch and seconds must be finite numbers > 0")
        points[b] = t
    if len(points) < 2:
        raise UsageError("--step-time needs at least two BATCH:SECONDS pairs at different batch sizes, to interpolate between them")
    pts = sorted((math.log(b), math.log(t)) for b, t in points.items())

    def model(batch: float) -> float:
        x = math.log(batch)
        i = next((i for i in range(1, len(pts) - 1) if x < pts[i][0]), len(pts) - 1)
        (x0, y0), (x1, y1) = pts[i - 1], pts[i]
        return math.exp(y0 + (y1 - y0) * (x - x0) / (x1 - x0))

    return model, min(points), max(points)


def cmd_plan(args: argparse.Namespace) -> int:
    from lightning_gradnoise.scaling import plan_batch_sizes
    from lightning_gradnoise.stats import batch_range_for_gr_s

    if (args.reference_batch is None) != (args.reference_steps is None):
        raise UsageError("--reference-batch and --reference-steps go together: give both, or neither")
    low, high = args.band
    if not low < high:
        raise UsageError(f"--band {low:g} {high:g}: the low end must come first and be below the high end")
    sizes = args.batch_sizes or [2.0**k for k in range(max(0, int(math.log2(args.b_simple)) - 5), int(math.log2(args.b_simple)) + 6)]
    timing, t_lo, t_hi = step_time_model(args.step_time) if args.step_time else (None, 0.0, math.inf)
    ref = (args.reference_batch, args.reference_steps) if args.reference_batch else None
    rows = plan_batch_sizes(args.b_simple, sizes, reference=ref, seconds_per_step=timing)
    cols = ["batch", "steps", "examples", "steps/S_min", "examples/E_min"] + (["time"] if timing else [])
    outside = [r for r in rows if not t_lo <= r["batch"] <= t_hi]
    for r in outside:
        r["time"] = f"{r['time']:.4g}*"
    lo, hi = batch_range_for_gr_s(args.b_simple, (low, high))
    print(f"B_noise ~ B_simple = {args.b_simple:.4g}" + ("" if ref else "  (steps in units of S_min: pass --reference-batch/--reference-steps for absolute numbers)"))
    print(_table(rows, cols))
    if outside:
        print(f"* extrapolated: outside the measured batch sizes {t_lo:g}-{t_hi:g}, the step time follows the power law of the nearest two points")
    print(f"GR_S band {low:g}-{high:g}: global batch {max(lo, 1):.0f} to {max(hi, 1):.0f}")
    return 0


# -- report ---------------------------------------------------------------------------------------
def usual_steps(series: dict[str, list[tuple[int, float]]]) -> set[int] | None:
    """The logged steps at the run's usual batch: the most common batch of the last fifth of the
    logged points. An epoch's short last window is a smaller batch, whose GR_S reads higher and
    whose estimates are noisier: the current values leave such steps out. ``None`` if the run
    logged no batch size."""
    batches = series.get("gradnoise/batch_size", [])
    if not batches:
        return None
    recent = [v for _, v in batches[-max(1, len(batches) // 5) :]]
    usual = max(set(recent), key=lambda b: (recent.count(b), b))
    return {s for s, v in batches if v == usual}


def current_value(points: Sequence[tuple[int, float]], steps: set[int] | None = None) -> float:
    """A run's current value of a logged series: the median of its last fifth of logged points
    (one point is noisy; the median of a recent stretch is what the run is at now), counting only
    ``steps`` when given (:func:`usual_steps`)."""
    values = [v for s, v in points if steps is None or s in steps]
    if not values:
        return math.nan
    return statistics.median(values[-max(1, len(values) // 5) :])


def current_interval(series: dict[str, list[tuple[int, float]]], key: str, steps: set[int] | None = None) -> tuple[float, float]:
    """The logged interval ``(key_lo, key_hi)`` of the last point among ``steps`` (all when
    ``None``); NaN if there is none."""
    lo, hi = dict(series.get(f"{key}_lo", [])), dict(series.get(f"{key}_hi", []))
    at = [s for s in lo if s in hi and (steps is None or s in steps)]
    return (lo[at[-1]], hi[at[-1]]) if at else (math.nan, math.nan)


def cmd_report(args: argparse.Namespace) -> int:
    from lightning_gradnoise.stats import GR_T_TARGET, batch_range_for_gr_s

    low, high = args.band
    if not low < high:
        raise UsageError(f"--band {low:g} {high:g}: the low end must come first and be below the high end")
    series = read_tensorboard_scalars(args.logdir, warn=lambda line: print(f"warning: {line}", file=sys.stderr))
    for key, what in (("gradnoise/b_simple", "was GradNoiseMonitor logging with b_simple on?"),
                      ("gradnoise/batch_size", "the run logged no batch size, so no batch can be recommended")):
        if key not in series:
            raise UsageError(f"{args.logdir}: no {key} in the logs; {what}")
    full = usual_steps(series)
    b_simple, batch = current_value(series["gradnoise/b_simple"], full), current_value(series["gradnoise/batch_size"], full)
    for name, value in (("B_simple", b_simple), ("batch_size", batch)):
        if not (math.isfinite(value) and value > 0):
            raise UsageError(f"{args.logdir}: the current {name} is {value:g}, not a positive finite number; "
                             "no verdict from it (the run may be too short for the statistic to settle)")
    lo, hi = batch_range_for_gr_s(b_simple, (low, high))
    print(f"run: {args.logdir}  ({len(series['gradnoise/b_simple'])} logged points; values are medians of the last fifth,"
          " at the run's usual batch; intervals those of the last such point)")
    rows = []
    for key in GRADNOISE_KEYS:
        if key in series:
            ends = current_interval(series, key, full)
            shown = f"{ends[0]:.4g} - {ends[1]:.4g}" if all(math.isfinite(e) for e in ends) else ""
            rows.append({"statistic": key.split("/")[1], "value": current_value(series[key], full), "interval": shown or "n/a"})
    print(_table(rows, ["statistic", "value", "interval"]))
    verdict = "inside" if lo <= batch <= hi else ("below: larger batches would use examples as well" if batch < lo else "above: smaller batches would save examples")
    print(f"recommended global batch for GR_S in {low:g}-{high:g}: {max(lo, 1):.0f} to {max(hi, 1):.0f} (current {batch:.0f}, {verdict})")
    gr_t = current_value(series.get("gradnoise/gr_t", []), full)
    if math.isfinite(gr_t) and gr_t > 0:
        hint = "learning rate could rise" if gr_t < GR_T_TARGET / 2 else ("learning rate may be high" if gr_t > 2 * GR_T_TARGET else "near target")
        print(f"GR_T {gr_t:.1f} against a target near {GR_T_TARGET:.0f}: {hint}")
    if args.out:
        _plot_report(args, series, low, high, GR_T_TARGET)
        print(f"plot written to {args.out}")
    return 0


def _plot_report(args: argparse.Namespace, series: dict, low: float, high: float, gr_t_target: float) -> None:
    """Each statistic against the step, with its interval as a band; steps whose batch was
    smaller than the run's usual one (an epoch's short last window) marked, and the adapters'
    decisions drawn as vertical lines."""
    plt = _pyplot()
    keys = [k for k in GRADNOISE_KEYS[:4] if k in series]
    usual = statistics.median(v for _, v in series["gradnoise/batch_size"])
    short = {s for s, v in series["gradnoise/batch_size"] if v < usual}
    decisions = sorted({s for key in ("gradnoise/decision/batch_size", "gradnoise/lr_scale") for s, _ in series.get(key, [])})
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        steps, values = zip(*series[key])
        ax.plot(steps, values, lw=1.2)
        if f"{key}_lo" in series and f"{key}_hi" in series:
            lo = dict(series[f"{key}_lo"])
            hi = dict(series[f"{key}_hi"])
            at = [s for s in steps if s in lo and s in hi]
            ax.fill_between(at, [lo[s] for s in at], [hi[s] for s in at], alpha=0.25, lw=0, label="90% interval")
        marked = [(s, v) for s, v in series[key] if s in short]
        if marked:
            ax.plot(*zip(*marked), "x", color="grey", ms=4, label="short window (smaller batch)")
        for s in decisions:
            ax.axvline(s, color="red", ls=":", lw=0.8)
        ax.set_ylabel(key.split("/")[1])
        if key == "gradnoise/gr_s":
            ax.axhspan(low, high, color="green", alpha=0.15, label="ideal band")
        if key == "gradnoise/gr_t":
            ax.axhline(gr_t_target, color="green", ls="--", lw=0.8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("optimizer step" + (" (dotted: an adapter's decision)" if decisions else ""))
    fig.suptitle(args.logdir.rstrip("/").split("/")[-1])
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    """The ``gradnoise`` argument parser, with every subcommand."""
    doc = (__doc__ or "").splitlines()
    parser = argparse.ArgumentParser(prog="gradnoise", description=doc[0], epilog="\n".join(doc[2:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"gradnoise (lightning-gradnoise) {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{nqm,fit,plan,report}")

    p = sub.add_parser("nqm", help="sweep the noisy quadratic model",
                       description="Steps to a target risk against batch size in the noisy quadratic model (Zhang et al. 2019), with the learning rate tuned for each batch size.")
    p.add_argument("--d", type=_arg(check_int, low=1, high=10**7), default=10_000, help="number of dimensions, 1 to 10^7 (default 10000)")
    p.add_argument("--bins", type=_arg(check_int, low=1, high=10**5), default=200, help="eigenvalues are grouped into this many log-spaced bins, to run fast (default 200)")
    p.add_argument("--target", type=POSITIVE, default=0.01, help="the risk to reach, a number > 0 (default 0.01)")
    p.add_argument("--powers", type=UNIT, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], help="preconditioning powers p, each from 0 (plain SGD) to 1 (default 0 0.25 0.5 0.75 1)")
    p.add_argument("--momentum", type=FRACTION, default=0.9, help="also sweep heavy-ball momentum with this coefficient, 0 to below 1 (0: no such curve; default 0.9)")
    p.add_argument("--ema", type=FRACTION, default=0.0, help="also sweep an exponential moving average of the weights with this decay, 0 to below 1 (0: no such curve, the default)")
    p.add_argument("--batch-min", type=SIZE, default=1.0, help="smallest batch size of the sweep (default 1)")
    p.add_argument("--batch-max", type=SIZE, default=2.0**19, help="largest batch size of the sweep (default 524288)")
    p.add_argument("--num", type=_arg(check_int, low=2, high=1000), default=20, help="how many batch sizes, log-spaced from the smallest to the largest, 2 to 1000 (default 20)")
    p.add_argument("--plot", help="also draw the curves into this PNG file")
    p.add_argument("--csv", help="also write the curves to this CSV file")
    p.set_defaults(func=cmd_nqm, outputs=("--plot", "--csv"))

    p = sub.add_parser("fit", help="fit B_noise from runs",
                       description="Fit 1/S = -B_noise/E + 1/S_min (Surge Eq. 22) to runs at several batch sizes. The CSV needs the columns steps, and batch_size or examples; an optional lr column (each run's best learning rate) also gives eps_max.")
    p.add_argument("csv", help="CSV file of runs, one line per run")
    p.add_argument("--rule", choices=["adam", "sgd"], default="adam", help="the learning-rate rule for eps_max: adam or sgd (default adam)")
    p.add_argument("--plot", help="also draw the fit into this PNG file")
    p.set_defaults(func=cmd_fit, outputs=("--plot",))

    p = sub.add_parser("plan", help="plan batch sizes from a measured B_simple",
                       description="Predicted steps and examples per batch size, S = S_min (1 + B_noise/B), taking B_noise to be a measured B_simple.")
    p.add_argument("--b-simple", type=SIZE, required=True, help="the measured gradient noise scale, a number > 0")
    p.add_argument("--batch-sizes", type=SIZE, nargs="+", help="batch sizes to compare (default: the powers of two from B_simple/32 to 32 B_simple)")
    p.add_argument("--reference-batch", type=SIZE, help="batch size of a run that reached the target (goes with --reference-steps)")
    p.add_argument("--reference-steps", type=SIZE, help="the steps that run needed; with both, steps are absolute, else in units of S_min")
    p.add_argument("--step-time", nargs="+", metavar="BATCH:SECONDS", help="measured seconds per step at two or more batch sizes, e.g. 32:0.05 256:0.2; adds a time column")
    p.add_argument("--band", type=OPEN_UNIT, nargs=2, default=[0.5, 0.65], metavar=("LOW", "HIGH"), help="the GR_S band to recommend batch sizes for (default 0.5 0.65)")
    p.set_defaults(func=cmd_plan, outputs=())

    p = sub.add_parser("report", help="report on a run's TensorBoard logs",
                       description="Read the gradnoise/* scalars of a run's TensorBoard event files, print each one's current value (the median of its last fifth of logged points) and the batch range the GR_S band implies, and plot them.")
    p.add_argument("logdir", help="a TensorBoard log directory (the newest event file under it is read)")
    p.add_argument("--out", help="also draw the curves into this PNG file")
    p.add_argument("--band", type=OPEN_UNIT, nargs=2, default=[0.5, 0.65], metavar=("LOW", "HIGH"), help="the GR_S band to recommend batch sizes for (default 0.5 0.65)")
    p.set_defaults(func=cmd_report, outputs=("--out",))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``gradnoise`` with ``argv`` (default: the command line); returns the exit status.

    A user's mistake (a bad option, a missing or malformed file, an output folder that does not
    exist) prints one line to standard error and returns 2; argparse's own errors exit with 2."""
    args = build_parser().parse_args(argv)
    try:
        for option in args.outputs:
            check_output_path(option, getattr(args, option.lstrip("-").replace("-", "_")))
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"gradnoise {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gradnoise {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
