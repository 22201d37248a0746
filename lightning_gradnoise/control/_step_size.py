r"""The default learning-rate rule: a noise-corrected line search along the optimizer's own step.

:class:`~lightning_gradnoise.stats.StepSizeRatio` measures :math:`r`, the multiple of the current
step that would lower the expected loss most along the step's direction (McCandlish Eq. 2.6 for
SGD, with the noise of the step's own batch removed). :class:`StepSizeController` moves the
learning rate:

- up, when :math:`r`'s whole interval lies above ``band`` (the step is too short: a learning
  rate too small, or the signal still dominating), taking the interval's low end to the band's
  top, at most ``step_factor`` per decision;
- down, by ``shrink_factor``, when a step's training loss climbs back above where the run
  started (by ``rise_limit`` of it and five times its noise, :meth:`StepSizeController.loss_limit`),
  or when the loss's trend rises: past the edge of stability :math:`r` reads
  about 0.5-0.9 at any rate and cannot tell a rate too large;
- down, by 1/sqrt(``shrink_factor``) to 1/``shrink_factor``, once the training loss has stopped
  falling since the last change, :math:`r` is below 1 (or undetermined) and its interval is not
  above the band: at the current rate's noise floor :math:`r \to 1/2`, and where the steepest
  directions oscillate it sits at 0.5-0.7 whatever the rate;
- not at all otherwise, in particular when :math:`r` reads below the band while the loss still
  falls. :math:`r` alone never lowers the rate: the greedy optimum falls toward zero as a run nears
  its noise floor, and following it would anneal too early (short-horizon bias, Wu et al. 2018).

On a noisy quadratic this settles within x1.5 of the best constant rate for a target, in no more
steps (``tests/test_step_size.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from lightning_gradnoise._validate import check_int, check_number, check_numbers, fail
from lightning_gradnoise.control._controllers import Decision

__all__ = ["StepSizeController"]

_ACTIONS = ("none", "hold", "raise", "lower")
_NOISE_MULTIPLE = 5.0  # of the first losses' noise in the divergence limit (loss_limit)


@dataclass
class StepSizeController:
    r"""Moves a learning-rate multiplier so that the step sits within ``band`` of the best step
    along its own direction (:math:`r`, :class:`~lightning_gradnoise.stats.StepSizeRatio`).

    Above the band (the whole interval of :math:`r` above it) the multiplier grows by
    :math:`(r_\text{lo}/\text{high})^\text{gain}`, at most ``step_factor``: the interval's low end
    is taken to the band's top. It shrinks by :math:`(r/\sqrt{\text{low}\cdot\text{high}})^\text{gain}`
    once the loss has stopped falling, and by ``shrink_factor`` when it rises, at most
    ``shrink_factor`` per decision, never past ``[min_scale, max_scale]``; by ``shrink_factor``
    too when a step's loss climbs back above where the run started (:meth:`loss_limit`, with
    ``rise_limit``; ``math.inf`` turns that test off). Nothing
    moves before ``min_pairs`` pairs of steps have been measured since the last change
    (and none before optimizer step ``first_steps``), and the
    reading is tested once per ``min_pairs`` pairs (a 90% interval tested at every step would
    say something false every few dozen steps). A rate that was raised and then found to
    overshoot becomes a ceiling: later raises stop below it.

    Examples:
        >>> c = StepSizeController(first_steps=0)
        >>> c.decide(ratio=6.0, interval=(4.5, 9.0), scale=1.0, step=10, pairs=10).value   # 10x too small
        2.0
        >>> c.decide(ratio=0.5, interval=(0.3, 0.65), scale=1.5, step=20, pairs=10, loss_slope=(-0.01, 0.02)).value   # at the floor
        0.75
        >>> c.decide(ratio=0.4, interval=(0.2, 0.6), scale=1.0, step=30, pairs=10, loss_slope=(-0.03, -0.01)).reason
        'step ratio 0.4 (interval 0.2-0.6) below 0.7, but the loss still falls (loss slope -0.03 to -0.01 per step): keep the rate'
    """

    band: tuple[float, float] = (0.7, 2.0)
    step_factor: float = 2.0
    shrink_factor: float = 2.0
    gain: float = 1.0
    min_pairs: int = 10
    first_steps: int = 20
    min_scale: float = 1e-3
    max_scale: float = 1e3
    rise_limit: float = 0.1
    last_change: int = 0
    ceiling: float = math.inf
    raised_last: bool = False
    last_action: str = "none"
    early_rise: bool = True

    def __post_init__(self) -> None:
        band = check_numbers("band", self.band, length=2, low=0, low_open=True)
        if not band[0] < 1.0 < band[1]:
            fail("band", self.band, "(low, high) with 0 < low < 1 < high")
        self.band = (band[0], band[1])
        self.step_factor = check_number("step_factor", self.step_factor, low=1, low_open=True)
        self.shrink_factor = check_number("shrink_factor", self.shrink_factor, low=1, low_open=True)
        self.gain = check_number("gain", self.gain, low=0, low_open=True)
        self.min_pairs = check_int("min_pairs", self.min_pairs, low=2)
        self.first_steps = check_int("first_steps", self.first_steps, low=0)
        self.min_scale = check_number("min_scale", self.min_scale, low=0, low_open=True, high=1)
        self.max_scale = check_number("max_scale", self.max_scale, low=1)
        self.rise_limit = check_number("rise_limit", self.rise_limit, low=0, low_open=True, finite=False)
        self.last_change = check_int("last_change", self.last_change, low=0)
        self.ceiling = check_number("ceiling", self.ceiling, low=0, low_open=True, finite=False)
        if self.last_action not in _ACTIONS:
            fail("last_action", self.last_action, f"one of {', '.join(_ACTIONS)}")
        if not isinstance(self.early_rise, bool):
            fail("early_rise", self.early_rise, "True or False")

    def loss_limit(self, first_losses: Sequence[float]) -> float:
        r"""The training loss above which a step's loss says the rate diverges, from the run's
        first losses, one per step: where the run started, :math:`L_0` (their least-squares line
        at the first step), plus ``rise_limit`` of it, plus five times their step-to-step noise
        :math:`s` (1.4826 times the median absolute residual from that line):
        :math:`L_0 + \text{rise\_limit}\,|L_0| + 5 s`. Five, because :math:`s` from ten losses is
        itself uncertain: with three, a noisy quadratic whose batch loss varies by 20% fired by
        chance on 2 runs of 5. A stable rate does not take a batch's loss
        back above where training started; one a few times too large does within a few dozen
        steps, often before the loss's trend rises (momentum SGD on the digits benchmark at 2-3x
        its best rate). NaN with fewer than 3 finite losses; ``rise_limit=math.inf`` turns the
        test off.

        Examples:
            >>> round(StepSizeController().loss_limit([2.3, 2.2, 2.1, 2.0]), 6)   # no noise: L_0 = 2.3
            2.53
        """
        losses = torch.tensor(check_numbers("first_losses", first_losses, finite=False, nan_ok=True), dtype=torch.float64)
        if self.rise_limit == math.inf:
            return math.inf
        steps = torch.arange(len(losses), dtype=torch.float64)[losses.isfinite()]
        losses = losses[losses.isfinite()]
        if len(losses) < 3:
            return math.nan
        xc = steps - steps.mean()
        slope = float((xc * (losses - losses.mean())).sum() / xc.square().sum())
        start = float(losses.mean()) - slope * float(steps.mean() - steps[0])
        spread = 1.4826 * float((losses - losses.mean() - slope * xc).abs().median())
        return start + self.rise_limit * abs(start) + _NOISE_MULTIPLE * spread

    def decide(self, ratio: float, interval: tuple[float, float], scale: float, step: int, pairs: int,
               loss_slope: tuple[float, float] | None = None, recent_slope: tuple[float, float] | None = None,
               peak_loss: float | None = None, loss_limit: float | None = None) -> Decision:
        """The multiplier for the next steps, from :math:`r` and its interval measured over
        ``pairs`` pairs of steps at the current multiplier ``scale``; ``loss_slope``, the
        interval of the training loss's slope per step since the last change, and
        ``recent_slope``, over the last ``min_pairs`` steps
        (:class:`~lightning_gradnoise.stats.LossTrend`; ``None``: not known yet); ``peak_loss``,
        the highest step loss over the last ``min_pairs`` steps, and ``loss_limit``, the run's
        :meth:`loss_limit`.

        - Lower by ``shrink_factor`` when ``peak_loss`` exceeds ``loss_limit``: the loss has
          climbed back above where the run started, so the rate diverges (:meth:`diverged` tests
          it after every step; here it is tested at the tests, from the start,
          like the rise below).
        - Lower by ``shrink_factor`` when the loss rises (``recent_slope`` wholly above zero):
          the rate is past the edge of stability, where :math:`r` reads about 0.5-0.9 at any rate and
          cannot tell. Over the last ``min_pairs`` steps it is tested on the first
          ``2 * min_pairs`` pairs at a rate and batch (an unstable rate shows within them; later, a
          noise floor's slow wander would trip a test that takes the steps as independent), from
          the start, unless ``early_rise`` is off (``LRAdapter`` turns it off after a batch change
          that did not raise the rate; any change of rate turns it back on); over all steps since
          the last change (``loss_slope``), at every test.
        - Raise when :math:`r`'s interval lies above the band: the step is too short.
        - Lower when the loss has stopped falling (its fitted slope is not negative) and the
          step is not too short (:math:`r < 1`, its interval not above the band): at the noise floor of the current rate, or where
          the steepest directions oscillate (there :math:`r` sits near 1/2 to 0.7 whatever the
          rate, and says nothing about it).
        - Otherwise hold, also when :math:`r` reads below the band while the loss still falls
          (short-horizon bias: the greedy step is not the best rate over many steps).

        ``last_action`` keeps what the latest test did (``"hold"``, ``"raise"``, ``"lower"``)."""
        ratio = check_number("ratio", ratio, finite=False, nan_ok=True)
        lo, hi = check_numbers("interval", interval, length=2, finite=False, nan_ok=True)
        scale = check_number("scale", scale, low=0, low_open=True)
        check_int("step", step, low=0)
        pairs = check_int("pairs", pairs, low=0)
        if loss_slope is not None:
            loss_slope = tuple(check_numbers("loss_slope", loss_slope, length=2, finite=False, nan_ok=True))  # type: ignore[assignment]
        if recent_slope is not None:
            recent_slope = tuple(check_numbers("recent_slope", recent_slope, length=2, finite=False, nan_ok=True))  # type: ignore[assignment]
        if peak_loss is not None:
            peak_loss = check_number("peak_loss", peak_loss, finite=False, nan_ok=True)
        if loss_limit is not None:
            loss_limit = check_number("loss_limit", loss_limit, finite=False, nan_ok=True)
        low, high = self.band
        if pairs < self.min_pairs:
            return Decision(scale, False, f"{pairs} of {self.min_pairs} step pairs measured at this learning rate")
        if pairs % self.min_pairs:
            return Decision(scale, False, f"{pairs} step pairs measured: tested every {self.min_pairs}")
        if peak_loss is not None and loss_limit is not None and peak_loss > loss_limit:
            return self._move(scale, 1.0 / self.shrink_factor, step, self._diverges(peak_loss, loss_limit))
        early_rise = self.early_rise and recent_slope is not None and recent_slope[0] > 0 and pairs <= 2 * self.min_pairs
        if early_rise or (loss_slope is not None and loss_slope[0] > 0):
            # a rising loss at a fixed rate and batch: unstable, whatever r reads
            # (a ceiling only when it follows a raise, as for any lowering: a false alarm must not cap the rate)
            seen = recent_slope if early_rise else loss_slope
            over = f"the last {self.min_pairs} steps" if early_rise else "the steps since the last change"
            return self._move(scale, 1.0 / self.shrink_factor, step,
                              f"loss rising over {over} (slope {(seen[0] + seen[1]) / 2:.3g} per step, interval "
                              f"{seen[0]:.3g} to {seen[1]:.3g}): the rate is unstable, lower it")
        if step < self.first_steps:
            # from initialization the loss curves less along the step than it will a few dozen
            # steps later (progressive sharpening, Cohen et al. 2021): r reads high at any rate
            return Decision(scale, False, f"no decision before step {self.first_steps}")
        shown = f"step ratio {ratio:.3g} (interval {lo:.3g}-{hi:.3g})"
        # stopped: the fitted slope is not negative (its interval's middle), not merely unresolved
        flat = loss_slope is not None and not math.isnan(loss_slope[1]) and loss_slope[0] + loss_slope[1] >= 0
        slope = f"loss slope {loss_slope[0]:.3g} to {loss_slope[1]:.3g} per step" if loss_slope is not None else ""
        if lo > high:
            # the interval's low end to the band's top: a noisy high reading does not overshoot
            factor = min((lo / high) ** self.gain, self.step_factor)
            why = f"{shown} above {high:g}: the step is too short, raise the learning rate"
        elif flat and not (hi > high) and not ratio >= 1.0:  # NaN: the step does not descend
            # r near 1/2 (the floor) asks for half the rate; never less than 1/shrink_factor
            shrink = ratio / math.sqrt(low * high) if math.isfinite(ratio) and ratio > 0 else 0.0
            factor = min(max(shrink**self.gain, 1.0 / self.shrink_factor), 1.0 / math.sqrt(self.shrink_factor))
            why = f"{shown}, {slope}: the loss has stopped falling, lower the learning rate"
        elif hi < low:
            self.last_action = "hold"
            return Decision(scale, False, f"{shown} below {low:g}, but the loss still falls ({slope or 'slope not known yet'}): keep the rate")
        else:
            self.last_action = "hold"
            return Decision(scale, False, f"{shown}" + (f", {slope}" if slope else "") + ": keep the rate")
        return self._move(scale, factor, step, why)

    def diverged(self, loss: float, loss_limit: float, scale: float, step: int, steps: int) -> Decision:
        r"""The divergence test of :meth:`decide` after every step, not only at its tests: lower
        the multiplier ``scale`` by ``shrink_factor`` at once when the step's training ``loss``
        exceeds ``loss_limit`` (:meth:`loss_limit`), once ``min_pairs`` steps have been taken at
        the current rate and batch (``steps``; a rate just lowered gets as many to bring the loss
        back down). A diverging rate does its harm within a few steps: on the digits benchmark's
        learning-rate-3x-too-large start, acting at the step the loss crossed the limit rather
        than at the next test (up to ``min_pairs`` steps later) took the slowest seed from 4.94 to
        3.23 times the frontier's cost. The losses it sees are the ones :meth:`decide`'s
        ``peak_loss`` covers, so it fires by chance no more often; a NaN loss never fires.

        Examples:
            >>> c = StepSizeController()
            >>> c.diverged(4.1, loss_limit=2.6, scale=1.0, step=25, steps=15).value
            0.5
            >>> c.diverged(4.1, loss_limit=2.6, scale=0.5, step=27, steps=2).changed   # just lowered
            False
        """
        loss = check_number("loss", loss, finite=False, nan_ok=True)
        loss_limit = check_number("loss_limit", loss_limit, finite=False, nan_ok=True)
        scale = check_number("scale", scale, low=0, low_open=True)
        check_int("step", step, low=0)
        steps = check_int("steps", steps, low=0)
        if steps < self.min_pairs or not loss > loss_limit:
            return Decision(scale, False, f"loss {loss:.4g}, limit {loss_limit:.4g}, {steps} steps at this rate")
        return self._move(scale, 1.0 / self.shrink_factor, step, self._diverges(loss, loss_limit))

    def _diverges(self, loss: float, loss_limit: float) -> str:
        return (f"loss {loss:.4g} above {loss_limit:.4g} (where the run started, plus {self.rise_limit:.0%} and {_NOISE_MULTIPLE:g}x its "
                f"step-to-step noise): the rate diverges, lower it")

    def _move(self, scale: float, factor: float, step: int, why: str) -> Decision:
        new = min(max(scale * factor, self.min_scale), self.max_scale)
        if factor > 1:  # never back to a rate that has overshot (the steepest directions stay steep)
            new = min(new, self.ceiling / math.sqrt(self.step_factor))
            if new <= scale:
                self.last_action = "hold"
                return Decision(scale, False, why + f", but x{self.ceiling / scale:.3g} overshot before")
        elif self.raised_last:  # the last raise went too far
            self.ceiling = min(self.ceiling, scale)
        self.raised_last = factor > 1
        if new == scale:
            self.last_action = "hold"
            return Decision(scale, False, why + ", but the scale is at its bound")
        self.last_action = "raise" if factor > 1 else "lower"
        self.last_change = step
        self.early_rise = True  # a new rate: test it over its first steps
        return Decision(new, True, why + f": x{new / scale:.3g}")

    def state_dict(self) -> dict[str, Any]:
        return {"last_change": self.last_change, "ceiling": self.ceiling, "raised_last": self.raised_last,
                "last_action": self.last_action, "early_rise": self.early_rise}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_change = int(state["last_change"])
        self.ceiling = float(state["ceiling"])
        self.raised_last = bool(state["raised_last"])
        self.last_action = str(state.get("last_action", "none"))
        self.early_rise = bool(state.get("early_rise", True))
