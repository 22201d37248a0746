"""Decisions of the auto-tuning callbacks as plain objects: state in, decision out (no Lightning).

Batch size steers :math:`GR_S` into a band (GR-Gauge App. E: [0.5, 0.65]); :math:`GR_S` falls as
the batch grows (Theorem 2). The learning rate steers :math:`GR_T` toward a target (about 20,
App. E); :math:`GR_T` rises with the learning rate (Theorem 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lightning_gradnoise._validate import check_bool, check_int, check_number, check_numbers, fail
from lightning_gradnoise.stats import GR_S_BAND, GR_T_TARGET, batch_range_for_gr_s, check_band, ema_effective_steps, gr_t_expected
from lightning_gradnoise.stats import gr_s as gr_s_at

__all__ = ["Decision", "BatchSizeController", "LRController", "gr_t_target", "lr_rule_for", "ADAM_STYLE", "SGD_STYLE"]

ADAM_STYLE = ("adam", "adamw", "nadam", "radam", "adamax", "lamb", "adafactor", "vradam", "vradamw", "vrlamb", "lion")
SGD_STYLE = ("sgd", "lars", "vrsgd", "vrmomentum", "vrlars", "rmsprop", "adagrad")


def lr_rule_for(optimizer: Any) -> str:
    """``"adam"`` (surge rule) or ``"sgd"`` (McCandlish rule) from the optimizer's class and its bases.

    Raises ``ValueError`` for an optimizer it cannot place: pass the rule explicitly then."""
    if not (hasattr(optimizer, "param_groups") and hasattr(optimizer, "step")):
        fail("optimizer", optimizer, "a torch optimizer (with param_groups and step)", TypeError)
    for cls in type(optimizer).__mro__:
        name = cls.__name__.lower()
        if name in ADAM_STYLE:
            return "adam"
        if name in SGD_STYLE:
            return "sgd"
    raise ValueError(
        f"optimizer={type(optimizer).__name__}: cannot tell whether it scales like SGD or like Adam: pass lr_rule='sgd' or lr_rule='adam'"
    )


@dataclass
class Decision:
    value: float
    changed: bool
    reason: str


@dataclass
class BatchSizeController:
    r"""Keeps :math:`GR_S` in ``band`` by multiplying or dividing the global batch by powers of two.

    The batch is ``unit`` (micro-batch x devices) times a power of two (the accumulation), between
    ``min_batch`` and ``max_batch``. It moves only when :math:`GR_S` leaves the band widened by
    ``hysteresis`` on each side, and then waits ``cooldown`` optimizer steps (the EMAs need time
    to see the new batch). Given :math:`B_\text{simple}` the move goes straight to the batch whose
    :math:`GR_S = (1 + B_\text{simple})/(B + B_\text{simple})` (GR-Gauge Lemma 2) is nearest the
    band's middle, at most ``max_factor`` times larger or smaller per decision (by default 2: one
    doubling or halving, since early estimates of :math:`B_\text{simple}` can be far off);
    without it, one doubling or halving.

    Examples:
        >>> c = BatchSizeController(unit=32, min_batch=32, max_batch=1024)
        >>> c.decide(gr_s=0.9, batch=64, step=100).value    # too redundant: too small a batch
        128.0
        >>> c = BatchSizeController(unit=32, min_batch=32, max_batch=1024, max_factor=8)
        >>> c.decide(gr_s=0.9, batch=64, step=100, b_simple=600.0).value   # band: B in [324, 600]
        512.0
    """

    unit: int
    min_batch: int
    max_batch: int
    band: tuple[float, float] = GR_S_BAND
    hysteresis: float = 0.02
    cooldown: int = 50
    max_factor: int = 2
    last_change: int = 0  # the first decision waits one cooldown: the EMAs need steps first

    def __post_init__(self) -> None:
        self.band = check_band(self.band)
        self.unit = check_int("unit", self.unit, low=1)
        self.min_batch = check_int("min_batch", self.min_batch, low=self.unit)
        self.max_batch = check_int("max_batch", self.max_batch, low=1)
        if self.max_batch < self.min_batch:
            raise ValueError(f"min_batch={self.min_batch!r}, max_batch={self.max_batch!r} are invalid: expected "
                             f"unit ({self.unit}) <= min_batch <= max_batch")
        self.hysteresis = check_number("hysteresis", self.hysteresis, low=0, high=self.band[1] - self.band[0], high_open=True)
        self.cooldown = check_int("cooldown", self.cooldown, low=0)
        self.last_change = check_int("last_change", self.last_change, low=0)
        if not (isinstance(self.max_factor, int) and not isinstance(self.max_factor, bool)):
            fail("max_factor", self.max_factor, "a power of two >= 2", TypeError)
        if not (self.max_factor >= 2 and not self.max_factor & (self.max_factor - 1)):
            fail("max_factor", self.max_factor, "a power of two >= 2")

    def decide(self, gr_s: float, batch: float, step: int, b_simple: float | None = None,
               interval: tuple[float, float] | None = None, may_shrink: bool = True) -> Decision:
        r"""The batch for the next steps, from the current :math:`GR_S` (and :math:`B_\text{simple}`,
        which says how far to go). A NaN ``gr_s`` means no estimate yet.

        ``interval``, :math:`GR_S`'s interval ``(low, high)``: the batch then moves only when the
        whole interval lies outside the band (above it to grow, below it to shrink), so a reading
        that cannot tell which side of the band the batch is on moves nothing.

        ``may_shrink=False`` holds a batch that reads past its critical size: the caller knows the
        reading is not about the batch (a learning rate too large makes the gradients oscillate,
        which reads as signal and a low :math:`GR_S`)."""
        gr_s = check_number("gr_s", gr_s, low=0, high=1, nan_ok=True)
        batch = check_number("batch", batch, low=0, low_open=True)
        may_shrink = check_bool("may_shrink", may_shrink)
        check_int("step", step, low=0)
        if b_simple is not None:
            check_number("b_simple", b_simple, low=0, finite=False, nan_ok=True)
        if interval is not None:
            interval = tuple(check_numbers("interval", interval, length=2, low=0, high=1))  # type: ignore[assignment]
        low, high = self.band
        if not math.isfinite(gr_s):
            return Decision(batch, False, "no GR_S estimate yet")
        if step - self.last_change < self.cooldown:
            return Decision(batch, False, f"cooldown until step {self.last_change + self.cooldown}")
        shown = f"GR_S {gr_s:.3f}" + (f" (interval {interval[0]:.3f}-{interval[1]:.3f})" if interval else "")
        if gr_s > high + self.hysteresis and (interval is None or interval[0] > high):
            up, why = True, f"{shown} above {high}: gradients redundant within the batch, grow it"
        elif gr_s < low - self.hysteresis and (interval is None or interval[1] < low):
            if not may_shrink:
                return Decision(batch, False, f"{shown} below {low}, but the training loss is not falling: hold the batch")
            up, why = False, f"{shown} below {low}: past the critical batch, shrink it"
        elif interval is not None and not (low <= gr_s <= high):
            return Decision(batch, False, f"{shown}: the interval reaches into the band, wait")
        else:
            return Decision(batch, False, f"{shown} in band")
        new = self._next(batch, up, b_simple)
        if new is None:
            return Decision(batch, False, why + f", but the batch is at its bound {batch:.0f}")
        self.last_change = step
        return Decision(new, True, why + f": {batch:.0f} -> {new:.0f}")

    def decide_from_noise_scale(self, b_simple: float | None, batch: float, step: int,
                                interval: tuple[float, float] | None = None, may_shrink: bool = True) -> Decision:
        r""":meth:`decide` with :math:`GR_S` computed at ``batch`` from :math:`B_\text{simple}`
        (Lemma 2): the configured batch, not the batch of the step that was measured (a short
        last accumulation window of an epoch would read as a spike of :math:`GR_S`).
        ``interval`` is :math:`B_\text{simple}`'s ``(low, high)``; it maps to :math:`GR_S`'s at
        ``batch`` (GR_S rises with B_simple), on which the decision then rests."""
        if b_simple is None or not math.isfinite(b_simple) or b_simple < 0:
            # NaN or negative: |G|^2 not yet resolved from zero, no estimate to act on
            return Decision(batch, False, "no B_simple estimate yet")
        gr_interval = None
        if interval is not None:
            lo, hi = interval
            if not (math.isfinite(lo) and math.isfinite(hi)):
                return Decision(batch, False, "B_simple's interval is not bounded yet")
            gr_interval = (float(gr_s_at(max(lo, 0.0), batch)), float(gr_s_at(max(hi, 0.0), batch)))
        return self.decide(float(gr_s_at(b_simple, batch)), batch, step, b_simple, gr_interval, may_shrink)

    def _next(self, batch: float, up: bool, b_simple: float | None) -> float | None:
        """The allowed batch strictly on the ``up`` side of ``batch``, within ``max_factor``: one
        in the band's batch range if there is one, the nearest (in log) to the range's middle."""
        lo, hi = 0.0, math.inf
        aim = batch * 2 if up else batch / 2
        if b_simple is not None and math.isfinite(b_simple) and b_simple > 0:
            lo, hi = batch_range_for_gr_s(b_simple, self.band)
            aim = math.sqrt(max(lo, 1.0) * max(hi, 1.0))
        reach = (batch, batch * self.max_factor) if up else (batch / self.max_factor, batch)
        allowed = [
            b for b in (self.unit * 2**n for n in range(64))
            if self.min_batch <= b <= self.max_batch and reach[0] <= b <= reach[1] and b != batch
        ]
        if not allowed:
            return None
        pool = [b for b in allowed if lo <= b <= hi] or allowed
        return float(min(pool, key=lambda b: abs(math.log(b / aim))))

    def target_range(self, b_simple: float) -> tuple[float, float]:
        """The batch range of the band for the current :math:`B_\\text{simple}` (Lemma 2)."""
        return batch_range_for_gr_s(b_simple, self.band)

    def state_dict(self) -> dict[str, Any]:
        return {"last_change": self.last_change}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_change = int(state["last_change"])


def gr_t_target(mu_over_b: float, beta: float = 0.9) -> float:
    r"""The :math:`GR_T` to expect at the SGD-optimal learning rate, for :math:`r = \mu/B`.

    GR-Gauge's "about 20" is Lemma 1 (Eq. 19) at :math:`B = \mu` and :math:`\bar\lambda\eta = 1/2`.
    That :math:`\eta` is McCandlish's optimum (Eq. 2.7, :math:`\epsilon_\text{max} = 1/\bar\lambda`)
    at :math:`B = B_\text{noise}`; at any batch the optimum is :math:`\bar\lambda\eta = 1/(1+r)`,
    and Eq. 19 there gives the target (capped to Eq. 19's domain, :math:`\bar\lambda\eta \le (1+r)/2`,
    below :math:`r \approx 0.41`). It stays between about 5 (:math:`r \to 0`) and 50
    (:math:`r = 20`), where Eq. 19 at a fixed :math:`\bar\lambda\eta = 1/2` spans 5 to thousands.

    Examples:
        >>> round(gr_t_target(1.0), 1)    # B = mu: the paper's value
        23.0
        >>> round(gr_t_target(4.0), 1)    # B = mu / 4
        36.8
    """
    mu_over_b = check_number("mu_over_b", mu_over_b, low=0)
    x = min(1.0 / (1.0 + mu_over_b), (1.0 + mu_over_b) / 2.0)
    return float(gr_t_expected(mu_over_b, x, beta))


@dataclass
class LRController:
    r"""Moves a learning-rate multiplier toward :math:`GR_T \approx` ``target``.

    ``target="auto"`` takes the target from the current :math:`r = B_\text{simple}/B` instead
    (:func:`gr_t_target`: Lemma 1 at the SGD-optimal learning rate for that batch), which
    :meth:`decide` then needs as ``mu_over_b``.

    Outside ``[target / tolerance, target * tolerance]`` the multiplier changes by
    :math:`(\text{target}/GR_T)^\text{gain}`, bounded to ``[1/step_factor, step_factor]`` per
    decision (:math:`GR_T` rises with the learning rate, GR-Gauge Theorem 1, so the move is the
    right way; the power keeps it proportional to how far off :math:`GR_T` is), never past
    ``[min_scale, max_scale]``, then waits ``cooldown`` optimizer steps.

    Examples:
        >>> c = LRController()
        >>> c = LRController(step_factor=2.0)
        >>> c.decide(gr_t=80.0, scale=1.0, step=100).value   # GR_T 4x too high: learning rate / 2
        0.5
        >>> LRController(target="auto").decide(gr_t=20.0, scale=1.0, step=100, mu_over_b=4.0).reason
        'GR_T 20.0 below 36.8: raise the learning rate: x1.36'
    """

    target: float | str = GR_T_TARGET
    tolerance: float = 1.5
    step_factor: float = 1.5
    cooldown: int = 50
    min_scale: float = 1e-3
    max_scale: float = 1e3
    gain: float = 0.5
    beta: float = 0.9  # GR_T's EMA decay: for target="auto" and the age discount
    last_change: int = 0  # the first decision waits one cooldown: the EMAs need steps first

    def __post_init__(self) -> None:
        if self.target != "auto":
            if not isinstance(self.target, (int, float, str)) or isinstance(self.target, bool):
                fail("target", self.target, "a finite number > 1 (GR_T >= 1 always) or 'auto'", TypeError)
            if isinstance(self.target, str):
                fail("target", self.target, "a finite number > 1 (GR_T >= 1 always) or 'auto'")
            self.target = check_number("target", self.target, low=1, low_open=True)
        self.beta = check_number("beta", self.beta, low=0, low_open=True, high=1, high_open=True)
        self.tolerance = check_number("tolerance", self.tolerance, low=1, low_open=True)
        self.step_factor = check_number("step_factor", self.step_factor, low=1, low_open=True)
        self.gain = check_number("gain", self.gain, low=0, low_open=True)
        self.min_scale = check_number("min_scale", self.min_scale, low=0, low_open=True, high=1)
        self.max_scale = check_number("max_scale", self.max_scale, low=1)
        self.cooldown = check_int("cooldown", self.cooldown, low=0)
        self.last_change = check_int("last_change", self.last_change, low=0)

    def decide(self, gr_t: float, scale: float, step: int, mu_over_b: float | None = None, age: int | None = None,
               interval: tuple[float, float] | None = None) -> Decision:
        r"""The multiplier for the next steps, from the current :math:`GR_T` (and, for
        ``target="auto"``, :math:`r = B_\text{simple}/B`).

        ``age``: how many steps :math:`GR_T`'s EMAs have seen. A young EMA reads low whatever the
        learning rate (:func:`~lightning_gradnoise.stats.gr_t_frozen`: with pure noise it reads
        :math:`n_t`, the EMA's effective number of steps, about 9.2 after 10 steps), so the
        target is scaled by :math:`n_t / n_\infty` (:func:`~lightning_gradnoise.stats.ema_effective_steps`),
        the noise-dominated limit where :math:`GR_T` near its target lives. Without it, early
        decisions raise the learning rate on a reading that says nothing about it. A NaN
        ``gr_t`` means no estimate yet.

        ``interval``, :math:`GR_T`'s ``(low, high)``: the rate then moves only when the whole
        interval lies outside the tolerance band around the target (above it to lower the rate,
        below it to raise it); an unbounded or NaN interval says nothing yet."""
        gr_t = check_number("gr_t", gr_t, low=0, finite=False, nan_ok=True)
        scale = check_number("scale", scale, low=0, low_open=True)
        check_int("step", step, low=0)
        if mu_over_b is not None:
            check_number("mu_over_b", mu_over_b, low=0, finite=False, nan_ok=True)
        if age is not None:
            check_int("age", age, low=0)
        if interval is not None:
            interval = tuple(check_numbers("interval", interval, length=2, low=0, finite=False, nan_ok=True))  # type: ignore[assignment]
        if not math.isfinite(gr_t) or gr_t <= 0:
            return Decision(scale, False, "no GR_T estimate yet")
        if step - self.last_change < self.cooldown:
            return Decision(scale, False, f"cooldown until step {self.last_change + self.cooldown}")
        if self.target == "auto":
            if mu_over_b is None or not (math.isfinite(mu_over_b) and mu_over_b >= 0):
                return Decision(scale, False, "no B_simple estimate yet for GR_T's target")
            target = gr_t_target(mu_over_b, self.beta)
        else:
            target = float(self.target)
        if age is not None:
            target *= ema_effective_steps(self.beta, max(int(age), 1)) / ema_effective_steps(self.beta)
        shown = f"GR_T {gr_t:.1f}" + (f" (interval {interval[0]:.3g}-{interval[1]:.3g})" if interval else "")
        if interval is not None and not all(math.isfinite(v) for v in interval):
            return Decision(scale, False, f"{shown}: the interval is not bounded yet")
        high, low = target * self.tolerance, target / self.tolerance
        if gr_t > high and (interval is None or interval[0] > high):
            why = f"{shown} above {target:.3g}: lower the learning rate"
        elif gr_t < low and (interval is None or interval[1] < low):
            why = f"{shown} below {target:.3g}: raise the learning rate"
        elif interval is not None and not (low <= gr_t <= high):
            return Decision(scale, False, f"{shown}: the interval reaches into {low:.3g}-{high:.3g}, wait")
        else:
            return Decision(scale, False, f"GR_T {gr_t:.1f} near {target:.3g}")
        factor = min(max((target / gr_t) ** self.gain, 1 / self.step_factor), self.step_factor)
        new = min(max(scale * factor, self.min_scale), self.max_scale)
        if new == scale:
            return Decision(scale, False, why + ", but the scale is at its bound")
        self.last_change = step
        return Decision(new, True, why + f": x{new / scale:.3g}")

    def state_dict(self) -> dict[str, Any]:
        return {"last_change": self.last_change}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_change = int(state["last_change"])
