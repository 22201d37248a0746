r"""Gradient redundancy ratios of GR-Gauge: spatial :math:`GR_S` and temporal :math:`GR_T`.

Wang & Chen, *GR-Gauge* (supplement in ``papers/gr-gauge-supplement.md``): Def. 2 and Lemma 2
for :math:`GR_S`, Def. 1, Lemma 1 (Eq. 19) and Theorem 1 for :math:`GR_T`, App. D for the
multi-device estimate, App. E for the ideal ranges.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from lightning_gradnoise._validate import check_array, check_int, check_number

__all__ = [
    "gr_s",
    "gr_s_groups",
    "mu_from_gr_s_groups",
    "divided_power",
    "gr_t_expected",
    "ema_effective_steps",
    "gr_t_frozen",
    "TemporalRedundancy",
]

def gr_s(b_simple: Tensor | float, batch_size: Tensor | float) -> Tensor:
    r"""Expected spatial redundancy at global batch :math:`B` (GR-Gauge Lemma 2, Eq. 25).

    .. math:: GR_S = \frac{1 + \mu}{B + \mu}, \qquad \mu = B_\text{simple}

    Examples:
        >>> float(gr_s(100.0, 100.0))   # B = mu gives about 0.5
        0.505

    GR_S rises with :math:`\mu` toward 1 at any :math:`B > 1`, so an interval of
    :math:`B_\text{simple}` maps to one of :math:`GR_S` end to end.
    """
    # a tensor may hold NaN where B_simple is not determined yet: GR_S is then NaN too
    mu = torch.as_tensor(check_array("b_simple", b_simple, low=0, finite=not isinstance(b_simple, Tensor)), dtype=torch.float64)
    return (1.0 + mu) / (torch.as_tensor(check_array("batch_size", batch_size, low=0, low_open=True), dtype=torch.float64) + mu)


def gr_s_groups(group_sq_norms: Tensor, mean_sq_norm: Tensor) -> Tensor:
    r""":math:`\xi_k` of GR-Gauge App. D (Eq. 31) over all ``k`` groups of one step.

    .. math:: \xi_k = \frac{\sum_j |g_j|^2}{|\sum_j g_j|^2} = \frac{S_\text{small}}{k\,S_\text{big}}
    """
    check_array("group_sq_norms", group_sq_norms, low=0, finite=False)
    check_array("mean_sq_norm", mean_sq_norm, low=0, finite=False)
    if len(group_sq_norms.shape) == 0 or group_sq_norms.shape[0] < 2:
        raise ValueError(f"group_sq_norms of shape {tuple(group_sq_norms.shape)} is invalid: expected [k, ...] with k >= 2 groups")
    if tuple(mean_sq_norm.shape) != tuple(group_sq_norms.shape[1:]):
        raise ValueError(f"mean_sq_norm of shape {tuple(mean_sq_norm.shape)} is invalid: expected {tuple(group_sq_norms.shape[1:])}, "
                         "the shape of group_sq_norms without its first (group) dimension")
    group_sq_norms = torch.as_tensor(group_sq_norms, dtype=torch.float64)
    k = group_sq_norms.shape[0]
    return group_sq_norms.mean(0) / (k * torch.as_tensor(mean_sq_norm, dtype=torch.float64))


def mu_from_gr_s_groups(xi: Tensor | float, k: int, group_size: float) -> Tensor:
    r""":math:`\mu` from :math:`\xi_k` by inverting Eq. 33 (GR-Gauge App. D, Eq. 34).

    .. math:: \mu = b\left(\frac{k - 1}{1 - \xi_k} - k\right)

    Needs :math:`0 < \xi_k < 1`, ``k >= 2`` and ``group_size > 0``.
    """
    if check_int("k", k) < 2:
        raise ValueError(f"k={k!r} is invalid: expected a whole number >= 2 (groups)")
    group_size = check_number("group_size", group_size, low=0, low_open=True)
    xi = torch.as_tensor(check_array("xi", xi, low=0, low_open=True, high=1, high_open=True), dtype=torch.float64)
    return group_size * ((k - 1) / (1.0 - xi) - k)


def divided_power(a: Tensor, b: Tensor, p: Tensor | float, tol: float = 1e-7) -> Tensor:
    r""":math:`(a^p - b^p)/(a - b)`, continued by :math:`p\,m^{p-1}` (:math:`m = (a+b)/2`) where
    :math:`|a - b| <` ``tol``, which is exact to second order and removes the 0/0.

    Examples:
        >>> float(divided_power(torch.tensor(0.5), torch.tensor(0.5), 3.0))   # 3 * 0.5**2
        0.75
    """
    check_array("a", a)
    check_array("b", b)
    check_array("p", p)
    check_number("tol", tol, low=0, low_open=True)
    return divided_power_unchecked(a, b, p, tol)


def divided_power_unchecked(a: Tensor, b: Tensor, p: Tensor | float, tol: float = 1e-7) -> Tensor:
    """:func:`divided_power` without its argument checks, for the NQM's inner loops."""
    diff = a - b
    close = diff.abs() < tol
    safe = torch.where(close, torch.ones_like(diff), diff)
    exact = (a**p - b**p) / safe
    mid = 0.5 * (a + b)
    return torch.where(close, p * mid ** (p - 1.0), exact)


def gr_t_expected(mu_over_b: Tensor | float, lr_lambda: Tensor | float, beta: float = 0.9) -> Tensor:
    r"""Expected stable :math:`GR_T` of GR-Gauge Lemma 1 (Eq. 19).

    With :math:`r = \mu/B`, :math:`x = \bar\lambda\eta`, :math:`T = 1/(1-\beta)`,
    :math:`q = 1 - 2x/(1+r)` and :math:`p = 1 - x`, Eq. 19 is

    .. math::
        \mathbb{E}[GR_T] = \frac{(1+r)^2 (1-x-\beta)^2 (\beta^T - q^T)}
                               {(1-\beta)\,(2x - (1-\beta)(1+r))\,(\beta^T - p^T)^2}
                         = \frac{(1+r)\, D(\beta, q)}{(1-\beta)\, D(\beta, p)^2},

    where :math:`D(a, b) = (a^T - b^T)/(a - b)`. The second form has no 0/0 at
    :math:`2x = (1-\beta)(1+r)` (the removable singularity) nor at :math:`x = 1 - \beta`. It is
    defined for :math:`0 \le x \le 1` and :math:`q \ge 0`; outside that it is NaN. At
    :math:`x \to 0` it tends to :math:`(1+r)/(1-\beta^T)`.

    Examples:
        >>> round(float(gr_t_expected(1.0, 0.5)), 1)   # B = mu, eta = 1/(2 lambda): about 20
        23.0
    """
    beta = check_number("beta", beta, low=0, low_open=True, high=1, high_open=True)
    r = torch.as_tensor(check_array("mu_over_b", mu_over_b, low=0), dtype=torch.float64)
    x = torch.as_tensor(check_array("lr_lambda", lr_lambda, low=0), dtype=torch.float64)
    r, x = torch.broadcast_tensors(r, x)
    t = 1.0 / (1.0 - beta)
    bt = torch.full_like(x, beta)
    q = 1.0 - 2.0 * x / (1.0 + r)
    p = 1.0 - x
    value = (1.0 + r) * divided_power_unchecked(bt, q, t) / ((1.0 - beta) * divided_power_unchecked(bt, p, t) ** 2)
    valid = (x >= 0) & (p >= 0) & (q >= 0) & (r >= 0)
    return torch.where(valid, value, torch.full_like(value, float("nan")))


def ema_effective_steps(beta: float, steps: int | None = None) -> float:
    r"""How many independent steps a bias-corrected EMA of ``steps`` values averages over.

    With weights :math:`w_i = (1-\beta)\beta^{t-i}/(1-\beta^t)` (they sum to 1),

    .. math:: n_t = \frac{1}{\sum_i w_i^2} = \frac{(1-\beta^t)^2 (1+\beta)}{(1-\beta)(1-\beta^{2t})}
        \;\xrightarrow{t\to\infty}\; \frac{1+\beta}{1-\beta}

    (``steps=None``: the limit, 19 at :math:`\beta = 0.9`).

    Examples:
        >>> ema_effective_steps(0.9, 1), round(ema_effective_steps(0.9, 10), 2), round(ema_effective_steps(0.9), 2)
        (1.0, 9.18, 19.0)
    """
    beta = check_number("beta", beta, low=0, low_open=True, high=1, high_open=True)
    if steps is None:
        return (1.0 + beta) / (1.0 - beta)
    steps = check_int("steps", steps, low=1)
    return (1.0 - beta**steps) ** 2 * (1.0 + beta) / ((1.0 - beta) * (1.0 - beta ** (2 * steps)))


def gr_t_frozen(mu_over_b: Tensor | float, beta: float = 0.9, steps: int | None = None) -> Tensor:
    r"""Exact expected :math:`GR_T` of a frozen model (learning rate 0) with gradient noise,
    ``steps`` steps into its EMAs (``None``: the steady state).

    Each step's gradient is i.i.d. with mean :math:`G` and covariance :math:`\Sigma/B`, so
    :math:`\mathbb{E}|\hat v|_1 = |G|^2(1 + r)` and :math:`\mathbb{E}|\hat m|^2 = |G|^2(1 + r/n_t)`,
    :math:`r = \mu/B`, :math:`n_t` = :func:`ema_effective_steps`:

    .. math:: GR_T = \frac{1 + r}{1 + r/n_t} \;\xrightarrow{t\to\infty}\; \frac{1 + r}{1 + r\,(1-\beta)/(1+\beta)}

    A young EMA reads low whatever the learning rate: with pure noise (:math:`r \to \infty`)
    :math:`GR_T \to n_t`, about 9.2 after 10 steps at :math:`\beta = 0.9`, against a target of 20.

    Examples:
        >>> round(float(gr_t_frozen(1e9)), 2), round(float(gr_t_frozen(1e9, steps=10)), 2)
        (19.0, 9.18)
    """
    r = torch.as_tensor(check_array("mu_over_b", mu_over_b, low=0), dtype=torch.float64)
    return (1.0 + r) / (1.0 + r / ema_effective_steps(beta, steps))


class TemporalRedundancy:
    r""":math:`GR_T` of GR-Gauge Def. 1: elementwise EMAs of the step's mean gradient.

    .. math::
        m_t = \beta m_{t-1} + (1-\beta) g_t, \quad v_t = \beta v_{t-1} + (1-\beta) g_t^2, \quad
        GR_T = \frac{|\hat v_t|_1}{|\hat m_t|^2}

    with the bias corrections :math:`\hat m_t = m_t/(1-\beta^t)`, :math:`\hat v_t = v_t/(1-\beta^t)`.
    It holds two buffers the size of the tensors it watches and must see every step's gradient.
    The update uses torch's multi-tensor (``foreach``) kernels.

    Args:
        beta: EMA factor, 0.9 in the paper.

    Examples:
        >>> grt = TemporalRedundancy(beta=0.9)
        >>> grt.update([torch.ones(3)])
        True
        >>> round(float(grt.compute()), 6)   # a constant gradient has no redundancy over time
        1.0
    """

    def __init__(self, beta: float = 0.9) -> None:
        self.beta = check_number("beta", beta, low=0, low_open=True, high=1, high_open=True)
        self.count = 0
        self.rejected = 0
        self.m: list[Tensor] = []
        self.v: list[Tensor] = []
        from lightning_gradnoise.stats._interval import EMAMoments

        # per tensor and whole: each step's |g|^2 (its EMA is |v_hat|_1) and m_hat . g (its EMA
        # is |m_hat|^2 to first order), under the same weights: their spread gives the interval
        self.spread = EMAMoments(self.beta)
        self._steps: list[tuple[list[Tensor], list[Tensor], float]] = []

    def update(self, grads: Sequence[Tensor], checked: bool = False) -> bool:
        """Fold in one step's gradients; a step with any non-finite element is refused whole.

        ``checked=True`` skips that test for a caller that already made it (e.g. from norms)."""
        grads = [g.detach() for g in grads]
        if not grads:
            return False
        if not checked and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            self.rejected += 1
            return False
        if self.m and self.m[0].device != grads[0].device:
            self.m = [t.to(grads[0].device) for t in self.m]
            self.v = [t.to(grads[0].device) for t in self.v]
        if not self.m:
            self.m = [torch.zeros_like(g, dtype=torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else g.dtype) for g in grads]
            self.v = [torch.zeros_like(m) for m in self.m]
        if any(g.dtype != m.dtype for g, m in zip(grads, self.m)):
            grads = [g.to(m.dtype) for g, m in zip(grads, self.m)]
        torch._foreach_lerp_(self.m, grads, 1.0 - self.beta)
        torch._foreach_mul_(self.v, self.beta)
        torch._foreach_addcmul_(self.v, grads, grads, value=1.0 - self.beta)
        self.count += 1
        # each step's |g|^2 and m_hat . g per tensor, kept as they are and folded into the
        # spread's EMAs when read (a few kernels per step, no EMA arithmetic, no sync)
        sq = torch._foreach_norm(grads)
        dots = [torch.vdot(m.reshape(-1), g.reshape(-1)) for m, g in zip(self.m, grads)]
        self._steps.append((sq, dots, 1.0 - self.beta**self.count))
        if len(self._steps) >= 256:
            self._flush()
        return True

    def _flush(self) -> None:
        if not self._steps:
            return
        steps, self._steps = self._steps, []
        sq = torch.stack([torch.stack(s) for s, _, _ in steps]).to(torch.float64).square_()
        dots = torch.stack([torch.stack(d) for _, d, _ in steps]).to(torch.float64)
        dots /= torch.tensor([c for _, _, c in steps], dtype=torch.float64, device=dots.device)[:, None]
        self.spread.update_many(torch.cat([sq, sq.sum(1, keepdim=True)], 1), torch.cat([dots, dots.sum(1, keepdim=True)], 1))

    def reading(self, level: float = 0.9) -> dict[str, Tensor]:
        r"""``gr_t`` with its ``level`` interval (``gr_t_lo``, ``gr_t_hi``), whole model, and
        ``layer_gr_t`` (``_lo``, ``_hi``) per tensor, float64.

        :math:`GR_T = A/B` with :math:`A = |\hat v|_1 = \sum_t w_t |g_t|^2` and, to first order,
        :math:`B = |\hat m|^2 = \sum_t w_t\, \hat m\cdot g_t`, both means under the EMA's weights
        :math:`w_t`: Fieller's interval for their ratio (:func:`~lightning_gradnoise.stats.fieller_interval`),
        with :math:`\mathrm{Var}[B] = 4\,\mathrm{Var}[\overline{\hat m\cdot g}]`. At a fixed point
        it covers :math:`\mathbb E[A]/\mathbb E[B]` (:func:`gr_t_frozen` for a frozen model);
        while the model moves, the steps' drift widens it. Unbounded (``inf``) while :math:`B` is
        not resolved from zero."""
        from lightning_gradnoise.stats._interval import fieller_interval, t_quantile

        level = check_number("level", level, low=0, low_open=True, high=1, high_open=True)
        self._flush()
        v1, m2 = self.components()
        num = torch.cat([v1, v1.sum().view(1)])
        den = torch.cat([m2, m2.sum().view(1)])
        values = num / den
        vx, vy, cxy = self.spread.mean_covariance()
        n = self.spread.effective_steps()
        if self.count < 2 or not n > 1:
            lo, hi = torch.full_like(values, float("nan")), torch.full_like(values, float("nan"))
        else:
            t = t_quantile(level, max(n - 1.0, 1.0))
            # B = |G + e|^2 with e the EMA of the noise: Var[B] = 4 G'Sigma_e G + 2 tr(Sigma_e^2).
            # The spread of m_hat . g_t measures m_hat'Sigma m_hat, which exceeds G'Sigma G by
            # tr(Sigma^2)/n: so Var[B] = 4 vy - 2 tr(Sigma^2)/n^2, tr(Sigma^2) from the EMAs' own
            # elementwise variances v_hat - m_hat^2 (bias-corrected)
            corr = 1.0 - self.beta**self.count
            tr2 = torch.stack([((v / corr - (m / corr).square()).clamp_min(0.0).to(torch.float64) * n / (n - 1)).square().sum()
                               for m, v in zip(self.m, self.v)])
            tr2 = torch.cat([tr2, tr2.sum().view(1)])
            v_den = (4.0 * vy.view(-1) - 2.0 * tr2 / n**2).clamp_min(0.0)
            lo, hi = fieller_interval(num, den, vx.view(-1), v_den, 2.0 * cxy.view(-1), t)
            lo = lo.clamp_min(1.0)  # |v_hat|_1 >= |m_hat|^2 always (Cauchy-Schwarz on the EMA)
        out = {"gr_t": values[-1], "gr_t_lo": lo[-1], "gr_t_hi": hi[-1]}
        out.update({"layer_gr_t": values[:-1], "layer_gr_t_lo": lo[:-1], "layer_gr_t_hi": hi[:-1]})
        return out

    def components(self) -> tuple[Tensor, Tensor]:
        r"""Per tensor :math:`|\hat v|_1` and :math:`|\hat m|^2` (float64, one entry per tensor)."""
        if not self.m:
            nan = torch.tensor([float("nan")], dtype=torch.float64)
            return nan, nan
        corr = 1.0 - self.beta**self.count
        v1 = torch.stack([v.sum(dtype=torch.float64) for v in self.v]) / corr
        m2 = torch.stack([torch.linalg.vector_norm(m, dtype=torch.float64) ** 2 for m in self.m]) / corr**2
        return v1, m2

    def compute(self, total: bool = True) -> Tensor:
        """Whole-model :math:`GR_T` (``total=True``) or one value per tensor."""
        v1, m2 = self.components()
        if total:
            return v1.sum() / m2.sum()
        return v1 / m2

    def state_dict(self) -> dict[str, Any]:
        self._flush()
        return {
            "beta": self.beta,
            "count": self.count,
            "rejected": self.rejected,
            "m": [t.clone() for t in self.m],
            "v": [t.clone() for t in self.v],
            "spread": self.spread.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        self.beta = float(state["beta"])
        self.count = int(state["count"])
        self.rejected = int(state["rejected"])
        self.m = [t.clone().to(device) if device is not None else t.clone() for t in state["m"]]
        self.v = [t.clone().to(device) if device is not None else t.clone() for t in state["v"]]
        from lightning_gradnoise.stats._interval import EMAMoments

        self.spread = EMAMoments(self.beta)
        self._steps = []
        if "spread" in state:  # (absent from checkpoints saved before GR_T had an interval)
            self.spread.load_state_dict(state["spread"])
