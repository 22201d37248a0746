"""Step time with GradNoiseMonitor divided by step time without it, measured in one run.

    python benchmarks/monitor_overhead.py [--steps 150] [--repeats 5] [--accumulate 4]

The digits MLP of examples/digits_monitor.py, one CPU device, accumulate_grad_batches=4. Each
configuration is fitted ``repeats`` times, interleaved with the baseline so that drifts in machine
speed hit all alike; each optimizer step after the warm-up is timed, a run counts the median step, and the ratio of
the medians over runs (run in a shuffled order) is printed.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from digits_monitor import DigitsMLP, L, digits_loaders  # noqa: E402

from lightning_gradnoise import GradNoiseMonitor  # noqa: E402

CONFIGS = {
    "scalar (b_simple, gr_s)": dict(statistics=("b_simple", "gr_s"), log_every_n_steps=50),
    "gr_t": dict(statistics=("gr_t",), log_every_n_steps=50),
    "gsnr, logged every 50 steps": dict(statistics=("gsnr",), log_every_n_steps=50),
    "gsnr, logged every step": dict(statistics=("gsnr",), log_every_n_steps=1),
    "all four, logged every 50 steps": dict(statistics="all", log_every_n_steps=50),
}


class StepTimer(L.Callback):
    """Wall time of every optimizer step after the warm-up; a run's figure is their median,
    which a stray pause of the machine does not move."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.last, self.durations = warmup, None, []

    def on_before_zero_grad(self, trainer, pl_module, optimizer) -> None:
        # called once per optimizer step, before the step's first backward
        now = time.perf_counter()
        if self.last is not None and trainer.global_step > self.warmup:
            self.durations.append(now - self.last)
        self.last = now

    def per_step(self) -> float:
        return statistics.median(self.durations)


def time_fit(monitor_kwargs: dict | None, steps: int, accumulate: int, micro: int) -> float:
    L.seed_everything(0, verbose=False)
    timer = StepTimer(warmup=10)
    callbacks = [timer] + ([GradNoiseMonitor(**monitor_kwargs)] if monitor_kwargs is not None else [])
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    train, _ = digits_loaders(micro)
    trainer.fit(DigitsMLP(), train)
    return timer.per_step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--accumulate", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=16)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {"baseline": [], **{name: [] for name in CONFIGS}}
    order = [("baseline", None), *CONFIGS.items()]
    rng = random.Random(0)
    for _ in range(args.repeats):
        rng.shuffle(order)  # no configuration always runs first, or right after another
        for name, kw in order:
            times[name].append(time_fit(kw, args.steps, args.accumulate, args.micro_batch))
    base = statistics.median(times["baseline"])
    print(f"\ndigits MLP, 1 CPU device, accumulate_grad_batches={args.accumulate}, micro-batch {args.micro_batch}, "
          f"{args.steps} steps x {args.repeats} repeats (torch {torch.__version__})")
    print(f"{'configuration':<34} {'ms/step':>8} {'ratio':>7}")
    print(f"{'baseline (no monitor)':<34} {base * 1e3:>8.3f} {1.0:>7.3f}")
    for name in CONFIGS:
        t = statistics.median(times[name])
        print(f"{name:<34} {t * 1e3:>8.3f} {t / base:>7.3f}")


if __name__ == "__main__":
    main()
