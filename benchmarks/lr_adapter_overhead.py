"""Step time with LRAdapter's line search on top of GradNoiseMonitor, over the monitor alone.

    python benchmarks/lr_adapter_overhead.py [--steps 300] [--repeats 7] [--hidden 128]

The digits MLP of examples/digits_monitor.py, one CPU device, accumulate_grad_batches=4. The
line search needs every step (it pairs each step with the next), so steps cannot be interleaved
within one run as in monitor_overhead.py: fits with and without it alternate instead, and each
pair of fits gives a ratio of median step times. The table gives the median ratio over
``repeats`` pairs, with its range.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from digits_monitor import DigitsMLP, L, digits_loaders  # noqa: E402

from lightning_gradnoise import GradNoiseMonitor, LRAdapter  # noqa: E402


class StepTimer(L.Callback):
    """Wall time of each optimizer step after ``warmup`` steps."""

    def __init__(self, warmup: int = 20) -> None:
        self.warmup, self.last, self.times = warmup, None, []

    def on_before_zero_grad(self, trainer, pl_module, optimizer):
        now = time.perf_counter()
        if self.last is not None and trainer.global_step > self.warmup:
            self.times.append(now - self.last)
        self.last = now


def fit(with_lr_adapter: bool, steps: int, hidden: int) -> float:
    """Median step time in ms of one fit."""
    L.seed_everything(0, verbose=False)
    timer = StepTimer()
    callbacks = [timer, GradNoiseMonitor(statistics=("b_simple", "gr_s"), log_every_n_steps=51)]
    if with_lr_adapter:
        callbacks.append(LRAdapter())
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, accumulate_grad_batches=4, callbacks=callbacks,
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        num_sanity_val_steps=0, limit_val_batches=0,
    )
    train, _ = digits_loaders(16)
    trainer.fit(DigitsMLP(hidden=hidden, momentum=0.9), train)
    return statistics.median(timer.times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--hidden", type=int, default=128, help="width of the MLP's first layer (the demo model: 128)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    pairs = []
    for _ in range(args.repeats):
        base = fit(False, args.steps, args.hidden)
        pairs.append((fit(True, args.steps, args.hidden) / base, base))
    ratios = [r for r, _ in pairs]
    base = statistics.median(ms for _, ms in pairs)
    r = statistics.median(ratios)
    params = sum(p.numel() for p in DigitsMLP(hidden=args.hidden).parameters())
    print(f"\ndigits MLP (hidden {args.hidden}, {params} parameters), SGD momentum 0.9, 1 CPU device, accumulate_grad_batches=4, "
          f"micro-batch 16, {args.steps} steps x {args.repeats} pairs of fits (torch {torch.__version__})")
    print(f"monitor alone {base:.3f} ms/step; with LRAdapter x{r:.3f} ({min(ratios):.3f}-{max(ratios):.3f}), "
          f"{(r - 1) * base * 1e3:.0f} us/step")


if __name__ == "__main__":
    main()
