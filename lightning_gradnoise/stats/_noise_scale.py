r"""The gradient noise scale :math:`B_\text{simple}` from per-group squared gradient norms.

McCandlish et al. (2018), *An Empirical Model of Large-Batch Training*, App. A. A step's batch is
split into :math:`k` groups (devices x accumulation micro-batches). With :math:`g_j` the mean
gradient of group :math:`j` (of :math:`b_j` samples) and :math:`g = \frac1k\sum_j g_j`:

.. math::
    S_\text{small} = \frac1k \sum_j |g_j|^2, \quad
    \mathbb{E}[S_\text{small}] = |G|^2 + a\,\mathrm{tr}\,\Sigma, \quad a = \frac1k\sum_j \frac{1}{b_j}

    S_\text{big} = |g|^2, \quad
    \mathbb{E}[S_\text{big}] = |G|^2 + c\,\mathrm{tr}\,\Sigma, \quad c = \frac{1}{k^2}\sum_j \frac{1}{b_j}

Solving the two equations gives unbiased per-step estimates of :math:`|G|^2` and
:math:`\mathrm{tr}\,\Sigma`. For equal groups (:math:`a = 1/b`, :math:`c = 1/B`) this is the
paper's :math:`|G|^2 = (B S_\text{big} - b S_\text{small})/(B - b)` and
:math:`\mathrm{tr}\,\Sigma = (S_\text{small} - S_\text{big})/(1/b - 1/B)`. Unequal groups (the
short last batch of an epoch) use the general form, which weights the groups equally, as
Lightning's gradient accumulation does.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence, Union

import torch
from torch import Tensor

from lightning_gradnoise._validate import check_array, check_int, check_number
from lightning_gradnoise.stats._ema import BiasCorrectedEMA
from lightning_gradnoise.stats._interval import EMAMoments, fieller_interval, t_quantile

__all__ = ["NoiseScaleStats", "noise_scale_update", "noise_scale_update_from_sums",
    "noise_scale_from_moments", "noise_scale_compute", "GradientNoiseScale"]

GroupSizes = Union[int, Sequence[int], Tensor]


class NoiseScaleStats(NamedTuple):
    """Unbiased one-step estimates, each of the shape of the norms given (per layer or total)."""

    grad_sq: Tensor
    """:math:`|G|^2`, the squared norm of the true gradient."""
    trace_cov: Tensor
    r""":math:`\mathrm{tr}\,\Sigma`, the trace of the per-sample gradient covariance."""


def noise_scale_update(group_sq_norms: Tensor, mean_sq_norm: Tensor, group_sizes: GroupSizes) -> NoiseScaleStats:
    r"""Unbiased :math:`|G|^2` and :math:`\mathrm{tr}\,\Sigma` from one step (McCandlish App. A.1).

    Args:
        group_sq_norms: ``[k, ...]``, :math:`|g_j|^2` for each of the ``k >= 2`` groups; trailing
            dimensions (e.g. one per layer) are kept.
        mean_sq_norm: ``[...]``, :math:`|g|^2` of the equally weighted mean gradient of the groups.
        group_sizes: samples per group, one int for all or one per group.

    Returns:
        The two estimates, in float64. Either may come out negative on one step; only their
        averages over many steps are meaningful.

    Examples:
        >>> s = noise_scale_update(torch.tensor([5.0, 3.0]), torch.tensor(2.0), group_sizes=8)
        >>> float(s.trace_cov), float(s.grad_sq)   # S_small=4, S_big=2, b=8, B=16
        (32.0, 0.0)
    """
    group_sq_norms = torch.as_tensor(check_array("group_sq_norms", group_sq_norms, low=0, finite=False), dtype=torch.float64)
    mean_sq_norm = torch.as_tensor(check_array("mean_sq_norm", mean_sq_norm, low=0, finite=False), dtype=torch.float64)
    if group_sq_norms.dim() == 0 or group_sq_norms.shape[0] < 2:
        raise ValueError(
            f"group_sq_norms has shape {tuple(group_sq_norms.shape)}: at least 2 groups are needed "
            "(set accumulate_grad_batches >= 2 or train on 2+ devices)"
        )
    k = group_sq_norms.shape[0]
    if isinstance(group_sizes, (str, bytes)) or group_sizes is None:
        raise TypeError(f"group_sizes={group_sizes!r} is invalid: expected an int or one int per group")
    sizes = torch.as_tensor(group_sizes, dtype=torch.float64).reshape(-1)
    if sizes.numel() == 1:
        sizes = sizes.expand(k)
    if sizes.numel() != k:
        raise ValueError(f"group_sizes has {sizes.numel()} entries but there are {k} groups")
    if not bool(torch.isfinite(sizes).all()) or bool((sizes <= 0).any()):
        raise ValueError(f"group_sizes={sizes.tolist()} is invalid: every group size must be positive")
    return noise_scale_update_from_sums(group_sq_norms.sum(0), mean_sq_norm, k, float((1.0 / sizes).sum()))


def noise_scale_update_from_sums(
    sq_norm_sum: Tensor,
    mean_sq_norm: Tensor,
    num_groups: int,
    inv_size_sum: float,
    big_coef: float | None = None,
) -> NoiseScaleStats:
    r""":func:`noise_scale_update` from sums, as they arrive from an all-reduce across devices.

    Args:
        sq_norm_sum: :math:`\sum_j |g_j|^2` over all groups (per layer or total).
        mean_sq_norm: :math:`|g|^2`, :math:`g = \frac1k \sum_j g_j`.
        num_groups: :math:`k \ge 2`.
        inv_size_sum: :math:`\sum_j 1/b_j`.
        big_coef: :math:`c`, the weight of :math:`\mathrm{tr}\,\Sigma` in :math:`\mathbb{E}[S_\text{big}]`.
            By default :math:`\sum_j (1/b_j)/k^2`, right when :math:`g` weights the groups equally;
            pass :math:`1/\sum_j b_j` when :math:`g` is the sample-weighted mean (a summed loss).
    """
    if check_int("num_groups", num_groups) < 2:
        raise ValueError(
            f"num_groups={num_groups!r} is invalid: at least 2 groups are needed "
            "(set accumulate_grad_batches >= 2 or train on 2+ devices)"
        )
    k = int(num_groups)
    inv_size_sum = check_number("inv_size_sum", inv_size_sum, low=0, low_open=True)
    check_array("sq_norm_sum", sq_norm_sum, low=0, finite=False)
    check_array("mean_sq_norm", mean_sq_norm, low=0, finite=False)
    a = inv_size_sum / k
    c = inv_size_sum / k**2 if big_coef is None else check_number("big_coef", big_coef, low=0)
    if not a > c:
        raise ValueError(f"big_coef={c!r} is invalid: expected it below the mean inverse group size {a!r}")
    s_small = torch.as_tensor(sq_norm_sum, dtype=torch.float64) / k
    return noise_scale_from_moments(s_small, mean_sq_norm, a, c)


def noise_scale_from_moments(s_small: Tensor, s_big: Tensor, a: Tensor | float, c: Tensor | float) -> NoiseScaleStats:
    r"""Solve :math:`\mathbb{E}[S_\text{small}] = |G|^2 + a\,\mathrm{tr}\,\Sigma` and
    :math:`\mathbb{E}[S_\text{big}] = |G|^2 + c\,\mathrm{tr}\,\Sigma` for the two unknowns.

    .. math::
        \mathrm{tr}\,\Sigma = \frac{S_\text{small} - S_\text{big}}{a - c}, \qquad
        |G|^2 = \frac{a S_\text{big} - c S_\text{small}}{a - c}

    All arguments broadcast, so many steps (rows) are solved at once. Needs :math:`a > c \ge 0`.
    """
    check_array("s_small", s_small, low=0, finite=False)
    check_array("s_big", s_big, low=0, finite=False)
    check_array("a", a, low=0, low_open=True)
    check_array("c", c, low=0)
    if not isinstance(a, Tensor) and not isinstance(c, Tensor) and not float(c) < float(a):
        raise ValueError(f"c={c!r} is invalid: expected c < a ({a!r}); a is the weight of tr(Sigma) in E[S_small], c in E[S_big]")
    s_small = torch.as_tensor(s_small, dtype=torch.float64)
    s_big = torch.as_tensor(s_big, dtype=torch.float64)
    a = torch.as_tensor(a, dtype=torch.float64, device=s_small.device)
    c = torch.as_tensor(c, dtype=torch.float64, device=s_small.device)
    return NoiseScaleStats(grad_sq=(a * s_big - c * s_small) / (a - c), trace_cov=(s_small - s_big) / (a - c))


def noise_scale_compute(grad_sq: Tensor, trace_cov: Tensor) -> Tensor:
    r""":math:`B_\text{simple} = \mathrm{tr}\,\Sigma / |G|^2` (McCandlish Eq. 2.9).

    Pass *smoothed* numerator and denominator; the ratio of averages is the estimator, an
    average of per-step ratios is badly biased.
    """
    check_array("grad_sq", grad_sq, finite=False)
    check_array("trace_cov", trace_cov, finite=False)
    return torch.as_tensor(trace_cov, dtype=torch.float64) / torch.as_tensor(grad_sq, dtype=torch.float64)


class GradientNoiseScale:
    r"""Running :math:`B_\text{simple}`: separate bias-corrected EMAs of :math:`|G|^2` and
    :math:`\mathrm{tr}\,\Sigma`, divided last, each with how sure it is.

    Works on whole-model or per-layer norms (any trailing shape); :meth:`compute` with
    ``total=True`` sums the layers first, which is the whole-model value. :meth:`reading` gives
    the values with their intervals (:mod:`~lightning_gradnoise.stats._interval`): a t-interval
    for each smoothed mean, Fieller's interval for their ratio. While :math:`|G|^2`'s interval
    includes 0 the ratio is not determined, and :meth:`reading` says so with NaN.

    Args:
        decay: EMA decay in ``[0, 1)``.

    Examples:
        >>> gns = GradientNoiseScale(decay=0.9)
        >>> gns.update(torch.tensor([5.0, 3.0]), torch.tensor(2.0), group_sizes=8)
        True
        >>> float(gns.compute())
        inf
    """

    def __init__(self, decay: float = 0.95) -> None:
        self.layers = EMAMoments(decay)
        """Per-step estimates per layer (any trailing shape): x = \|G\|^2, y = tr(Sigma)."""
        self.total = EMAMoments(decay)
        """The same for the whole model (each step's sum over layers)."""

    @property
    def grad_sq(self) -> BiasCorrectedEMA:
        """The EMA of the per-step :math:`|G|^2` estimates (per layer)."""
        return self.layers.ema("x")

    @property
    def trace_cov(self) -> BiasCorrectedEMA:
        """The EMA of the per-step :math:`\mathrm{tr}\,\Sigma` estimates (per layer)."""
        return self.layers.ema("y")

    def update(self, group_sq_norms: Tensor, mean_sq_norm: Tensor, group_sizes: GroupSizes) -> bool:
        """Fold one step in; a step with a non-finite input is refused whole (returns ``False``)."""
        stats = noise_scale_update(group_sq_norms, mean_sq_norm, group_sizes)
        return self.update_many(stats.grad_sq[None], stats.trace_cov[None]) == 1

    def update_many(self, grad_sq: Tensor, trace_cov: Tensor) -> int:
        """Fold in steps' unbiased estimates (rows, first dimension); a row with a non-finite
        entry is refused whole. Returns the rows folded."""
        grad_sq = torch.as_tensor(grad_sq, dtype=torch.float64)
        trace_cov = torch.as_tensor(trace_cov, dtype=torch.float64)
        folded = self.layers.update_many(grad_sq, trace_cov)
        n = grad_sq.shape[0]
        if n == 0:
            return 0
        self.total.update_many(grad_sq.reshape(n, -1).sum(1), trace_cov.reshape(n, -1).sum(1))
        return folded

    def compute(self, total: bool = True) -> Tensor:
        g2, tr = self.grad_sq.compute(), self.trace_cov.compute()
        if total:
            g2, tr = g2.sum(), tr.sum()
        return noise_scale_compute(g2, tr)

    def reading(self, level: float = 0.9, total: bool = True) -> dict[str, Tensor]:
        r"""The smoothed :math:`|G|^2`, :math:`\mathrm{tr}\,\Sigma` and :math:`B_\text{simple}`,
        each with the two-sided ``level`` interval (keys ``grad_sq``, ``grad_sq_lo``,
        ``grad_sq_hi``, ``trace_cov...``, ``b_simple...``), whole-model or per layer.

        :math:`|G|^2` and :math:`\mathrm{tr}\,\Sigma` are non-negative, so their values and
        intervals are clipped at 0 (the unbiased one-step estimates can be negative; their
        smoothed value, early in a run, too). :math:`B_\text{simple}` is reported only where :math:`|G|^2` is resolved
        from zero (Fieller's interval is then bounded); elsewhere it and its interval are NaN: not
        determined yet. Its lower end is clipped at 0, as is its value (a negative smoothed
        :math:`\mathrm{tr}\,\Sigma` means no measurable noise).
        """
        moments = self.total if total else self.layers
        g2, tr = moments.means()
        v_g, v_t, cov = moments.mean_covariance()
        n = moments.effective_steps()
        t = t_quantile(level, n - 1.0) if n > 2.0 else math.inf
        se_g, se_t = v_g.sqrt(), v_t.sqrt()
        lo, hi = fieller_interval(tr, g2, v_t, v_g, cov, t) if math.isfinite(t) else (g2 * math.nan, g2 * math.nan)
        resolved = torch.isfinite(lo) & torch.isfinite(hi) & (g2 > 0)
        nan = torch.full_like(g2, math.nan)
        return {
            "grad_sq": g2.clamp_min(0.0), "grad_sq_lo": (g2 - t * se_g).clamp_min(0.0), "grad_sq_hi": (g2 + t * se_g).clamp_min(0.0),
            "trace_cov": tr.clamp_min(0.0), "trace_cov_lo": (tr - t * se_t).clamp_min(0.0), "trace_cov_hi": (tr + t * se_t).clamp_min(0.0),
            "b_simple": torch.where(resolved, tr.clamp_min(0.0) / torch.where(resolved, g2, torch.ones_like(g2)), nan),
            "b_simple_lo": torch.where(resolved, lo.clamp_min(0.0), nan),
            "b_simple_hi": torch.where(resolved, hi.clamp_min(0.0), nan),
        }

    def state_dict(self) -> dict[str, Any]:
        # (the EMAs of grad_sq and trace_cov are the layers' x and y: saved once, there)
        return {"layers": self.layers.state_dict(), "total": self.total.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "layers" in state:
            self.layers.load_state_dict(state["layers"])
            self.total.load_state_dict(state["total"])
        else:  # saved before the intervals existed: the means carry on, the spreads start afresh
            self.layers = EMAMoments(self.layers.decay)
            self.total = EMAMoments(self.total.decay)
            self.grad_sq.load_state_dict(state["grad_sq"])
            self.trace_cov.load_state_dict(state["trace_cov"])
