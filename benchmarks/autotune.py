"""Auto-tuning from a poor start against the steps/examples frontier of a fine grid of fixed runs.

    python benchmarks/autotune.py --task digits [--seeds 3] [--lr-rule line_search] [--plot autotune-digits.png]
    python benchmarks/autotune.py --task charlm [--seeds 3] [--plot autotune-charlm.png]

Tasks:

- ``digits``: the MLP of examples/digits_monitor.py, SGD with momentum 0.9, to a loss of 0.15 on the
  whole training set (checked after every step).
- ``charlm``: a character-level transformer language model (benchmarks/_charlm.py) with AdamW on
  the text of ``pydoc_data.topics`` (ships with Python), to a validation loss (held-out text,
  checked every 5 steps).

The grid: every batch size x a learning rate every factor of 2, each run with ``--seeds`` seeds
(initialization and data order), median steps and examples to the target. The fastest fixed run
of each batch size traces McCandlish's trade-off, fitted as (S/S_min - 1)(E/E_min - 1) = 1
(Eq. 2.11). A run that takes S steps and E examples costs lambda = ab/(a + b), a = S/S_min,
b = E/E_min: the uniform scale that puts it on the curve (1: on the frontier, 2: twice the steps
and examples of some frontier point).

The reference point: the grid batch nearest the fit's critical batch E_min/S_min, at its fastest
learning rate. Four poor starts around it: batch 8x too small, batch 8x too large, learning rate 10x
too small, 3x too large; and the reference itself, a good start, which says what leaving the
adapters on costs when nothing needs fixing. Each runs with the adapters (GradNoiseMonitor +
BatchSizeAdapter + LRAdapter) and left fixed, over the same seeds; the table gives lambda per seed
and the median, and whether the adapted run is dominated by the fixed one (more steps and more
examples).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
sys.path.insert(0, os.path.dirname(__file__))
from _charlm import CharLM, char_splits  # noqa: E402
from digits_monitor import DigitsMLP, L, digits_loaders  # noqa: E402

from lightning_gradnoise import BatchSizeAdapter, GradNoiseMonitor, LRAdapter  # noqa: E402
from lightning_gradnoise.scaling import fit_b_noise  # noqa: E402


@dataclass
class Task:
    name: str
    batches: tuple[int, ...]
    lrs: tuple[float, ...]
    target: float
    max_steps: int
    every: int  # check the target every this many steps
    make: Callable[[float], Any]  # lr -> LightningModule
    loader: Callable[[int, int], DataLoader]  # (micro, seed) -> training loader
    loss: Callable[[Any], float]  # module -> the loss the target is on
    micro_cap: int


def independent(dataset, micro: int, seed: int) -> DataLoader:
    """Batches drawn with replacement: independent of each other, as on data far larger than a
    batch. Digits has 1,500 training examples, and a batch of 512 drawn without replacement is a
    third of an epoch, whose noise is anti-correlated with the batches before it."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=micro, sampler=RandomSampler(dataset, replacement=True, num_samples=len(dataset), generator=g),
                      drop_last=True)


TARGETS = {"digits": 0.15, "charlm": 2.0}  # each task's loss to reach, unless --target says otherwise


def digits_task(target: float = TARGETS["digits"]) -> Task:
    train, _ = digits_loaders(64, seed=0)
    x, y = train.dataset.tensors

    def loss(module):
        return float(nn.functional.cross_entropy(module.net(x), y))

    return Task(f"digits MLP, SGD momentum 0.9, training loss {target:g}", (8, 16, 32, 64, 128, 256, 512, 1024),
                tuple(0.0125 * 2**i for i in range(7)), target, 1000, 1, lambda lr: DigitsMLP(lr, momentum=0.9),
                lambda micro, seed: independent(train.dataset, micro, seed), loss, 64)


def charlm_task(target: float = TARGETS["charlm"], seq: int = 32) -> Task:
    vocab, (tx, ty), (vx, vy) = char_splits(seq)

    def loader(micro, seed):
        return independent(TensorDataset(tx, ty), micro, seed)

    def loss(module):
        with torch.no_grad():
            return float(nn.functional.cross_entropy(module(vx).flatten(0, 1), vy.flatten()))

    return Task(f"char transformer LM, AdamW, validation loss {target:g}", (4, 8, 16, 32, 64, 128, 256), tuple(1e-3 * 2**i for i in range(5)),
                target, 1500, 5, lambda lr: CharLM(vocab, d=64, layers=2, heads=4, seq=seq, lr=lr), loader, loss, 32)


class StopAtTarget(L.Callback):
    """Counts optimizer steps and examples; stops at the target, or when the loss is not finite."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.steps, self.examples, self.reached, self._micro = 0, 0, False, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._micro += len(batch[0])
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        self.steps += 1
        self.examples += self._micro
        self._micro = 0
        if self.steps % self.task.every:
            return
        pl_module.eval()
        value = self.task.loss(pl_module)
        pl_module.train()
        if value <= self.task.target:
            self.reached = True
            trainer.should_stop = True
        elif not math.isfinite(value):
            trainer.should_stop = True


def run(task: Task, batch: int, lr: float, seed: int, adapt: dict | None, micro: int | None = None) -> dict:
    micro = micro or min(max(batch // 2, 1), task.micro_cap)
    L.seed_everything(seed, verbose=False)
    stop = StopAtTarget(task)
    callbacks: list = [stop]
    lra = bsa = None
    if adapt is not None:
        stats = ("b_simple", "gr_s", "gr_t") if adapt.get("rule") == "gr_t" else ("b_simple", "gr_s")
        # the batch stays within the grid's batches: beyond them there is no frontier point to compare with
        bsa = BatchSizeAdapter(cooldown=adapt.get("batch_cooldown", 10), max_batch=max(task.batches), max_factor=adapt.get("max_factor", 2))
        lr_kw = {k: v for k, v in adapt.items() if k not in ("batch_cooldown", "max_factor", "batch")}
        lra = LRAdapter(**lr_kw)
        callbacks += [GradNoiseMonitor(statistics=stats, log_every_n_steps=5)] + ([bsa] if adapt.get("batch", True) else []) + [lra]
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=task.max_steps, max_epochs=100_000, accumulate_grad_batches=batch // micro,
        callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    module = task.make(lr)
    trainer.fit(module, task.loader(micro, seed))
    return {"steps": stop.steps if stop.reached else math.inf, "examples": stop.examples if stop.reached else math.inf,
            "final_batch": micro * trainer.accumulate_grad_batches, "final_lr": trainer.optimizers[0].param_groups[0]["lr"],
            "decisions": len(lra.decisions if lra else []) + len(bsa.decisions if bsa else [])}


def median_of(runs: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in runs) for key in ("steps", "examples", "final_batch", "final_lr")}


def cost(steps: float, examples: float, s_min: float, e_min: float) -> float:
    """lambda = ab/(a + b): the scale that puts (steps, examples) on the fitted frontier."""
    if not (math.isfinite(steps) and math.isfinite(examples)):
        return math.inf
    a, b = steps / s_min, examples / e_min
    return a * b / (a + b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("digits", "charlm"), default="digits")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of each poor start, fixed and adapted")
    parser.add_argument("--grid-seeds", type=int, default=3, help="seeds of each grid point")
    parser.add_argument("--target", type=float, help=f"the loss to reach (default: {', '.join(f'{k} {v:g}' for k, v in TARGETS.items())}); "
                        "lower makes the runs longer")
    parser.add_argument("--lr-rule", choices=("line_search", "gr_t"), default="line_search")
    parser.add_argument("--grid-json", help="keep the grid's medians in this file: read it when it exists (same task and seeds), else write it")
    parser.add_argument("--plot")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    if args.target is not None and not (math.isfinite(args.target) and args.target > 0):
        parser.error(f"--target {args.target}: a positive loss")
    target = TARGETS[args.task] if args.target is None else args.target
    task = digits_task(target) if args.task == "digits" else charlm_task(target)
    seeds = range(args.seeds)
    began = time.time()
    grid = {}
    if args.grid_json and os.path.exists(args.grid_json):
        with open(args.grid_json) as f:
            kept = json.load(f)
        made_for = (kept["task"], kept["grid_seeds"], kept.get("target", TARGETS[kept["task"]]))
        if made_for != (args.task, args.grid_seeds, task.target):
            parser.error(f"--grid-json {args.grid_json}: made for task {made_for[0]} with {made_for[1]} seeds, target {made_for[2]:g}")
        grid = {(int(b), float(lr)): v for b, lr, v in kept["grid"]}
    else:
        for b in task.batches:
            for lr in task.lrs:
                grid[b, lr] = median_of([run(task, b, lr, s, None) for s in range(args.grid_seeds)])
        if args.grid_json:
            with open(args.grid_json, "w") as f:
                json.dump({"task": args.task, "grid_seeds": args.grid_seeds, "target": task.target, "grid": [[b, lr, v] for (b, lr), v in grid.items()]}, f)
    best = {b: min((lr for bb, lr in grid if bb == b), key=lambda lr: (grid[b, lr]["steps"], grid[b, lr]["examples"])) for b in task.batches}
    front = [(b, best[b]) for b in task.batches if math.isfinite(grid[b, best[b]]["steps"])]
    fit = fit_b_noise([grid[p]["steps"] for p in front], [grid[p]["examples"] for p in front])
    # the reference: the grid batch nearest the critical batch E_min/S_min whose x8 and /8 are on the grid too
    inner = [b for b in task.batches if b // 8 in task.batches and b * 8 in task.batches] or list(task.batches)
    b_ref = min(inner, key=lambda b: abs(math.log(b / max(fit.e_min / fit.s_min, 1e-9))))
    lr_ref = best[b_ref]
    # each start is the grid's best point at the start's batch, with the batch or the learning rate off
    starts = {
        "batch 8x too small": (b_ref // 8, best.get(b_ref // 8, lr_ref)),
        "batch 8x too large": (b_ref * 8, best.get(b_ref * 8, lr_ref)),
        "lr 10x too small": (b_ref, lr_ref / 10),
        "lr 3x too large": (b_ref, lr_ref * 3),
        "good start": (b_ref, lr_ref),  # what the adapters cost where nothing needs fixing
    }
    adapt = {"rule": args.lr_rule}
    results = {}
    for name, (b, lr) in starts.items():
        micro = max(b // 16, 2) if b >= 32 else max(b // 2, 1)  # >= 2 micro-batches: the batch can halve
        micro = min(micro, task.micro_cap)
        fixed = [run(task, b, lr, s, None, micro) for s in seeds]
        adapted = [run(task, b, lr, s, adapt, micro) for s in seeds]
        results[name] = (b, lr, fixed, adapted)

    print(f"\n{task.name}; grid: median of {args.grid_seeds} seeds, starts: median of {args.seeds}; "
          f"LRAdapter(rule={args.lr_rule!r}); {time.time() - began:.0f} s")
    print("grid: steps / examples to the target (inf: not within the step limit)")
    print(f"{'batch':>6} " + " ".join(f"{lr:>13.4g}" for lr in task.lrs))
    for b in task.batches:
        print(f"{b:>6} " + " ".join(f"{grid[b, lr]['steps']:>5g}/{grid[b, lr]['examples']:<7g}" for lr in task.lrs))
    print(f"frontier (fastest run per batch: {', '.join(f'B={b} lr={lr:.4g}' for b, lr in front)}): "
          f"B_noise {fit.b_noise:.0f}, S_min {fit.s_min:.1f}, E_min {fit.e_min:.0f}, R^2 {fit.r2:.3f}")
    print(f"reference: batch {b_ref}, lr {lr_ref:.4g} (lambda {cost(grid[b_ref, lr_ref]['steps'], grid[b_ref, lr_ref]['examples'], fit.s_min, fit.e_min):.2f})")
    print(f"{'start':<20} {'setting':<18} {'fixed S/E (lambda)':<26} {'adapted S/E (lambda)':<26} {'lambda per seed':<22} {'dominated':<9} "
          f"{'steps vs frontier at equal E':<29} ends at")
    for name, (b, lr, fixed, adapted) in results.items():
        f, a = median_of(fixed), median_of(adapted)
        lam_f = cost(f["steps"], f["examples"], fit.s_min, fit.e_min)
        lam_a = cost(a["steps"], a["examples"], fit.s_min, fit.e_min)
        per_seed = ", ".join(f"{cost(r['steps'], r['examples'], fit.s_min, fit.e_min):.2f}" for r in adapted)
        dominated = a["steps"] > f["steps"] and a["examples"] > f["examples"]
        # the batch ramp: the adapted run's steps against the frontier's (the best fixed batch) at the same examples
        at_e = fit.s_min * (1 + 1 / (a["examples"] / fit.e_min - 1)) if math.isfinite(a["examples"]) and a["examples"] > fit.e_min else math.nan
        versus = f"{a['steps']:g} vs {at_e:.0f} ({a['steps'] / at_e - 1:+.0%})" if math.isfinite(at_e) else "-"
        print(f"{name:<20} {f'B={b} lr={lr:.3g}':<18} {f'''{f['steps']:g}/{f['examples']:g} ({lam_f:.2f})''':<26} "
              f"{f'''{a['steps']:g}/{a['examples']:g} ({lam_a:.2f})''':<26} {per_seed:<22} {'yes' if dominated else 'no':<9} "
              f"{versus:<29} batch {a['final_batch']:g}, lr {a['final_lr']:.3g}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        pts = [v for v in grid.values() if math.isfinite(v["steps"])]
        ax.scatter([v["examples"] for v in pts], [v["steps"] for v in pts], c="lightgray", s=12, label="fixed grid")
        e = torch.logspace(math.log10(fit.e_min * 1.05), math.log10(max(v["examples"] for v in pts) * 2), 100)
        ax.plot(e, fit.s_min * (1 + 1 / (e / fit.e_min - 1)), "k--", lw=1, label="frontier fit")
        for i, (name, (_, _, fixed, adapted)) in enumerate(results.items()):
            color = f"C{i}"
            f, a = median_of(fixed), median_of(adapted)
            if math.isfinite(f["steps"]):
                ax.scatter([f["examples"]], [f["steps"]], marker="o", facecolors="none", edgecolors=color)
            if math.isfinite(a["steps"]):
                ax.scatter([a["examples"]], [a["steps"]], marker="*", s=140, color=color, label=f"{name} (o: fixed)")
        ax.set(xscale="log", yscale="log", xlabel="examples to target", ylabel="steps to target", title=task.name)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
