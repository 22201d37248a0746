r"""How sure a smoothed reading is: standard errors of EMA means, intervals for them and for their
ratio.

The running statistics are bias-corrected EMAs of per-step estimates :math:`x_t` that are
unbiased and, at a fixed point, independent between steps. With the EMA's weights
:math:`w_i` (they sum to 1), the smoothed value :math:`\bar x = \sum_i w_i x_i` has

.. math::
    \mathrm{Var}[\bar x] = \sigma^2 \sum_i w_i^2 = \sigma^2 / n_t, \qquad
    \hat\sigma^2 = \frac{\sum_i w_i x_i^2 - \bar x^2}{1 - \sum_i w_i^2}

(:math:`n_t`: :func:`~lightning_gradnoise.stats.ema_effective_steps`; the second is the unbiased
variance with reliability weights). The same holds for covariances, from an EMA of
:math:`x_t y_t`. A mean's interval uses Student's t with :math:`n_t - 1` degrees of freedom. The
ratio :math:`\bar y / \bar x` (B_simple = tr(Sigma) / \|G\|^2) uses Fieller's interval, which is
exact for normal means and, unlike the delta method, says when the denominator is not resolved
from zero: the interval is then unbounded, and the ratio is not yet determined.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_gradnoise._validate import check_array, check_number
from lightning_gradnoise.stats._ema import BiasCorrectedEMA

__all__ = ["EMAMoments", "fieller_interval", "t_quantile"]


def t_quantile(level: float, df: float) -> float:
    r"""The two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom,
    :math:`t_{(1+\text{level})/2,\,df}`: the Cornish-Fisher series in the normal quantile
    (Abramowitz & Stegun 26.7.5; relative error below 2e-3 for df >= 3, 1e-6 for df >= 10), the
    closed forms at df = 1 and 2, and interpolation in 1/df between 1, 2 and 3 (within 10%
    there: a reading of fewer than four effective steps is rough however it is bounded).

    Examples:
        >>> round(t_quantile(0.9, 10), 3), round(t_quantile(0.9, 1e9), 3)
        (1.812, 1.645)
    """
    level = check_number("level", level, low=0, low_open=True, high=1, high_open=True)
    df = check_number("df", df, low=1, finite=False)
    p = 0.5 + level / 2
    z = _normal_quantile(p)
    if math.isinf(df):
        return z
    if df < 3:
        exact = {1.0: math.tan(math.pi * (p - 0.5)), 2.0: (2 * p - 1) / math.sqrt(2 * p * (1 - p))}
        lo, hi = (1.0, 2.0) if df < 2 else (2.0, 3.0)
        t_lo = exact[lo]
        t_hi = exact[hi] if hi in exact else t_quantile(level, 3.0)
        frac = (1 / lo - 1 / df) / (1 / lo - 1 / hi)
        return t_lo + frac * (t_hi - t_lo)
    # Cornish-Fisher expansion of t in z (Abramowitz & Stegun 26.7.5)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def _normal_quantile(p: float) -> float:
    """Acklam's rational approximation of the standard normal quantile (relative error < 1.2e-9)."""
    a = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02, 1.383577518672690e02, -3.066479806614716e01, 2.506628277459239e00)
    b = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02, 6.680131188771972e01, -1.328068155288572e01)
    c = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00, -2.549732539343734e00, 4.374664141464968e00, 2.938163982698783e00)
    d = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00)
    if p < 0.02425:
        q = math.sqrt(-2 * math.log(p))
        return (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1)
    if p > 1 - 0.02425:
        return -_normal_quantile(1 - p)
    q = p - 0.5
    r = q * q
    return (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q / (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)


def fieller_interval(num: Tensor, den: Tensor, v_num: Tensor, v_den: Tensor, cov: Tensor, t: float) -> tuple[Tensor, Tensor]:
    r"""Fieller's interval for the ratio :math:`\rho = \mu_y / \mu_x` of two estimated means
    ``num`` = :math:`\bar y` and ``den`` = :math:`\bar x` with variances and covariance of the
    means: the :math:`\rho` with :math:`(\bar y - \rho\bar x)^2 \le t^2\,\mathrm{Var}[\bar y - \rho\bar x]`.

    .. math::
        a = \bar x^2 - t^2 V_{xx},\quad b = \bar x\bar y - t^2 V_{xy},\quad
        c = \bar y^2 - t^2 V_{yy},\qquad \rho_\pm = \frac{b \pm \sqrt{b^2 - ac}}{a}

    Bounded only where :math:`a > 0`, i.e. where :math:`\bar x` is resolved from zero
    (:math:`|\bar x| > t\sqrt{V_{xx}}`); elsewhere ``(-inf, inf)``. Elementwise on tensors.

    Examples:
        >>> lo, hi = fieller_interval(torch.tensor(10.0), torch.tensor(2.0), torch.tensor(1.0), torch.tensor(0.01), torch.tensor(0.0), 2.0)
        >>> round(float(lo), 2), round(float(hi), 2)
        (3.93, 6.18)
    """
    for name, value in (("num", num), ("den", den), ("cov", cov)):
        check_array(name, value, finite=False)
    check_array("v_num", v_num, low=0, finite=False)
    check_array("v_den", v_den, low=0, finite=False)
    t = check_number("t", t, low=0, low_open=True)
    q = t * t
    a = den * den - q * v_den
    b = den * num - q * cov
    c = num * num - q * v_num
    disc = (b * b - a * c).clamp_min(0.0)
    root = disc.sqrt()
    bounded = a > 0
    safe_a = torch.where(bounded, a, torch.ones_like(a))
    lo = torch.where(bounded, (b - root) / safe_a, torch.full_like(a, -math.inf))
    hi = torch.where(bounded, (b + root) / safe_a, torch.full_like(a, math.inf))
    return lo, hi


def _effective_steps(decay: float, count: int) -> float:
    if decay == 0.0:
        return 1.0
    from lightning_gradnoise.stats._redundancy import ema_effective_steps

    return ema_effective_steps(decay, count)


class EMAMoments:
    r"""Running first and second moments of two per-step estimates ``x`` and ``y`` under one
    bias-corrected EMA: their smoothed means, and the variances and covariance of those means.

    Args:
        decay: the EMA decay in ``[0, 1)``.

    Examples:
        >>> m = EMAMoments(0.9)
        >>> m.update_many(torch.tensor([1.0, 3.0, 1.0, 3.0]), torch.tensor([2.0, 2.0, 2.0, 2.0]))
        4
        >>> [round(float(v), 3) for v in m.means()]
        [2.053, 2.0]
    """

    def __init__(self, decay: float) -> None:
        self.decay = check_number("decay", decay, low=0, high=1, high_open=True)
        self._ema = {key: BiasCorrectedEMA(self.decay) for key in ("x", "y", "xx", "yy", "xy")}

    @property
    def count(self) -> int:
        return self._ema["x"].count

    def ema(self, key: str) -> BiasCorrectedEMA:
        """One of the EMAs: ``"x"``, ``"y"``, ``"xx"``, ``"yy"`` or ``"xy"``."""
        return self._ema[key]

    def update_many(self, x: Tensor, y: Tensor) -> int:
        """Fold in steps (rows, first dimension) of ``x`` and ``y`` of one shape; a row with a
        non-finite entry in either is refused in both. Returns the rows folded."""
        x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
        n = x.shape[0]
        if n == 0:
            return 0
        finite = torch.isfinite(x.reshape(n, -1)).all(1) & torch.isfinite(y.reshape(n, -1)).all(1)
        x, y = x[finite], y[finite]
        for key, value in (("x", x), ("y", y), ("xx", x * x), ("yy", y * y), ("xy", x * y)):
            self._ema[key].update_many(value)
        self._ema["x"].rejected += n - x.shape[0]
        return int(x.shape[0])

    def update(self, x: float, y: float) -> bool:
        """:meth:`update_many` for one step of two numbers, in plain float arithmetic (the same
        bits, microseconds instead of a dozen tensor operations); a non-finite one is refused in
        both. Returns whether it was folded in."""
        x, y = check_number("x", x, finite=False, nan_ok=True), check_number("y", y, finite=False, nan_ok=True)
        if not (math.isfinite(x) and math.isfinite(y)):
            self._ema["x"].rejected += 1
            return False
        for key, value in (("x", x), ("y", y), ("xx", x * x), ("yy", y * y), ("xy", x * y)):
            self._ema[key].update_float(value)
        return True

    def means(self) -> tuple[Tensor, Tensor]:
        """The bias-corrected EMA means of ``x`` and ``y`` (NaN before the first step)."""
        return self._ema["x"].compute(), self._ema["y"].compute()

    def effective_steps(self, key: str = "x") -> float:
        r""":math:`n_t = 1/\sum_i w_i^2`: how many independent steps the means average over."""
        count = self._ema[key].count
        if count == 0:
            return 0.0
        return _effective_steps(self.decay, count)

    def mean_covariance(self) -> tuple[Tensor, Tensor, Tensor]:
        r"""Variances of the two means and their covariance, :math:`\hat\sigma^2/n_t` each
        (NaN with fewer than two steps, where no spread is seen)."""
        mx, my = self.means()
        n, n_spread = self.effective_steps("x"), self.effective_steps("xx")
        if min(n, n_spread) <= 1.0 + 1e-12:
            nan = torch.full_like(mx, math.nan)
            return nan, nan.clone(), nan.clone()
        # (equal counts but after a resume from a state saved before the spreads were kept)
        scale = (1.0 / n) / (1.0 - 1.0 / n_spread)

        def spread(key: str, a: Tensor, b: Tensor) -> Tensor:
            return (self._ema[key].compute() - a * b) * scale

        return spread("xx", mx, mx).clamp_min(0.0), spread("yy", my, my).clamp_min(0.0), spread("xy", mx, my)

    def state_dict(self) -> dict[str, Any]:
        return {key: ema.state_dict() for key, ema in self._ema.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, ema in self._ema.items():
            ema.load_state_dict(state[key])
