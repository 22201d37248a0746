"""Decisions of the auto-tuning callbacks as plain objects: state in, decision out (no Lightning).

Batch size steers :math:`GR_S` into a band (GR-Gauge App. E: [0.5, 0.65]); :math:`GR_S` falls as
the batch grows (Theorem 2). The learning rate steers :math:`GR_T` toward a target (about 20,
App. E); :math:`GR_T` rises with the learning rate (Theorem 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lightning_gradnoise.stats import GR_S_BAND, GR_T_TARGET, batch_range_for_gr_s, check_band

__all__ = ["Decision", "BatchSizeController", "LRController", "lr_rule_for", "ADAM_STYLE", "SGD_STYLE"]

ADAM_STYLE = ("adam", "adamw", "nadam", "radam", "adamax", "lamb", "adafactor", "vradam", "vradamw", "vrlamb", "lion")
SGD_STYLE = ("sgd", "lars", "vrsgd", "vrmomentum", "vrlars", "rmsprop", "adagrad")


def lr_rule_for(optimizer: Any) -> str:
    """``"adam"`` (surge rule) or ``"sgd"`` (McCandlish rule) from the optimizer's class and its bases.

    Raises ``ValueError`` for an optimizer it cannot place: pass the rule explicitly then."""
    for cls in type(optimizer).__mro__:
        name = cls.__name__.lower()
        if name in ADAM_STYLE:
            return "adam"
        if name in SGD_STYLE:
            return "sgd"
    raise ValueError(
        f"cannot tell whether {type(optimizer).__name__} scales like SGD or like Adam: pass lr_rule='sgd' or lr_rule='adam'"
    )


@dataclass
class Decision:
    value: float
    changed: bool
    reason: str


@dataclass
class BatchSizeController:
    r"""Keeps :math:`GR_S` in ``band`` by doubling or halving the global batch.

    The batch is ``unit`` (micro-batch x devices) times a power of two (the accumulation), between
    ``min_batch`` and ``max_batch``. It moves only when :math:`GR_S` leaves the band widened by
    ``hysteresis`` on each side, by one doubling or halving per decision, and then waits
    ``cooldown`` optimizer steps (the EMAs need time to see the new batch).

    Example:
        >>> c = BatchSizeController(unit=32, min_batch=32, max_batch=1024)
        >>> c.decide(gr_s=0.9, batch=64, step=100).value    # too redundant: too small a batch
        128.0
    """

    unit: int
    min_batch: int
    max_batch: int
    band: tuple[float, float] = GR_S_BAND
    hysteresis: float = 0.02
    cooldown: int = 50
    last_change: int = 0  # the first decision waits one cooldown: the EMAs need steps first

    def __post_init__(self) -> None:
        self.band = check_band(self.band)
        if not (isinstance(self.unit, int) and self.unit >= 1):
            raise ValueError(f"unit={self.unit!r} must be an int >= 1 (micro-batch x devices)")
        if not (self.unit <= self.min_batch <= self.max_batch):
            raise ValueError(f"min_batch={self.min_batch!r}, max_batch={self.max_batch!r}: need unit ({self.unit}) <= min_batch <= max_batch")
        if not (0 <= self.hysteresis < (self.band[1] - self.band[0])):
            raise ValueError(f"hysteresis={self.hysteresis!r} must be >= 0 and below the band's width")
        if not (isinstance(self.cooldown, int) and self.cooldown >= 0):
            raise ValueError(f"cooldown={self.cooldown!r} must be an int >= 0")

    def decide(self, gr_s: float, batch: float, step: int) -> Decision:
        low, high = self.band
        if not math.isfinite(gr_s):
            return Decision(batch, False, "no GR_S estimate yet")
        if step - self.last_change < self.cooldown:
            return Decision(batch, False, f"cooldown until step {self.last_change + self.cooldown}")
        if gr_s > high + self.hysteresis:
            new = min(batch * 2, self.max_batch)
            why = f"GR_S {gr_s:.3f} above {high}: gradients redundant within the batch, double it"
        elif gr_s < low - self.hysteresis:
            new = max(batch / 2, self.min_batch)
            why = f"GR_S {gr_s:.3f} below {low}: past the critical batch, halve it"
        else:
            return Decision(batch, False, f"GR_S {gr_s:.3f} in band")
        new = float(self.unit * 2 ** round(math.log2(max(new / self.unit, 1))))
        if new == batch:
            return Decision(batch, False, why + f", but the batch is at its bound {batch:.0f}")
        self.last_change = step
        return Decision(new, True, why + f": {batch:.0f} -> {new:.0f}")

    def target_range(self, b_simple: float) -> tuple[float, float]:
        """The batch range of the band for the current :math:`B_\\text{simple}` (Lemma 2)."""
        return batch_range_for_gr_s(b_simple, self.band)

    def state_dict(self) -> dict[str, Any]:
        return {"last_change": self.last_change}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_change = int(state["last_change"])


@dataclass
class LRController:
    r"""Moves a learning-rate multiplier toward :math:`GR_T \approx` ``target``.

    Above ``target * tolerance`` the multiplier shrinks by ``step_factor``, below
    ``target / tolerance`` it grows by it (never past ``[min_scale, max_scale]``), then waits
    ``cooldown`` optimizer steps.

    Example:
        >>> c = LRController()
        >>> c.decide(gr_t=60.0, scale=1.0, step=100).value   # GR_T too high: learning rate too high
        0.8
    """

    target: float = GR_T_TARGET
    tolerance: float = 1.5
    step_factor: float = 1.25
    cooldown: int = 50
    min_scale: float = 1e-3
    max_scale: float = 1e3
    last_change: int = 0  # the first decision waits one cooldown: the EMAs need steps first

    def __post_init__(self) -> None:
        if not self.target > 1:
            raise ValueError(f"target={self.target!r} must be > 1 (GR_T >= 1 always)")
        if not self.tolerance > 1:
            raise ValueError(f"tolerance={self.tolerance!r} must be > 1")
        if not self.step_factor > 1:
            raise ValueError(f"step_factor={self.step_factor!r} must be > 1")
        if not (0 < self.min_scale <= 1 <= self.max_scale):
            raise ValueError(f"min_scale={self.min_scale!r}, max_scale={self.max_scale!r}: need 0 < min_scale <= 1 <= max_scale")
        if not (isinstance(self.cooldown, int) and self.cooldown >= 0):
            raise ValueError(f"cooldown={self.cooldown!r} must be an int >= 0")

    def decide(self, gr_t: float, scale: float, step: int) -> Decision:
        if not math.isfinite(gr_t):
            return Decision(scale, False, "no GR_T estimate yet")
        if step - self.last_change < self.cooldown:
            return Decision(scale, False, f"cooldown until step {self.last_change + self.cooldown}")
        if gr_t > self.target * self.tolerance:
            new, why = scale / self.step_factor, f"GR_T {gr_t:.1f} above {self.target:g}: lower the learning rate"
        elif gr_t < self.target / self.tolerance:
            new, why = scale * self.step_factor, f"GR_T {gr_t:.1f} below {self.target:g}: raise the learning rate"
        else:
            return Decision(scale, False, f"GR_T {gr_t:.1f} near {self.target:g}")
        new = min(max(new, self.min_scale), self.max_scale)
        if new == scale:
            return Decision(scale, False, why + ", but the scale is at its bound")
        self.last_change = step
        return Decision(new, True, why + f": x{new / scale:.3g}")

    def state_dict(self) -> dict[str, Any]:
        return {"last_change": self.last_change}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_change = int(state["last_change"])
