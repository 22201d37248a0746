r"""The logged GSNR: per-sample gradient signal-to-noise ratio, pooled over steps.

VRGD Eq. 2 defines each parameter's GSNR from the per-sample gradients:

.. math:: r_i = \frac{G_i^2}{\rho_i^2}, \qquad G = \mathbb E[g], \quad \rho_i^2 = \mathrm{Var}[g_i]

and the logged ``gsnr`` is its mean over a layer's elements (and over the whole model), the
quantity VRGD normalizes by. It does not depend on the batch size or on the number of groups.

One step's :math:`k` group gradients give, per element, unbiased estimates of both terms
(:func:`gsnr_moments`), but the ratio of one step's estimates has an infinite expectation at
:math:`k = 2` and 3 (a variance with one or two degrees of freedom in the denominator). So the
two estimates are smoothed *separately*, per element, by bias-corrected EMAs over the measured
steps, and the ratio is taken of the smoothed values, with the first-order correction of
:math:`\mathbb E[1/\hat\rho^2]` for a normal spread with :math:`\nu = (k-1)\,n_t` degrees of
freedom (:math:`n_t` the EMA's effective number of steps):

.. math:: \hat r_i = \frac{\bar G_i^2}{\bar\rho_i^2}\cdot\frac{\nu - 2}{\nu}

The reading is NaN (not yet determined) while :math:`\nu \le 2`. Elements whose spread is zero
(no noise: unused or frozen) have no GSNR and are left out of the means. Its interval is the
delta method's, from the spread over steps of each step's influence on the mean.

Costs two parameter-sized buffers (the smoothed numerator and denominator), in float32.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from lightning_gradnoise._validate import check_int, check_number, fail
from lightning_gradnoise.stats._ema import BiasCorrectedEMA
from lightning_gradnoise.stats._interval import EMAMoments, t_quantile

__all__ = ["gsnr_moments", "GSNRStatistic"]


def gsnr_moments(mean: Tensor, m2: Tensor, k: int, inv_size_sum: float | None = None) -> tuple[Tensor, Tensor]:
    r"""One step's unbiased per-element estimates of :math:`G_i^2` and of the per-sample variance
    :math:`\rho_i^2`, from the mean of the :math:`k` group gradients and their centred sum of
    squares :math:`M_2 = \sum_j (g_j - \bar g)^2` (no cancellation: computed in float64).

    With group sizes :math:`b_j` and :math:`s = \sum_j 1/b_j`:
    :math:`\mathbb E[M_2/k] = \rho^2 (s/k - s/k^2)` and :math:`\mathbb E[\bar g^2] = G^2 + \rho^2 s/k^2`, so

    .. math:: \hat\rho^2 = \frac{M_2/k}{s/k - s/k^2}, \qquad \hat G^2 = \bar g^2 - \frac{s}{k^2}\hat\rho^2

    Args:
        mean: :math:`\bar g`, the unweighted mean of the group gradients.
        m2: :math:`M_2`, same shape.
        k: the number of groups, at least 2.
        inv_size_sum: :math:`\sum_j 1/b_j`; ``None`` counts every group as one sample (then
            :math:`\hat\rho^2` is the variance of a group's gradient).

    Examples:
        >>> g2, var = gsnr_moments(torch.tensor([1.0]), torch.tensor([0.5]), k=2, inv_size_sum=2.0)
        >>> float(var), float(g2)     # groups of one sample: 1.0 and 0.5
        (0.5, 0.75)
    """
    k = check_int("k", k, low=2)
    s = float(k) if inv_size_sum is None else check_number("inv_size_sum", inv_size_sum, low=0, low_open=True)
    if not isinstance(mean, Tensor) or not isinstance(m2, Tensor):
        fail("mean" if not isinstance(mean, Tensor) else "m2", mean if not isinstance(mean, Tensor) else m2, "a tensor", TypeError)
    if mean.shape != m2.shape:
        fail("m2", f"<tensor of shape {tuple(m2.shape)}>", f"the shape of mean, {tuple(mean.shape)}")
    g = mean.to(torch.float64)
    var = m2.to(torch.float64).clamp_min(0.0) / k / (s / k - s / k**2)
    return g * g - (s / k**2) * var, var


class GSNRStatistic:
    r"""Running per-element GSNR (VRGD Eq. 2) of several tensors, with its interval.

    :meth:`update` takes one step's group means and centred sums of squares (as
    :func:`gsnr_moments`); :meth:`reading` gives the whole-model and per-tensor means of the
    smoothed per-element ratio with a ``level`` interval.

    Args:
        decay: the EMA decay per measured step, in ``[0, 1)``.
        dtype: of the two smoothed buffers (float32; float64 for a reference).

    Examples:
        >>> stat = GSNRStatistic(decay=0.9)
        >>> gen = torch.Generator().manual_seed(0)
        >>> for _ in range(200):   # 4 groups of one sample, G = 1, rho = 2: GSNR 0.25
        ...     g = 1.0 + 2.0 * torch.randn(4, 1000, generator=gen)
        ...     _ = stat.update([g.mean(0)], [(g - g.mean(0)).square().sum(0)], k=4, inv_size_sum=4.0)
        >>> 0.2 < float(stat.reading()["gsnr"]) < 0.3
        True
    """

    def __init__(self, decay: float = 0.95, dtype: torch.dtype = torch.float32) -> None:
        self.decay = check_number("decay", decay, low=0, high=1, high_open=True)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            fail("dtype", dtype, "a floating-point torch.dtype", TypeError)
        self.dtype = dtype
        self.count = 0
        # every tensor's elements in one flat buffer, so that a step costs a fixed number of
        # kernels whatever the number of tensors; per-tensor sums by segment
        self._num: Tensor | None = None
        self._den: Tensor | None = None
        self._sizes: list[int] = []
        self._segments: Tensor | None = None
        self._dof = 0.0  # EMA of k - 1 (bias-corrected at read)
        self._influence = EMAMoments(self.decay)
        self._bias = BiasCorrectedEMA(self.decay)

    def update(self, means: Sequence[Tensor], m2s: Sequence[Tensor], k: int, inv_size_sum: float | None = None) -> bool:
        """Fold in one step; a step with a non-finite value is refused whole (``False``)."""
        for name, xs in (("means", means), ("m2s", m2s)):
            if isinstance(xs, (Tensor, str, bytes)) or not isinstance(xs, Sequence) or not xs:
                fail(name, xs, "a non-empty list of tensors", TypeError if not isinstance(xs, Sequence) else ValueError)
        if len(means) != len(m2s):
            fail("m2s", f"<{len(m2s)} tensors>", f"one tensor per mean ({len(means)})")
        for i, (m, s2) in enumerate(zip(means, m2s)):
            if not isinstance(m, Tensor) or not isinstance(s2, Tensor):
                fail("means" if not isinstance(m, Tensor) else "m2s", m if not isinstance(m, Tensor) else s2, "a list of tensors", TypeError)
            if m.shape != s2.shape:
                fail(f"m2s[{i}]", f"<tensor of shape {tuple(s2.shape)}>", f"the shape of means[{i}], {tuple(m.shape)}")
        sizes = [m.numel() for m in means]
        if self._sizes and sizes != self._sizes:
            fail("means", f"<tensors of sizes {sizes[:4]}...>", f"the tensors of the earlier steps, of sizes {self._sizes[:4]}...")
        flat = lambda xs: torch.cat([x.reshape(-1) for x in xs]).detach().to(torch.float64)  # noqa: E731
        g2, var = gsnr_moments(flat(means), flat(m2s), k, inv_size_sum)
        if not bool(torch.isfinite(g2).all() & torch.isfinite(var).all()):
            return False
        d = self.decay
        if self._num is None:
            self._sizes = sizes
            self._num = torch.zeros_like(g2, dtype=self.dtype)
            self._den = torch.zeros_like(g2, dtype=self.dtype)
            self._segments = torch.repeat_interleave(torch.arange(len(sizes), device=g2.device), torch.tensor(sizes, device=g2.device))
        assert self._den is not None
        # each step's influence on the mean of num/den (delta method), and the second-order bias
        # of a ratio of smoothed values (E[1/den] > 1/E[den]), per tensor and whole. Measured
        # against the mean of the values before and after this step once those before rest on 10
        # degrees of freedom (after it until then): against those after alone, a heavy-tailed
        # step shrinks its own influence by pulling the denominator up; against those before
        # alone, their noise inflates it (both measured by simulation, tests/test_gsnr_reading.py).
        before = self._ratios() if self.degrees_of_freedom > 10 else None
        self._num.mul_(d).add_(g2.to(self.dtype), alpha=1 - d)
        self._den.mul_(d).add_(var.to(self.dtype), alpha=1 - d)
        self._dof = d * self._dof + (1 - d) * (k - 1)
        self.count += 1
        ratio, den, ok = self._ratios()
        safe = torch.where(ok, den, 1.0)
        dv = (var - den) / safe
        q = torch.where(ok, ratio * dv * dv - (g2 - ratio * den) / safe * dv, 0.0)
        z = torch.where(ok, (g2 - ratio * var) / safe, 0.0)
        if before is not None:
            r0, den0, ok0 = before
            z = 0.5 * (z + torch.where(ok0, (g2 - r0 * var) / torch.where(ok0, den0, 1.0), 0.0))
        sums = self._segment_sums(torch.stack([z, q, ratio, ok.to(torch.float64)], 1))  # [tensors + 1, 4]
        zs, qs, ws, counts = sums.unbind(1)
        z_mean = (zs / counts.clamp_min(1)).view(1, -1)
        self._influence.update_many(z_mean, z_mean * z_mean)  # y = z^2: its EMA's spread gives z's kurtosis
        self._bias.update_many((qs / ws).view(1, -1))
        return True

    def _segment_sums(self, values: Tensor) -> Tensor:
        """Per-tensor sums of flat per-element ``values`` ``[elements, c]``, and the whole model's
        as the last row."""
        assert self._segments is not None
        out = torch.zeros(len(self._sizes) + 1, values.shape[1], dtype=values.dtype, device=values.device)
        out[:-1].index_add_(0, self._segments, values)
        out[-1] = out[:-1].sum(0)
        return out

    def _ratios(self) -> tuple[Tensor, Tensor, Tensor]:
        assert self._num is not None and self._den is not None
        corr = 1.0 - self.decay**self.count
        den = self._den.to(torch.float64) / corr
        ok = den > 0
        ratio = torch.where(ok, self._num.to(torch.float64) / corr / torch.where(ok, den, 1.0), 0.0)
        return ratio, den, ok

    def ratios(self) -> list[Tensor]:
        """The smoothed per-element ratios of each tensor (NaN where no noise was seen), before
        the small-sample correction of :meth:`reading`."""
        if self._num is None:
            return []
        ratio, _, ok = self._ratios()
        return list(torch.where(ok, ratio, math.nan).split(self._sizes))

    @property
    def degrees_of_freedom(self) -> float:
        r""":math:`\nu = (k-1)\,n_t`: the smoothed variance's degrees of freedom (0 before a step)."""
        if not self.count:
            return 0.0
        from lightning_gradnoise.stats._redundancy import ema_effective_steps

        n = 1.0 if self.decay == 0 else ema_effective_steps(self.decay, self.count)
        return self._dof / (1.0 - self.decay**self.count) * n

    def reading(self, level: float = 0.9) -> dict[str, Tensor]:
        """``gsnr``, ``gsnr_lo``, ``gsnr_hi`` (0-d), and ``layer_gsnr``, ``layer_gsnr_lo``,
        ``layer_gsnr_hi`` (one per tensor), as float64; NaN while not determined."""
        level = check_number("level", level, low=0, low_open=True, high=1, high_open=True)
        if not self.count:
            nan = torch.tensor(math.nan, dtype=torch.float64)
            return {"gsnr": nan, "gsnr_lo": nan, "gsnr_hi": nan}
        nu = self.degrees_of_freedom
        ratio, _, ok = self._ratios()
        sums, counts = self._segment_sums(torch.stack([ratio, ok.to(torch.float64)], 1)).unbind(1)
        n = self._influence.effective_steps()
        if nu > 2.0:
            corr = 1.0 / (1.0 + self._bias.compute().clamp_min(0.0) / n)
        else:  # too few degrees of freedom: the ratio's mean is not yet finite
            corr = torch.full_like(sums, math.nan)
        values = sums / counts * corr
        var, _, _ = self._influence.mean_covariance()
        if n > 1:
            # Student's t with the degrees of freedom of the spread's estimate (Satterthwaite),
            # fewer when the per-step influences are heavy-tailed: 2 / (2/(n-1) + excess kurtosis/n)
            z2, z4 = self._influence.ema("y").compute(), self._influence.ema("yy").compute()
            excess = (z4 / (z2 * z2).clamp_min(1e-300) - 3.0).clamp_min(0.0)
            df = 2.0 / (2.0 / max(n - 1.0, 1.0) + excess / n)
            t = torch.tensor([t_quantile(level, max(float(f), 1.0)) if math.isfinite(f) else math.inf for f in df.tolist()], dtype=torch.float64)
            half = t * var.view(-1).sqrt() * corr
            lo, hi = (values - half).clamp_min(0.0), values + half
        else:
            lo, hi = torch.zeros_like(values), torch.full_like(values, math.inf)
        out = {"gsnr": values[-1], "gsnr_lo": lo[-1], "gsnr_hi": hi[-1]}
        out.update({"layer_gsnr": values[:-1], "layer_gsnr_lo": lo[:-1], "layer_gsnr_hi": hi[:-1]})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "count": self.count, "sizes": list(self._sizes),
                "num": None if self._num is None else self._num.clone(), "den": None if self._den is None else self._den.clone(),
                "dof": self._dof, "influence": self._influence.state_dict(), "bias": self._bias.state_dict()}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        self.decay = float(state["decay"])
        self.count = int(state["count"])
        self._sizes = list(state["sizes"])
        self._num = None if state["num"] is None else state["num"].clone().to(device)
        self._den = None if state["den"] is None else state["den"].clone().to(device)
        self._segments = None
        if self._num is not None:
            self._segments = torch.repeat_interleave(torch.arange(len(self._sizes), device=self._num.device),
                                                     torch.tensor(self._sizes, device=self._num.device))
        self._dof = float(state["dof"])
        self._influence = EMAMoments(self.decay)
        self._influence.load_state_dict(state["influence"])
        self._bias = BiasCorrectedEMA(self.decay)
        self._bias.load_state_dict(state["bias"])
