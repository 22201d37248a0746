"""Auto-tuning against a grid of fixed settings: steps and examples to a target training loss.

    python benchmarks/autotune_digits.py [--target 0.15] [--seeds 3] [--max-steps 1000] [--momentum 0.9] [--plot autotune.png]

The digits MLP of examples/digits_monitor.py (SGD, momentum 0.9 or ``--momentum``) on
scikit-learn's digits. The grid: 4 global batch sizes x 4 learning rates, fixed (in micro-batches of half the batch, at most 64). The controller
(GradNoiseMonitor + BatchSizeAdapter + LRAdapter) starts from three poor settings: batch 8x too
small, batch 8x too large, learning rate 10x too small (against batch 64 and the grid's third
learning rate). Under momentum m the learning rates are those of momentum 0.9 times
(1 - m) / 0.1, the same effective step lr / (1 - m). Each run stops when the loss on
the whole training set reaches the target; it counts optimizer steps and examples. Every run is
repeated with ``--seeds`` seeds (initialization and data order) and reported as the median, since
one seed of a run this short moves by tens of percent. Every run carries a GradNoiseMonitor; the
table gives the medians of GR_T and B_simple over each run, so that the GR_T at the fastest fixed
settings can be compared with the learning-rate adapter's target.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from digits_monitor import DigitsMLP, L, digits_loaders  # noqa: E402

from lightning_gradnoise import BatchSizeAdapter, GradNoiseMonitor, LRAdapter  # noqa: E402
from lightning_gradnoise.scaling import fit_b_noise  # noqa: E402


class Readings(L.Callback):
    """Each new value of the monitor's GR_T and B_simple, and the learning rate actually used."""

    def __init__(self, monitor: GradNoiseMonitor) -> None:
        self.monitor, self.values, self.lrs = monitor, [], []
        self._seen = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])
        latest = self.monitor.latest
        if latest and latest is not self._seen:  # the monitor makes a new dict per summary
            self._seen = latest
            self.values.append((latest.get("gr_t", float("nan")), latest.get("b_simple", float("nan"))))

    def medians(self) -> tuple[float, float]:
        """Medians over the run of GR_T and B_simple (``nan`` without a reading)."""
        def median(i: int) -> float:
            vals = [v[i] for v in self.values if math.isfinite(v[i])]
            return statistics.median(vals) if vals else float("nan")

        return median(0), median(1)


class StopAtTarget(L.Callback):
    """After every optimizer step: the loss on the whole training set; stop at the target."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, target: float) -> None:
        self.x, self.y, self.target = x, y, target
        self.steps, self.examples, self.reached = 0, 0, False
        self._micro = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._micro += len(batch[0])
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        self.steps += 1
        self.examples += self._micro
        self._micro = 0
        with torch.no_grad():
            loss = float(nn.functional.cross_entropy(pl_module.net(self.x), self.y))
        if loss <= self.target:
            self.reached = True
            trainer.should_stop = True


def run(batch: int, lr: float, micro: int, target: float, max_steps: int, adapt: dict | None, data, seed: int, momentum: float = 0.9) -> dict:
    L.seed_everything(seed, verbose=False)
    x, y, train = data(micro, seed)
    stop = StopAtTarget(x, y, target)
    monitor = GradNoiseMonitor(statistics=("b_simple", "gr_s", "gr_t"), log_every_n_steps=5)
    readings = Readings(monitor)
    # the fixed runs carry the monitor too (it does not change the update), to show where GR_T and
    # B_simple sit at the settings that reach the target fastest
    callbacks = [stop, monitor, readings]
    if adapt is not None:
        callbacks += [BatchSizeAdapter(cooldown=adapt["batch_cooldown"], max_batch=1024, max_factor=adapt["max_factor"]),
                      LRAdapter(cooldown=adapt["lr_cooldown"], step_factor=adapt["step_factor"], gain=adapt["gain"], target=adapt["target"])]
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=10_000, accumulate_grad_batches=batch // micro,
        callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(DigitsMLP(lr, momentum=momentum), train)
    final_batch = micro * trainer.accumulate_grad_batches
    gr_t, b_simple = readings.medians()
    return {"batch": batch, "lr": lr, "steps": stop.steps if stop.reached else float("inf"),
            "examples": stop.examples if stop.reached else float("inf"), "final_batch": final_batch,
            "final_lr": readings.lrs[-1] if readings.lrs else lr, "gr_t": gr_t, "b_simple": b_simple}


def median_run(seeds: int, *args, momentum: float = 0.9) -> dict:
    """The run repeated over seeds: medians of every figure a run reports."""
    runs = [run(*args, seed, momentum) for seed in range(seeds)]
    out = dict(runs[0])
    for key in ("steps", "examples", "final_batch", "final_lr", "gr_t", "b_simple"):
        out[key] = statistics.median(r[key] for r in runs)
    out["per_seed"] = [(r["steps"], r["examples"]) for r in runs]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.15)
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-factor", type=int, default=2, help="BatchSizeAdapter max_factor")
    parser.add_argument("--batch-cooldown", type=int, default=10, help="BatchSizeAdapter cooldown (optimizer steps)")
    parser.add_argument("--lr-step-factor", type=float, default=1.5, help="LRAdapter step_factor")
    parser.add_argument("--lr-gain", type=float, default=0.5, help="LRAdapter gain")
    parser.add_argument("--lr-cooldown", type=int, default=10, help="LRAdapter cooldown (optimizer steps)")
    parser.add_argument("--lr-target", default="20", help="LRAdapter target: a number or 'auto'")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (learning rates scale by (1 - momentum) / 0.1)")
    parser.add_argument("--plot")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)

    def data(micro, seed):
        train, _ = digits_loaders(micro, seed=seed)
        ds = train.dataset
        return ds.tensors[0], ds.tensors[1], train

    target = args.lr_target if args.lr_target == "auto" else float(args.lr_target)
    adapt = {"max_factor": args.max_factor, "step_factor": args.lr_step_factor, "gain": args.lr_gain, "target": target, "lr_cooldown": args.lr_cooldown,
             "batch_cooldown": args.batch_cooldown}
    s = (1.0 - args.momentum) / 0.1  # the same effective step, lr / (1 - momentum), as momentum 0.9
    lrs = [round(lr * s, 6) for lr in (0.01, 0.03, 0.1, 0.3)]
    grid = [median_run(args.seeds, b, lr, min(b // 2, 64), args.target, args.max_steps, None, data, momentum=args.momentum)
            for b in (16, 64, 256, 1024) for lr in lrs]
    # micro-batches of 4 or 16: the batch can shrink to two micro-batches (the monitor's floor)
    starts = {f"batch 8x too small (8, lr {lrs[2]:g})": (8, lrs[2], 4), f"batch 8x too large (512, lr {lrs[2]:g})": (512, lrs[2], 16),
              f"lr 10x too small (64, lr {lrs[0]:g})": (64, lrs[0], 16)}
    adaptive = {name: median_run(args.seeds, b, lr, micro, args.target, args.max_steps, adapt, data, momentum=args.momentum)
                for name, (b, lr, micro) in starts.items()}
    print(f"\ndigits MLP, SGD momentum {args.momentum:g}, steps and examples to training loss {args.target} (inf: not within {args.max_steps} steps), "
          f"median of {args.seeds} seeds; adapters: {adapt}")
    print(f"{'run':<36} {'steps':>7} {'examples':>9} {'GR_T':>6} {'B_simple':>8}   (GR_T, B_simple: medians over the run)")
    for r in grid:
        print(f"{'fixed batch %d, lr %g' % (r['batch'], r['lr']):<36} {r['steps']:>7g} {r['examples']:>9g} {r['gr_t']:>6.1f} {r['b_simple']:>8.0f}")
    for name, r in adaptive.items():
        print(f"{'controller from ' + name:<36} {r['steps']:>7g} {r['examples']:>9g} {r['gr_t']:>6.1f} {r['b_simple']:>8.0f}  "
              f"(ends at batch {r['final_batch']:g}, lr {r['final_lr']:.3g}; "
              f"per seed: {', '.join(f'{s:g}/{e:g}' for s, e in r['per_seed'])})")
    for name, r in adaptive.items():
        better = [g for g in grid if g["steps"] < r["steps"] and g["examples"] < r["examples"]]
        print(f"grid points with both fewer steps and fewer examples than the controller from {name}: {len(better)}"
              + (" (" + ", ".join(f"B={g['batch']} lr={g['lr']}" for g in better) + ")" if better else ""))
    # the fastest fixed run of each batch size traces the steps/examples frontier; McCandlish Eq. 2.11
    # fitted to it says how many steps even a perfect learning rate needs at the batch the controller keeps
    best = [min((g for g in grid if g["batch"] == b), key=lambda g: g["steps"]) for b in sorted({g["batch"] for g in grid})]
    best = [g for g in best if math.isfinite(g["steps"])]
    if len(best) >= 2:
        fit = fit_b_noise([g["steps"] for g in best], [g["examples"] for g in best])
        print(f"frontier fit (1/S = 1/S_min - B_noise/E, McCandlish Eq. 2.11, the fastest fixed run per batch): B_noise {fit.b_noise:.0f}, "
              f"S_min {fit.s_min:.1f}, E_min {fit.e_min:.0f}, R^2 {fit.r2:.3f}")
        for name, r in adaptive.items():
            print(f"  at the final batch of the controller from {name} ({r['final_batch']:g}) the fit's fewest steps are "
                  f"{fit.s_min * (1 + fit.b_noise / r['final_batch']):.0f}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4.5))
        pts = [g for g in grid if g["steps"] != float("inf")]
        ax.scatter([g["examples"] for g in pts], [g["steps"] for g in pts], c="gray", label="fixed grid")
        for g in pts:
            ax.annotate(f"{g['batch']},{g['lr']}", (g["examples"], g["steps"]), fontsize=6)
        for name, r in adaptive.items():
            if r["steps"] != float("inf"):
                ax.scatter([r["examples"]], [r["steps"]], marker="*", s=150, label=f"controller from {name}")
        ax.set(xscale="log", yscale="log", xlabel="examples to target", ylabel="steps to target")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
