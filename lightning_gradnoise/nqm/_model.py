r"""The noisy quadratic model (Zhang et al. 2019, *Which Algorithmic Choices Matter at Which Batch
Sizes?*, Sec. 3): exact expected risk, steps to a target, the best constant learning rate.

Per dimension :math:`i`: loss :math:`\tfrac12 h_i \theta_i^2`, stochastic gradient
:math:`h_i\theta_i + \epsilon_i` with :math:`\mathrm{Var}[\epsilon_i] = c_i/B`, preconditioner
:math:`P = H^p`. Plain SGD (Eq. 4):

.. math::
    \mathbb{E}[\theta_i(t)^2] = q^t\,(m_0 - m_\infty) + m_\infty,\quad
    q = (1 - \alpha h_i^{1-p})^2,\quad m_\infty = \frac{\alpha^2 c_i h_i^{-2p} / B}{1 - q}

which is MATH.md's risk formula with :math:`h \to h^{1-p}`, :math:`c \to c\,h^{-p}`. Heavy-ball
momentum and an iterate EMA are exact two-state linear recurrences (not Theorem 1's or 2's bounds),
solved in closed form by :class:`~lightning_gradnoise.nqm._linear.SecondMoment`. Everything is
vectorized: learning rates, batch sizes and steps broadcast against each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from lightning_gradnoise._validate import check_int, check_number, fail
from lightning_gradnoise.nqm._linear import SecondMoment
from lightning_gradnoise.stats._checks import checked_tensor

__all__ = ["NQM"]

_F64 = torch.float64


def _t(x, dtype=_F64) -> Tensor:
    return torch.as_tensor(x, dtype=dtype)


@dataclass
class NQM:
    """A noisy quadratic model with diagonal curvature ``h`` and gradient noise ``c``.

    Args:
        h: curvature per dimension (or per bin of dimensions).
        c: gradient-noise variance per dimension at batch size 1.
        weight: how many dimensions each entry stands for (binning); default ones.
        theta0_var: :math:`\\mathbb{E}[\\theta_i(0)^2]`; default ones (:math:`\\theta(0) \\sim N(0, I)`).

    Examples:
        >>> model = NQM.paper(d=1000, bins=50)
        >>> steps = model.steps_to_target(lr=0.5, batch=64, target=0.05)
        >>> bool(torch.isfinite(steps))
        True
    """

    h: Tensor
    c: Tensor
    weight: Optional[Tensor] = None
    theta0_var: Optional[Tensor] = None

    def __post_init__(self) -> None:
        self.h = checked_tensor("h", self.h, low=0, low_open=True, min_numel=1).reshape(-1)
        self.c = checked_tensor("c", self.c, low=0).reshape(-1)
        n = self.h.numel()
        for name, low_open in (("weight", True), ("theta0_var", False)):
            value = getattr(self, name)
            setattr(self, name, torch.ones_like(self.h) if value is None else checked_tensor(name, value, low=0, low_open=low_open).reshape(-1))
        for name in ("c", "weight", "theta0_var"):
            if getattr(self, name).numel() != n:
                fail(name, getattr(self, name).tolist(), f"one value per entry of h ({n})")

    @classmethod
    def paper(cls, d: int = 10_000, bins: Optional[int] = 200) -> "NQM":
        r"""The paper's setting: :math:`h_i = 1/i`, :math:`C = H`, :math:`\theta(0) \sim N(0, I)`.

        ``bins`` groups the ``d`` eigenvalues into that many log-spaced bins, each represented
        by its dimensions' mean :math:`h` and weighted by their count (``None``: every dimension).
        """
        d = check_int("d", d, low=1)
        if bins is not None:
            bins = check_int("bins", bins, low=1)
        h = 1.0 / torch.arange(1, d + 1, dtype=_F64)
        if bins is None or bins >= d:
            return cls(h=h, c=h.clone())
        edges = torch.unique(torch.logspace(0, math.log10(d + 1), bins + 1, dtype=_F64).floor().long())
        edges[0], edges[-1] = 1, d + 1
        hs, ws = [], []
        for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist()):
            if hi > lo:
                hs.append(float(h[lo - 1 : hi - 1].mean()))
                ws.append(hi - lo)
        h_b = _t(hs)
        return cls(h=h_b, c=h_b.clone(), weight=_t(ws))

    @property
    def d(self) -> float:
        return float(self.weight.sum())

    # -- risk -----------------------------------------------------------------------------------
    def risk(self, lr, batch, steps, momentum: float = 0.0, precond: float = 0.0, ema: float = 0.0) -> Tensor:
        r"""Expected risk :math:`\sum_i \tfrac12 h_i\,\mathbb{E}[\theta_i(t)^2]` after ``steps``.

        ``lr``, ``batch`` and ``steps`` broadcast; the result has their broadcast shape and is
        ``inf`` where the iteration diverges. ``momentum`` is heavy-ball :math:`\beta`,
        ``precond`` the power :math:`p` of :math:`P = H^p`, ``ema`` the iterate averaging
        :math:`\gamma` (risk of the averaged iterate); momentum and EMA are not combined.
        """
        t = checked_tensor("steps", steps, low=0, finite=False)
        if bool(torch.isnan(t).any()):
            fail("steps", steps, "numbers >= 0 (inf: the steady state)")
        lr = checked_tensor("lr", lr, low=0, low_open=True)
        batch = checked_tensor("batch", batch, low=0, low_open=True)
        lr, batch, steps = torch.broadcast_tensors(lr, batch, t)
        return self.trajectory(lr, batch, momentum, precond, ema)(steps)

    def trajectory(self, lr, batch, momentum: float = 0.0, precond: float = 0.0, ema: float = 0.0):
        """``steps -> risk`` for fixed ``(lr, batch)``, with all step-independent work done once."""
        momentum = check_number("momentum", momentum, low=0, high=1, high_open=True)
        ema = check_number("ema", ema, low=0, high=1, high_open=True)
        if momentum and ema:
            raise ValueError(f"momentum={momentum!r}, ema={ema!r}: together they are not modelled; set one of them to 0")
        precond = check_number("precond", precond, low=0, high=1)
        lr = checked_tensor("lr", lr, low=0, low_open=True)[..., None]
        batch = checked_tensor("batch", batch, low=0, low_open=True)[..., None]
        step = lr * self.h ** (1.0 - precond)  # alpha h^(1-p)
        noise = lr**2 * self.c * self.h ** (-2.0 * precond) / batch  # variance of alpha P^-1 eps
        m0, scale = self.theta0_var, 0.5 * self.h * self.weight
        if momentum == 0.0 and ema == 0.0:
            q = (1.0 - step) ** 2
            stable = (q < 1.0).all(-1)
            m_inf = noise / torch.where(q < 1.0, 1.0 - q, torch.ones_like(q))

            def sgd(steps: Tensor) -> Tensor:
                t = _t(steps)[..., None]
                total = (scale * (q**t * (m0 - m_inf) + m_inf)).sum(-1)
                return torch.where(stable, total, torch.full_like(total, math.inf))

            return sgd
        limit = 2.0 * (1.0 + momentum) if momentum else 2.0
        ok = (step > 0) & (step < limit)
        step = torch.where(ok, step, torch.full_like(step, 0.5))  # diverging entries end up inf below
        one, zero = torch.ones_like(step), torch.zeros_like(step)
        s0 = (m0 * one, m0 * one, m0 * one)
        if momentum:
            beta = momentum
            system = SecondMoment((1.0 - step + beta, -beta * one, one, zero), (-one, zero), noise, s0)
            # stable iff both roots of x^2 - (1 - a h + beta) x + beta lie inside the unit circle
            stable = ok.all(-1)
            pick = 0
        else:
            g = ema
            system = SecondMoment((1.0 - step, zero, (1.0 - g) * (1.0 - step), g * one), (-one, -(1.0 - g) * one), noise, s0)
            stable = ok.all(-1)
            pick = 2

        def linear(steps: Tensor) -> Tensor:
            t = _t(steps)
            inf = torch.isinf(t)  # steps = inf is the steady state
            m2 = torch.where(inf[..., None], system.s_inf[pick], system.at(torch.where(inf, 0.0, t)[..., None])[pick])
            total = (scale * m2).sum(-1)
            return torch.where(stable, total, torch.full_like(total, math.inf))

        return linear

    # -- steps to a target ----------------------------------------------------------------------
    def steps_to_target(self, lr, batch, target: float = 0.01, max_steps: float = 2.0**40, **optimizer) -> Tensor:
        r"""Fewest steps after which the expected risk is at most ``target`` (``inf`` if never).

        Found by doubling then bisection on integer steps (the risk of these models decreases
        towards its steady state when it starts above it, as from :math:`\theta(0) \sim N(0, I)`)."""
        check_number("target", target, low=0, low_open=True)
        check_number("max_steps", max_steps, low=1)
        lr, batch = torch.broadcast_tensors(checked_tensor("lr", lr, low=0, low_open=True), checked_tensor("batch", batch, low=0, low_open=True))
        risk = self.trajectory(lr, batch, **optimizer)
        powers = 2.0 ** torch.arange(0, int(math.log2(max_steps)) + 1, dtype=_F64)
        grid = powers.view(-1, *([1] * lr.dim())).expand(-1, *lr.shape)
        below = torch.movedim(risk(grid) <= target, 0, -1)  # all doublings in one evaluation
        reachable = below.any(-1)
        first = below.float().argmax(-1)
        hi = powers[first]
        lo = torch.where(first > 0, powers[(first - 1).clamp_min(0)], torch.zeros_like(hi))
        at_start = risk(torch.zeros_like(lr)) <= target
        hi, lo = torch.where(at_start, 0.0, hi), torch.where(at_start, 0.0, lo)
        while True:
            open_ = (hi - lo) > 1
            if not bool(open_.any()):
                break
            mid = torch.floor((lo + hi) / 2)
            ok = risk(mid) <= target
            hi = torch.where(open_ & ok, mid, hi)
            lo = torch.where(open_ & ~ok, mid, lo)
        return torch.where(reachable, hi, torch.full_like(hi, math.inf))

    def max_stable_lr(self, momentum: float = 0.0, precond: float = 0.0, ema: float = 0.0) -> float:
        """The learning rate beyond which the iteration diverges along the stiffest dimension."""
        h_max = float((self.h ** (1.0 - precond)).max())
        return (2.0 * (1.0 + momentum) if momentum else 2.0) / h_max

    def best_lr(self, batch, target: float = 0.01, decades: float = 7.0, iters: int = 26, **optimizer) -> tuple[Tensor, Tensor]:
        r"""For each batch size, the constant learning rate that needs the fewest steps.

        A golden-section search on :math:`\log \alpha` over ``decades`` below the stability
        limit, all batch sizes at once (steps against the learning rate are unimodal: too small
        converges slowly, too large stalls at a steady-state risk above the target). Returns
        ``(steps, lr)``, each of the shape of ``batch``."""
        batch = checked_tensor("batch", batch, low=0, low_open=True).reshape(-1)
        check_number("target", target, low=0, low_open=True)
        check_number("decades", decades, low=0, low_open=True)
        check_int("iters", iters, low=1)
        top = math.log(self.max_stable_lr(**optimizer) * (1 - 1e-9))
        lo = torch.full_like(batch, top - decades * math.log(10.0))
        hi = torch.full_like(batch, top)
        g = (math.sqrt(5.0) - 1.0) / 2.0

        def cost(log_lr: Tensor) -> Tensor:
            return self.steps_to_target(log_lr.exp(), batch, target, **optimizer)

        x1, x2 = hi - g * (hi - lo), lo + g * (hi - lo)
        f1, f2 = cost(x1), cost(x2)
        for _ in range(iters):
            left = f1 <= f2  # the minimum lies in [lo, x2]
            lo, hi = torch.where(left, lo, x1), torch.where(left, x2, hi)
            x1n = torch.where(left, hi - g * (hi - lo), x2)
            x2n = torch.where(left, x1, lo + g * (hi - lo))
            fnew = cost(torch.where(left, x1n, x2n))
            f1, f2 = torch.where(left, fnew, f2), torch.where(left, f1, fnew)
            x1, x2 = x1n, x2n
        take1 = f1 <= f2
        return torch.where(take1, f1, f2), torch.where(take1, x1, x2).exp()

    def lower_bound_steps(self, batch, target: float = 0.01) -> Tensor:
        r"""Information-theoretic bound (Sec. 3.6, for :math:`C = H`): risk :math:`\ge d/(2N)`
        after :math:`N` examples, so at least :math:`d/(2\,\text{target}\,B)` steps."""
        return self.d / (2.0 * target * _t(batch))
