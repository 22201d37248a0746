r"""The default learning-rate rule: a noise-corrected line search along the optimizer's own step.

:class:`~lightning_gradnoise.stats.StepSizeRatio` measures :math:`r`, the multiple of the current
step that would lower the expected loss most along the step's direction (McCandlish Eq. 2.6 for
SGD, with the noise of the step's own batch removed). :class:`StepSizeController` moves the
learning rate when :math:`r`'s whole interval lies outside ``band``:

- above it (the step is too short: a learning rate too small, or the signal still dominating),
  the rate grows toward :math:`r` times itself, at most ``step_factor`` per decision;
- below it (the step overshoots: :math:`r \to 1/2` at the current rate's noise floor, lower when
  it is too large), the rate shrinks toward the band's middle.

The band's lower end, 0.7 by default, guards against short-horizon bias (Wu et al. 2018): the
greedy optimum falls toward zero as a run nears its noise floor, and following it would anneal
too early. Stopping at :math:`r \approx 0.7` lowers the rate only once the loss sits near the floor
the rate implies: on a noisy quadratic, where the floor of the best constant rate for a target is
about three quarters of that target, that is about where the best constant rate is
(``tests/test_step_size.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch
from torch import Tensor

from lightning_gradnoise._validate import check_int, check_number, check_numbers, fail
from lightning_gradnoise.control._controllers import Decision

__all__ = ["StepSizeController", "noise_coupling", "LINE_SEARCH_OPTIMIZERS"]

LINE_SEARCH_OPTIMIZERS = ("SGD", "Adam", "AdamW")


def _is(optimizer: Any, name: str) -> bool:
    return any(cls.__name__ == name and cls.__module__.startswith("torch.optim") for cls in type(optimizer).__mro__) and not type(
        optimizer
    ).__name__.lower().startswith("vr")


def noise_coupling(optimizer: Any, params: Sequence[Tensor]) -> list[Union[float, Tensor]]:
    r""":math:`J = \partial\Delta/\partial\hat g`, elementwise, of the step the optimizer just took,
    one entry per parameter of ``params``: how much of the current gradient's noise the step carries.

    - SGD: :math:`\eta` (times :math:`1 - \text{dampening}` with a momentum buffer, and
      :math:`1 + \mu` with Nesterov).
    - Adam, AdamW: :math:`\eta(1-\beta_1)/(1-\beta_1^t)\,/\,(\sqrt{v_t/(1-\beta_2^t)} + \epsilon)`
      (the dependence of :math:`v_t` on :math:`\hat g_t`, of order :math:`1-\beta_2`, is left out).

    Call it after ``optimizer.step()``. Raises ``ValueError`` for other optimizers.

    Examples:
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
        >>> noise_coupling(opt, [w])
        [0.1]
    """
    kind = next((name for name in LINE_SEARCH_OPTIMIZERS if _is(optimizer, name)), None)
    if kind is None:
        raise ValueError(
            f"optimizer={type(optimizer).__name__}: the line-search learning-rate rule knows the step of "
            f"{', '.join(LINE_SEARCH_OPTIMIZERS)} (torch.optim); use LRAdapter(rule='gr_t') for this one"
        )
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out: list[Union[float, Tensor]] = []
    for p in params:
        group = group_of.get(id(p))
        if group is None:
            out.append(0.0)
            continue
        if group.get("maximize"):
            raise ValueError(f"optimizer={type(optimizer).__name__} with maximize=True: the line-search rule minimizes")
        lr = float(group["lr"])
        state = optimizer.state.get(p, {})
        if kind == "SGD":
            mom = float(group.get("momentum", 0.0))
            j = lr
            if mom and state.get("momentum_buffer") is not None and int(state.get("_steps", 2)) > 1:
                j *= 1.0 - float(group.get("dampening", 0.0))
            if group.get("nesterov") and mom:
                j *= 1.0 + mom
            out.append(j)
            continue
        if "exp_avg_sq" not in state:
            out.append(0.0)
            continue
        beta1, beta2 = group["betas"]
        t = float(state["step"])
        v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        denom = (v.to(torch.float64) / (1.0 - beta2**t)).sqrt() + float(group["eps"])
        out.append(lr * (1.0 - beta1) / (1.0 - beta1**t) / denom)
    return out


@dataclass
class StepSizeController:
    r"""Moves a learning-rate multiplier so that the step sits within ``band`` of the best step
    along its own direction (:math:`r`, :class:`~lightning_gradnoise.stats.StepSizeRatio`).

    Outside the band (the whole interval of :math:`r` on one side) the multiplier changes by
    :math:`r^\text{gain}` to grow and :math:`(r/\sqrt{\text{low}\cdot\text{high}})^\text{gain}` to
    shrink, at most ``step_factor`` either way, never past ``[min_scale, max_scale]``. Nothing
    moves before ``min_pairs`` pairs of steps have been measured since the last change.

    Examples:
        >>> c = StepSizeController()
        >>> c.decide(ratio=5.0, interval=(3.0, 8.0), scale=1.0, step=10, pairs=10).value   # 10x too small
        1.5
        >>> round(c.decide(ratio=0.3, interval=(0.2, 0.45), scale=1.5, step=20, pairs=10).value, 3)   # overshooting
        1.0
        >>> c.decide(ratio=0.6, interval=(0.3, 3.0), scale=1.0, step=30, pairs=10).reason
        'step ratio 0.6 (interval 0.3-3): the interval reaches into 0.7-1.5, wait'
    """

    band: tuple[float, float] = (0.7, 1.5)
    step_factor: float = 1.5
    gain: float = 1.0
    min_pairs: int = 10
    min_scale: float = 1e-3
    max_scale: float = 1e3
    last_change: int = 0
    ceiling: float = math.inf

    def __post_init__(self) -> None:
        band = check_numbers("band", self.band, length=2, low=0, low_open=True)
        if not band[0] < 1.0 < band[1]:
            fail("band", self.band, "(low, high) with 0 < low < 1 < high")
        self.band = (band[0], band[1])
        self.step_factor = check_number("step_factor", self.step_factor, low=1, low_open=True)
        self.gain = check_number("gain", self.gain, low=0, low_open=True)
        self.min_pairs = check_int("min_pairs", self.min_pairs, low=2)
        self.min_scale = check_number("min_scale", self.min_scale, low=0, low_open=True, high=1)
        self.max_scale = check_number("max_scale", self.max_scale, low=1)
        self.last_change = check_int("last_change", self.last_change, low=0)
        self.ceiling = check_number("ceiling", self.ceiling, low=0, low_open=True, finite=False)

    def decide(self, ratio: float, interval: tuple[float, float], scale: float, step: int, pairs: int,
               loss_slope: tuple[float, float] | None = None) -> Decision:
        """The multiplier for the next steps, from :math:`r` and its interval measured over
        ``pairs`` pairs of steps at the current multiplier ``scale``.

        ``loss_slope``: the interval of the training loss's slope per step at this rate
        (:class:`~lightning_gradnoise.stats.LossTrend`). While it lies below zero the loss still
        falls, and the rate is not lowered whatever :math:`r` says (short-horizon bias)."""
        ratio = check_number("ratio", ratio, finite=False, nan_ok=True)
        lo, hi = check_numbers("interval", interval, length=2, finite=False, nan_ok=True)
        scale = check_number("scale", scale, low=0, low_open=True)
        check_int("step", step, low=0)
        pairs = check_int("pairs", pairs, low=0)
        low, high = self.band
        if pairs < self.min_pairs:
            return Decision(scale, False, f"{pairs} of {self.min_pairs} step pairs measured at this learning rate")
        if math.isnan(lo) or math.isnan(hi):
            return Decision(scale, False, f"step ratio {ratio:.3g}: no interval yet")
        shown = f"step ratio {ratio:.3g} (interval {lo:.3g}-{hi:.3g})"
        if lo > high:
            grow = ratio if math.isfinite(ratio) and ratio > 0 else self.step_factor
            factor = min(grow**self.gain, self.step_factor)
            why = f"{shown} above {high:g}: the step is too short, raise the learning rate"
        elif hi < low and loss_slope is not None and loss_slope[1] < 0:
            return Decision(scale, False, f"{shown} below {low:g}, but the loss still falls "
                                          f"(slope {loss_slope[0]:.3g} to {loss_slope[1]:.3g} per step): keep the rate")
        elif hi < low:
            shrink = ratio / math.sqrt(low * high) if math.isfinite(ratio) and ratio > 0 else 0.0
            factor = max(shrink**self.gain if shrink > 0 else 0.0, 1.0 / self.step_factor)
            why = f"{shown} below {low:g}: the step overshoots, lower the learning rate"
        elif low <= ratio <= high:
            return Decision(scale, False, f"{shown} in {low:g}-{high:g}")
        else:
            return Decision(scale, False, f"{shown}: the interval reaches into {low:g}-{high:g}, wait")
        new = min(max(scale * factor, self.min_scale), self.max_scale)
        if factor > 1:  # never back to a rate that has overshot (the steepest directions stay steep)
            new = min(new, self.ceiling / math.sqrt(self.step_factor))
            if new <= scale:
                return Decision(scale, False, why + f", but x{self.ceiling / scale:.3g} overshot before")
        else:
            self.ceiling = min(self.ceiling, scale)
        if new == scale:
            return Decision(scale, False, why + ", but the scale is at its bound")
        self.last_change = step
        return Decision(new, True, why + f": x{new / scale:.3g}")

    def state_dict(self) -> dict[str, Any]:
        return {"last_change": self.last_change, "ceiling": self.ceiling}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_change = int(state["last_change"])
        self.ceiling = float(state["ceiling"])
