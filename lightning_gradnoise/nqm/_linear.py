"""Exact second moments of a scalar-noise linear recurrence, in closed form, batched.

Each NQM dimension under SGD, heavy-ball momentum or an iterate EMA is a two-state linear system
``x(t+1) = A x(t) + b xi(t)`` with ``E[xi] = 0`` and ``E[xi^2] = v``. Its second-moment matrix
``S(t) = E[x x^T]`` obeys ``S(t+1) = A S A^T + v b b^T``, whose solution is

    S(t) = A^t (S(0) - S_inf) (A^t)^T + S_inf,     S_inf = A S_inf A^T + v b b^T   (Lyapunov)

and ``A^t`` follows from Cayley-Hamilton with the eigenvalues r1, r2 of A:
``A^t = f_t A - r1 r2 f_{t-1} I`` with ``f_t = (r1^t - r2^t)/(r1 - r2)`` for real roots, and
``f_t = rho^(t-1) sin(t phi)/sin(phi)`` for the conjugate pair ``rho e^(+-i phi)`` of an
underdamped momentum dimension.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_gradnoise.stats._redundancy import divided_power_unchecked as divided_power

__all__ = ["SecondMoment"]


def _lyapunov(a11: Tensor, a12: Tensor, a21: Tensor, a22: Tensor, q11: Tensor, q12: Tensor, q22: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Solve S = A S A^T + Q for symmetric 2x2 S (three unknowns), batched."""
    # rows: S11, S12, S22 equations; unknowns (S11, S12, S22)
    m = torch.stack(
        [
            torch.stack([1 - a11 * a11, -2 * a11 * a12, -a12 * a12], -1),
            torch.stack([-a11 * a21, 1 - (a11 * a22 + a12 * a21), -a12 * a22], -1),
            torch.stack([-a21 * a21, -2 * a21 * a22, 1 - a22 * a22], -1),
        ],
        -2,
    )
    rhs = torch.stack([q11, q12, q22], -1).unsqueeze(-1)
    sol = torch.linalg.solve(m, rhs).squeeze(-1)
    return sol[..., 0], sol[..., 1], sol[..., 2]


class SecondMoment:
    """``S(t)`` of one (batched) system: everything that does not depend on ``t`` is computed once.

    Needs a stable system (both eigenvalues of A inside the unit circle) for ``S_inf``; callers
    mask unstable entries.
    """

    def __init__(
        self,
        A: tuple[Tensor, Tensor, Tensor, Tensor],
        b: tuple[Tensor, Tensor],
        noise_var: Tensor,
        s0: tuple[Tensor, Tensor, Tensor],
    ) -> None:
        a11, a12, a21, a22 = A
        b1, b2 = b
        q11, q12, q22 = noise_var * b1 * b1, noise_var * b1 * b2, noise_var * b2 * b2
        shape = torch.broadcast_shapes(*(x.shape for x in (a11, a12, a21, a22, q11, q12, q22, *s0)))
        a11, a12, a21, a22, q11, q12, q22 = (x.expand(shape) for x in (a11, a12, a21, a22, q11, q12, q22))
        self.a = (a11, a12, a21, a22)
        self.s_inf = _lyapunov(a11, a12, a21, a22, q11, q12, q22)
        self.d = tuple(s.expand(shape) - si for s, si in zip(s0, self.s_inf))
        tr, det = a11 + a22, a11 * a22 - a12 * a21
        disc = tr * tr - 4 * det
        # real roots (overdamped) or a conjugate pair rho e^(+-i phi) (underdamped), in real arithmetic
        self.oscillating = disc < 0
        root = disc.abs().sqrt()
        self.r1, self.r2 = (tr + root) / 2, (tr - root) / 2
        self.rho = det.clamp_min(0).sqrt()
        cos_phi = (tr / (2 * self.rho.clamp_min(1e-300))).clamp(-1.0, 1.0)
        self.phi = torch.acos(cos_phi)
        self.det = det
        self.shape = shape

    def _f_osc(self, t: Tensor) -> Tensor:
        """f_t = rho^(t-1) sin(t phi)/sin(phi), continued by t rho^(t-1) as phi -> 0.

        Where rho^(t-1) has decayed below 1e-300 (the search over steps reaches t = 2^40) the
        product is 0 whatever the sine: the sine is then not taken of t phi, whose argument
        reduction for huge t cost more than all the rest of a sweep."""
        sin_phi = torch.sin(self.phi)
        small = sin_phi.abs() < 1e-9
        decay = self.rho ** (t - 1)
        angle = torch.where(decay > 1e-300, t * self.phi, torch.zeros_like(decay))
        ratio = torch.where(small, t, torch.sin(angle) / torch.where(small, torch.ones_like(sin_phi), sin_phi))
        return decay * ratio

    def at(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(S11, S12, S22)`` after ``t`` steps (``t`` broadcasts against the batch shape)."""
        a11, a12, a21, a22 = self.a
        t = torch.as_tensor(t, dtype=self.det.dtype)
        ft = torch.where(self.oscillating, self._f_osc(t), divided_power(self.r1, self.r2, t))
        ft1 = torch.where(self.oscillating, self._f_osc(t - 1), divided_power(self.r1, self.r2, t - 1))
        gt = -self.det * ft1  # A^t = f_t A - det(A) f_(t-1) I (Cayley-Hamilton)
        p11, p12, p21, p22 = ft * a11 + gt, ft * a12, ft * a21, ft * a22 + gt
        d11, d12, d22 = self.d
        s11, s12, s22 = self.s_inf
        e11 = p11 * (p11 * d11 + p12 * d12) + p12 * (p11 * d12 + p12 * d22)
        e12 = p11 * (p21 * d11 + p22 * d12) + p12 * (p21 * d12 + p22 * d22)
        e22 = p21 * (p21 * d11 + p22 * d12) + p22 * (p21 * d12 + p22 * d22)
        return e11 + s11, e12 + s12, e22 + s22
