"""strategy="gnddp" + GradNoiseMonitor against plain DDP, two CPU processes (gloo).

    python benchmarks/ddp_overhead.py [--steps 200] [--repeats 5] [--accumulate 1] [--hidden 128]

Lightning launches the second process. Two kinds of figure, both from one invocation:

- monitor on/off, paired: in each fit the monitor is active on a fixed pseudo-random half of the
  optimizer steps (``_alternate.py``); the ratio is the median step with it over the median step
  without it, the steps of all fits pooled, with a 90% bootstrap interval. Where gnddp registers
  no communication hook (its default without a consumer of elementwise moments on every step),
  its unmonitored steps are plain DDP's, so this ratio is gnddp + monitor over plain ddp.
- gnddp (no monitor) over plain ddp: separate fits in one shuffled order, the ratio of medians
  (noise when both run DDP's built-in all-reduce). The product of the two is the last column.
- A null row: the alternation with nothing measured, the benchmark's own noise floor.

The bytes column is what each process sends into all-reduces per monitored step, on average:
the gradient (float32) and the monitor's moments (the elementwise ones packed with it under
gnddp, the per-step scalars summed over processes once per log).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
sys.path.insert(0, os.path.dirname(__file__))
from _alternate import build, monitored  # noqa: E402
from digits_monitor import DigitsMLP, L, digits_loaders  # noqa: E402

from lightning_gradnoise import GradNoiseMonitor  # noqa: E402

Alternating, StepTimes = build(L)

class _Null:
    """Receives the alternating hooks and does nothing: its on/off ratio is the benchmark's own
    noise floor (parity effects, drift within a fit)."""

    tracker = None

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


PAIRED = {
    "null (nothing measured: noise floor)": ("gnddp", "null"),
    "gnddp + scalar (b_simple, gr_s)": ("gnddp", dict(statistics=("b_simple", "gr_s"), log_every_n_steps=51)),
    "gnddp + gsnr, logged every 51 steps": ("gnddp", dict(statistics=("gsnr",), log_every_n_steps=51)),
    "gnddp + gsnr, logged every step": ("gnddp", dict(statistics=("gsnr",), log_every_n_steps=1)),
    "ddp + scalar (b_simple, gr_s)": ("ddp", dict(statistics=("b_simple", "gr_s"), log_every_n_steps=51)),
}


class Bytes(L.Callback):
    """Gradient bytes plus what the monitor added: packed into DDP's all-reduce (gnddp) or in
    its own all-reduce (plain ddp)."""

    def __init__(self, monitor: GradNoiseMonitor | None) -> None:
        self.monitor, self.values = monitor, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        comm = getattr(trainer.strategy, "gradnoise", None)
        extra = comm.last_packed_bytes if comm is not None else 0
        if self.monitor is not None and self.monitor.tracker is not None:
            extra += self.monitor.tracker.last_collective_bytes
        self.values.append(sum(p.numel() * p.element_size() for p in pl_module.parameters()) + extra)


def pooled_ratio(fits: list, resamples: int = 400) -> tuple[float, tuple[float, float]]:
    """Median monitored step over median unmonitored step, the steps of all fits pooled, and a 90%
    bootstrap interval (steps resampled within each fit, so each fit keeps its weight).

    A step here takes 1.7-11 ms (two processes sharing two cores): the median of one fit's few
    hundred steps moves by a few percent, so a single fit cannot resolve a 3% difference and the
    median of per-fit ratios is little better; pooled, it is about 1-2%."""
    on = [x for t in fits for x in t.on]
    off = [x for t in fits for x in t.off]
    ratio = statistics.median(on) / statistics.median(off)
    rng, boot = random.Random(0), []
    for _ in range(resamples):
        b_on = [x for t in fits for x in rng.choices(t.on, k=len(t.on))]
        b_off = [x for t in fits for x in rng.choices(t.off, k=len(t.off))]
        boot.append(statistics.median(b_on) / statistics.median(b_off))
    boot.sort()
    return ratio, (boot[int(0.05 * resamples)], boot[int(0.95 * resamples) - 1])


def fit(strategy: str, monitor_kwargs: dict | None, steps: int, accumulate: int, micro: int, hidden: int = 128):
    L.seed_everything(0, verbose=False)
    monitor = _Null() if monitor_kwargs == "null" else GradNoiseMonitor(**monitor_kwargs) if monitor_kwargs else None
    times, nbytes = StepTimes(warmup=10), Bytes(None if monitor_kwargs == "null" else monitor)
    callbacks = [times, nbytes] + ([Alternating(monitor)] if monitor else [])
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=steps, accumulate_grad_batches=accumulate,
        callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    train, _ = digits_loaders(micro)
    trainer.fit(DigitsMLP(hidden=hidden), train)
    on_bytes = [b for i, b in enumerate(nbytes.values) if monitored(i)]  # the monitored steps
    return times, statistics.mean(on_bytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=128, help="width of the MLP's first layer (the demo model: 128)")
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--micro-batch", type=int, default=32)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rank0 = int(os.environ.get("LOCAL_RANK", "0")) == 0
    run = lambda strategy, kw: fit(strategy, kw, args.steps, args.accumulate, args.micro_batch, args.hidden)  # noqa: E731
    # round robin over the configurations, so that the machine's slow drift falls on all alike
    paired: dict[str, list] = {name: [] for name in PAIRED}
    for _ in range(args.repeats):
        for name, cfg in PAIRED.items():
            paired[name].append(run(*cfg))
    order, rng = ["ddp", "gnddp"] * args.repeats, random.Random(0)  # the same order on both ranks
    rng.shuffle(order)
    alone: dict[str, list[float]] = {"ddp": [], "gnddp": []}
    for strategy in order:
        times, nbytes = run(strategy, None)
        alone[strategy].append(statistics.median(times.on + times.off))
        plain_bytes = nbytes
    if not rank0:
        return
    ratio_strategy = statistics.median(alone["gnddp"]) / statistics.median(alone["ddp"])
    params = sum(p.numel() for p in DigitsMLP(hidden=args.hidden).parameters())
    print(f"\ndigits MLP (hidden {args.hidden}, {params} parameters), 2 CPU processes (gloo), micro-batch {args.micro_batch}, accumulate {args.accumulate}, "
          f"{args.steps} steps x {args.repeats} fits (torch {torch.__version__})")
    print(f"plain ddp: {statistics.median(alone['ddp']) * 1e3:.3f} ms/step, {plain_bytes:.0f} bytes/step; "
          f"gnddp without monitor / ddp: {ratio_strategy:.3f}")
    print(f"{'configuration':<38} {'on/off':>7} {'(90% CI)':>13} {'x gnddp/ddp':>12} {'bytes/step':>11} {'extra us/step':>14}")
    for name, results in paired.items():
        r, (lo, hi) = pooled_ratio([t for t, _ in results])
        total = r * ratio_strategy if name.startswith("gnddp") else r
        off_ms = statistics.median(t.off_ms() for t, _ in results)
        spread = f"{lo:.3f}-{hi:.3f}"
        print(f"{name:<38} {r:>7.3f} {spread:>13} {total:>12.3f} {statistics.mean(b for _, b in results):>11.0f} {(r - 1) * off_ms * 1e3:>14.0f}")


if __name__ == "__main__":
    main()
