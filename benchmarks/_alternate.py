"""Paired timing inside one run: a callback whose hooks reach the monitor on half of the steps.

On a shared machine the speed drifts by more than the few percent being measured; steps with and
without the monitor, interleaved in the same process, see the same drift, so the ratio of their
medians is stable where the ratio of two separate runs is not. The monitored half is a fixed
pseudo-random choice of steps (the same on every process), not every other step: two DDP
processes settle into a period-two rhythm (one waits on even steps, the other on odd ones),
which strict alternation would read as a difference of up to 10% with nothing measured.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

__all__ = ["build", "monitored"]

_rng = random.Random(0)
_BITS = bytes(_rng.getrandbits(1) for _ in range(1 << 16))


def monitored(step: int) -> bool:
    """Whether optimizer step ``step`` is a monitored one: a fixed pseudo-random half of the steps."""
    return _BITS[step % len(_BITS)] == 1


_HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step")


def _make_alternating(base: type) -> type:
    class Alternating(base):
        """Forwards set-up and the per-step hooks to ``inner`` on odd optimizer steps only."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def setup(self, trainer, pl_module, stage):
            self.inner.setup(trainer, pl_module, stage)

        def on_train_start(self, trainer, pl_module):
            self.inner.on_train_start(trainer, pl_module)

        def on_train_end(self, trainer, pl_module):
            self.inner.on_train_end(trainer, pl_module)

    for hook in _HOOKS:
        def forward(self, trainer, *args, _hook=hook):
            if monitored(trainer.global_step):
                getattr(self.inner, _hook)(trainer, *args)
        setattr(Alternating, hook, forward)
    return Alternating


def _make_step_times(base: type) -> type:
    class StepTimes(base):
        """Wall time of each optimizer step after ``warmup``, split by step parity."""

        def __init__(self, warmup: int = 10) -> None:
            self.warmup, self.last, self.on, self.off = warmup, None, [], []

        def on_before_zero_grad(self, trainer, pl_module, optimizer):
            # once per optimizer step, before the step's first backward: the previous step ended
            now = time.perf_counter()
            done = trainer.global_step - 1
            if self.last is not None and done >= self.warmup:
                (self.on if monitored(done) else self.off).append(now - self.last)
            self.last = now

        def ratio(self) -> float:
            return statistics.median(self.on) / statistics.median(self.off)

        def off_ms(self) -> float:
            return statistics.median(self.off) * 1e3

    return StepTimes


def build(L: Any) -> tuple[type, type]:
    return _make_alternating(L.Callback), _make_step_times(L.Callback)
