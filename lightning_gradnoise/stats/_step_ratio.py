r"""How far the learning rate is from the best step along the update's own direction.

A step :math:`\theta_{t+1} = \theta_t - \Delta_t` moves along :math:`\Delta_t`. On a quadratic the
expected loss along that line, :math:`L(\theta_t - s\Delta_t/|\Delta_t|)`, is least at the multiple

.. math::
    r = \frac{\mathbb E[\Delta_t\cdot G_t]}{\mathbb E[\Delta_t\cdot(G_t - G_{t+1})]}
      = \frac{\mathbb E[c_t]}{\mathbb E[d_t]}

of the step actually taken (:math:`\Delta^\top G_{t+1} = \Delta^\top G_t - \Delta^\top H\Delta`).
Both are measured from the stochastic gradients of two consecutive steps:
:math:`a_t = \Delta_t\cdot\hat g_{t+1}` is unbiased (the next batch is independent of the step),
but :math:`\Delta_t\cdot\hat g_t` carries the noise of the batch that made the step,
:math:`\mathbb E[\Delta_t\cdot(\hat g_t - G_t)] = \sum_i J_i\sigma_i^2/B` with
:math:`J_i = \partial\Delta_{t,i}/\partial\hat g_{t,i}` (:math:`\eta` for SGD). So
:math:`c_t = \Delta_t\cdot\hat g_t - n_t` with :math:`n_t` that noise term and :math:`d_t = c_t - a_t`.
For SGD, :math:`\mathbb E[r]\,\eta` is McCandlish's :math:`\epsilon_\text{opt}(B) =
|G|^2/(G^\top H G + \mathrm{tr}(H\Sigma)/B)` (Eq. 2.6-2.7): the greedy learning rate.

Read against the current rate: :math:`r \gg 1` while the gradient's signal dominates (a larger
step would do better), :math:`r \to 1/2` at the noise floor of the current rate (the expected
one-step change of the loss is zero exactly at :math:`\eta = 2\epsilon_\text{opt}`), :math:`r < 1/2`
when the step overshoots. The ratio of the two EMA means gets Fieller's interval on the branch
:math:`\mathbb E[d] > 0` (a loss that curves up along the step): while :math:`d` is not resolved
from zero but :math:`c` is, the interval is :math:`[\rho_+, \infty)`, i.e. "the step is far too
short", which is what a learning rate 10x too small looks like.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from torch import Tensor

from lightning_gradnoise._validate import check_int, check_number
from lightning_gradnoise.stats._checks import checked_tensor
from lightning_gradnoise.stats._interval import EMAMoments, t_quantile

__all__ = ["LossTrend", "StepSizeRatio", "ratio_interval"]


def ratio_interval(num: float, den: float, v_num: float, v_den: float, cov: float, t: float) -> tuple[float, float]:
    r"""Fieller's set for :math:`\rho = \mu_y/\mu_x` restricted to :math:`\mu_x > 0`, as ``(lo, hi)``.

    The set is :math:`\{\rho: a\rho^2 - 2b\rho + c \le 0\}` with :math:`a = \bar x^2 - t^2V_{xx}`,
    :math:`b = \bar x\bar y - t^2V_{xy}`, :math:`c = \bar y^2 - t^2V_{yy}`:

    - :math:`a > 0`, :math:`\bar x > 0`: the usual interval between the roots;
    - :math:`a > 0`, :math:`\bar x < 0` (resolved negative curvature): ``(inf, inf)`` when
      :math:`\bar y > 0` (no minimum along the step), else ``(nan, nan)``;
    - :math:`a \le 0 < c` (:math:`\bar y` resolved, :math:`\bar x` not): the branch of
      :math:`\bar y`'s sign, ``(rho_plus, inf)`` or ``(-inf, rho_minus)``;
    - otherwise ``(-inf, inf)``: nothing is resolved.

    Examples:
        >>> lo, hi = ratio_interval(10.0, 2.0, 1.0, 0.01, 0.0, 2.0)
        >>> round(lo, 2), round(hi, 2)
        (3.93, 6.18)
        >>> ratio_interval(10.0, 0.1, 1.0, 1.0, 0.0, 2.0)[1]   # the step's curvature is not seen yet
        inf
    """
    for name, value in (("num", num), ("den", den), ("cov", cov)):
        check_number(name, value, finite=False, nan_ok=True)
    check_number("v_num", v_num, low=0, finite=False, nan_ok=True)
    check_number("v_den", v_den, low=0, finite=False, nan_ok=True)
    t = check_number("t", t, low=0, low_open=True)
    if not all(math.isfinite(v) for v in (num, den, v_num, v_den, cov)):
        return math.nan, math.nan
    q = t * t
    a, b, c = den * den - q * v_den, den * num - q * cov, num * num - q * v_num
    root = math.sqrt(max(b * b - a * c, 0.0))
    if a > 0:
        if den > 0:
            return (b - root) / a, (b + root) / a
        return (math.inf, math.inf) if num > 0 else (math.nan, math.nan)
    if c > 0 and a < 0:
        lo, hi = (b + root) / a, (b - root) / a  # a < 0: the roots, smaller first
        return (hi, math.inf) if num > 0 else (-math.inf, lo)
    return -math.inf, math.inf


class StepSizeRatio:
    r"""The running ratio :math:`r = \mathbb E[c]/\mathbb E[d]` (module docstring) with its interval.

    Each :meth:`update` takes one pair of consecutive steps; means, variances and covariance are
    bias-corrected EMAs (:class:`~lightning_gradnoise.stats.EMAMoments`), so the interval
    follows a model that moves. :meth:`reset` forgets everything: after the learning rate or the
    batch changes, the old steps no longer describe the new ones.

    Args:
        decay: the EMAs' decay in ``[0, 1)``.

    Examples:
        >>> ratio = StepSizeRatio(decay=0.9)
        >>> for own, nxt in [(2.0, 1.0), (2.2, 1.1), (1.8, 0.9), (2.1, 1.0)]:
        ...     _ = ratio.update(own, nxt, noise=0.0)
        >>> round(float(ratio.reading()["lr_ratio"]), 2)   # half the step's own slope left: r = 2
        1.97
    """

    def __init__(self, decay: float = 0.9) -> None:
        self.decay = check_number("decay", decay, low=0, high=1, high_open=True)
        self.moments = EMAMoments(self.decay)

    @property
    def count(self) -> int:
        """Pairs of steps folded in since the last :meth:`reset`."""
        return self.moments.count

    def reset(self) -> None:
        self.moments = EMAMoments(self.decay)

    def update(self, own: float, next_: float, noise: float, growth: float = 1.0) -> bool:
        r"""Fold in one step: ``own`` :math:`=\Delta_t\cdot\hat g_t`, ``next_``
        :math:`=\Delta_t\cdot\hat g_{t+1}`, ``noise`` :math:`= n_t`. ``growth`` :math:`f \ge 1`:
        how many times longer the optimizer's step will be at the same gradient once its momentum
        has built up (:func:`~lightning_gradnoise.control.step_growth`); the pair is counted as
        that longer step, :math:`c \to f c`, :math:`d \to f^2 d`, so that :math:`r` is the ratio of
        the steady step. A non-finite value is refused (returns ``False``) and leaves the
        statistic as it was."""
        own = check_number("own", own, finite=False, nan_ok=True)
        next_ = check_number("next_", next_, finite=False, nan_ok=True)
        noise = check_number("noise", noise, finite=False, nan_ok=True)
        growth = check_number("growth", growth, low=1)
        c = own - noise
        d = c - next_
        if not (math.isfinite(c) and math.isfinite(d)):
            return False
        return self.moments.update(d * growth * growth, c * growth)

    def update_many(self, own: Tensor, next_: Tensor, noise: Tensor, growth: Optional[Tensor] = None) -> int:
        """:meth:`update` for many steps at once (1-D tensors of one length, in step order;
        ``growth`` too, or ``None`` for ones); steps with a non-finite value are refused. Returns
        the steps folded in."""
        own, next_, noise = (checked_tensor(name, value, finite=False) for name, value in
                             (("own", own), ("next_", next_), ("noise", noise)))
        if not (own.dim() == next_.dim() == noise.dim() == 1 and own.shape == next_.shape == noise.shape):
            raise ValueError(f"own, next_, noise: shapes {tuple(own.shape)}, {tuple(next_.shape)}, {tuple(noise.shape)}: "
                             "expected 1-D tensors of one length")
        c = own - noise
        d = c - next_
        if growth is not None:
            growth = checked_tensor("growth", growth, low=1)
            if growth.shape != own.shape:
                raise ValueError(f"growth: shape {tuple(growth.shape)}, expected {tuple(own.shape)} like own")
            c, d = c * growth, d * growth * growth
        return self.moments.update_many(d, c)

    def reading(self, level: float = 0.9) -> dict[str, float]:
        """``lr_ratio`` with its ``level`` interval (``lr_ratio_lo``, ``lr_ratio_hi``; NaN with
        fewer than two pairs). ``lr_ratio`` is ``inf`` while the mean curvature is not positive."""
        level = check_number("level", level, low=0, low_open=True, high=1, high_open=True)
        if self.count == 0:
            return {"lr_ratio": math.nan, "lr_ratio_lo": math.nan, "lr_ratio_hi": math.nan}
        den, num = (float(v) for v in self.moments.means())
        value = num / den if den > 0 else (math.inf if num > 0 else math.nan)
        n = self.moments.effective_steps()
        if self.count < 2 or not n > 1:
            return {"lr_ratio": value, "lr_ratio_lo": math.nan, "lr_ratio_hi": math.nan}
        v_den, v_num, cov = (float(v) for v in self.moments.mean_covariance())
        lo, hi = ratio_interval(num, den, v_num, v_den, cov, t_quantile(level, max(n - 1.0, 1.0)))
        return {"lr_ratio": value, "lr_ratio_lo": lo, "lr_ratio_hi": hi}

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "moments": self.moments.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.moments = EMAMoments(self.decay)
        self.moments.load_state_dict(state["moments"])



class LossTrend:
    r"""The slope of the training loss over the steps since the last :meth:`reset`, with its
    interval: least squares on ``(step, loss)``, the t quantile on :math:`n - 2` degrees of freedom
    (the steps' noise taken as independent). Keeps at most ``window`` recent steps.

    It answers "does the loss still fall?", which the one-step ratio cannot: along the steepest
    directions a step can sit at :math:`r \approx 1/2` (no progress there) while the loss keeps
    falling along the flat ones (short-horizon bias, Wu et al. 2018).

    Examples:
        >>> trend = LossTrend()
        >>> for step in range(20):
        ...     _ = trend.update(step, 2.0 - 0.05 * step + 0.01 * (-1) ** step)
        >>> lo, hi = trend.slope_interval()
        >>> hi < 0   # resolved: the loss falls
        True
    """

    def __init__(self, window: int = 200) -> None:
        self.window = check_int("window", window, low=3)
        self.steps: list[float] = []
        self.losses: list[float] = []

    def reset(self) -> None:
        self.steps, self.losses = [], []

    def update(self, step: float, loss: float) -> bool:
        """Add one step's loss; a non-finite one is refused (returns ``False``)."""
        step = check_number("step", step, finite=False, nan_ok=True)
        loss = check_number("loss", loss, finite=False, nan_ok=True)
        if not (math.isfinite(step) and math.isfinite(loss)):
            return False
        self.steps.append(float(step))
        self.losses.append(float(loss))
        if len(self.steps) > self.window:
            del self.steps[0], self.losses[0]
        return True

    def slope_interval(self, level: float = 0.9, last: Optional[int] = None) -> tuple[float, float]:
        """``(lo, hi)`` of the loss's slope per step, over all kept steps or the ``last`` ones;
        ``(nan, nan)`` with fewer than 4 steps."""
        level = check_number("level", level, low=0, low_open=True, high=1, high_open=True)
        if last is not None:
            last = check_int("last", last, low=4)
            kept = LossTrend(last)
            kept.steps, kept.losses = self.steps[-last:], self.losses[-last:]
            return kept.slope_interval(level)
        n = len(self.steps)
        if n < 4:
            return math.nan, math.nan
        x = torch.tensor(self.steps, dtype=torch.float64)
        y = torch.tensor(self.losses, dtype=torch.float64)
        xc = x - x.mean()
        sxx = float(xc.square().sum())
        if sxx <= 0:
            return math.nan, math.nan
        slope = float((xc * (y - y.mean())).sum()) / sxx
        resid = y - y.mean() - slope * xc
        se = math.sqrt(float(resid.square().sum()) / (n - 2) / sxx)
        t = t_quantile(level, n - 2)
        return slope - t * se, slope + t * se

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window, "steps": list(self.steps), "losses": list(self.losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window = int(state["window"])
        self.steps, self.losses = list(state["steps"]), list(state["losses"])
