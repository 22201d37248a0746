"""Step time with GradNoiseMonitor in per-example mode over step time without it, in one run.

    python benchmarks/per_example_overhead.py [--steps 150] [--repeats 3] [--models digits,charlm]

One CPU device, accumulate_grad_batches=1 (the set-up where the monitor measures per example).
Models: the digits MLP of examples/digits_monitor.py (SGD with momentum, batch 64) and a small
character-level transformer language model (embedding, 2 blocks of attention with q/k/v/o
projections, MLP, LayerNorm, tied output head; AdamW; batches of 32 sequences of 64 characters
from the text of ``pydoc_data.topics``, which ships with Python). As in monitor_overhead.py the
monitor sees a fixed pseudo-random half of the steps (its forward hooks too), so steps with and
without it interleave in the same process; a fit's ratio is the median monitored step over the
median other step (the means where only one measured step in 4 does the work), and the table
gives the median over ``repeats`` fits. Also: the time spent in
the per-example norms per layer type (ms per monitored step), and a variant that measures only
the normalization layers' parameters.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections import defaultdict

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
sys.path.insert(0, os.path.dirname(__file__))
from _alternate import build, monitored  # noqa: E402
from digits_monitor import DigitsMLP, L, digits_loaders  # noqa: E402

from lightning_gradnoise import GradNoiseMonitor  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _charlm import CharLM, char_data  # noqa: E402
from lightning_gradnoise.capture import PerExampleCollector  # noqa: E402

Alternating, StepTimes = build(L)
LAYER_TIME: dict[str, float] = defaultdict(float)


def _timed(fn):
    def wrapper(self, module, x, grad):
        start = time.perf_counter()
        fn(self, module, x, grad)
        LAYER_TIME[type(module).__name__] += time.perf_counter() - start

    return wrapper


PerExampleCollector._on_output_grad = _timed(PerExampleCollector._on_output_grad)


def charlm_loader(batch: int, seq: int = 64) -> tuple[DataLoader, int]:
    ids, vocab = char_data(seq)
    x = ids[:-1].view(-1, seq)
    y = ids[1:].view(-1, seq)
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, generator=g, drop_last=True), vocab


class NormsOnly(GradNoiseMonitor):
    """The variant that measures only the normalization layers' parameters."""

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        pairs = [(n, p) for n, p in pl_module.named_parameters()
                 if isinstance(pl_module.get_submodule(n.rsplit(".", 1)[0]) if "." in n else pl_module, (nn.LayerNorm, nn.RMSNorm))]
        self.tracker.detach()
        self.tracker.collector = PerExampleCollector(pl_module, params=pairs).attach()


class Gate(L.Callback):
    """Hooks the forward passes of the monitored steps only."""

    def __init__(self, monitor: GradNoiseMonitor) -> None:
        self.monitor = monitor

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.monitor.tracker is not None:
            self.monitor.tracker.collector.enabled = monitored(trainer.global_step)


def paired_fit(model_name: str, monitor_cls: type, steps: int, every: int) -> tuple[float, float]:
    """(ratio on/off, ms per step without): medians with every=1, means otherwise (only one
    monitored step in ``every`` does the work, so a median would hide it)."""
    L.seed_everything(0, verbose=False)
    times = StepTimes(warmup=10)
    monitor = monitor_cls(statistics=("b_simple", "gr_s"), log_every_n_steps=51, per_example_every=every)
    if model_name == "digits":
        model, loader = DigitsMLP(), digits_loaders(64)[0]
    else:
        loader, vocab = charlm_loader(32)
        model = CharLM(vocab)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, callbacks=[times, Gate(monitor), Alternating(monitor)],
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(model, loader)
    if every == 1:
        return times.ratio(), times.off_ms()
    return statistics.mean(times.on) / statistics.mean(times.off), times.off_ms()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="digits,charlm")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    print(f"one CPU device, accumulate_grad_batches=1, {args.steps} steps x {args.repeats} fits (torch {torch.__version__})")
    print(f"{'model':<8} {'measured':<40} {'ms/step without':>16} {'ratio':>7}  (min-max)      per-example norms, ms per measured step")
    variants = (("every covered layer, every step", GradNoiseMonitor, 1),
                ("every covered layer, 1 step in 4 (default)", GradNoiseMonitor, 4),
                ("normalization layers only, every step", NormsOnly, 1))
    for name in args.models.split(","):
        for label, cls, every in variants:
            if name == "digits" and cls is NormsOnly:
                continue  # no normalization layer
            LAYER_TIME.clear()
            rs = [paired_fit(name, cls, args.steps, every) for _ in range(args.repeats)]
            monitored_steps = args.repeats * sum(monitored(s) and (s % 51 == 0 or s % every == 0) for s in range(args.steps))
            ratios = [r for r, _ in rs]
            per_type = ", ".join(f"{t} {1e3 * v / monitored_steps:.2f}" for t, v in sorted(LAYER_TIME.items(), key=lambda kv: -kv[1]))
            print(f"{name:<8} {label:<40} {statistics.median(ms for _, ms in rs):>16.2f} {statistics.median(ratios):>7.3f}  "
                  f"({min(ratios):.3f}-{max(ratios):.3f})  {per_type}")


if __name__ == "__main__":
    main()
