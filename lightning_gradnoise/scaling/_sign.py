r"""The sign-of-gradient (Adam-style) quadratic model of the surge paper (Theorems 2-3, Eq. 8-15).

Each sample's gradient of parameter :math:`i` is Gaussian with mean :math:`\mu_i` and standard
deviation :math:`\sigma_i`; the update is :math:`-\epsilon\,\mathrm{sign}(G_\text{est})` on a
quadratic with Hessian :math:`H`. With
:math:`\mathcal{E}_i(B) = \mathrm{erf}\big(\sqrt{B/2}\,\mu_i/\sigma_i\big)` (Eq. 10, exact):

.. math::
    \epsilon_\text{opt}(B) = \frac{\sum_i \mathcal{E}_i \mu_i}{\sum_i (1 - \mathcal{E}_i^2) H_{ii} + \mathcal{E}^T H \mathcal{E}}
    \quad (9), \qquad
    \Delta L_\text{opt} = \tfrac12 \epsilon_\text{opt} \sum_i \mathcal{E}_i \mu_i \quad (8)

    \mathcal{B}_\text{noise} = \frac{\pi \sum_i H_{ii}}{2 \sum_{i \ne j} \frac{\mu_i \mu_j}{\sigma_i \sigma_j} H_{ij}} \quad (14)

The optimal learning rate rises, peaks near :math:`\mathcal{B}_\text{noise}` (Eq. 15) and falls
while :math:`B \ll \pi\sigma_i^2/(2\mu_i^2)` (Theorem 3); with a diagonal :math:`H` there is no
surge (the off-diagonal terms are what bend it down).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_gradnoise._validate import fail
from lightning_gradnoise.stats._checks import checked_tensor

__all__ = ["sign_expectation", "sign_optimal_lr", "sign_loss_improvement", "sign_b_noise"]


def _t(x) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def _gradient_stats(mu, sigma, hessian=None) -> tuple[Tensor, Tensor, Tensor | None]:
    """``mu``, ``sigma`` as ``[d]`` tensors (``sigma > 0``) and ``hessian`` as ``[d, d]``."""
    m = checked_tensor("mu", mu)
    if m.dim() != 1 or m.numel() == 0:
        fail("mu", mu, "a 1-d tensor of the gradient's mean per coordinate, [d]")
    s = checked_tensor("sigma", sigma, low=0, low_open=True)
    if s.shape != m.shape:
        fail("sigma", sigma, f"a tensor of the shape of mu, {tuple(m.shape)}, each > 0")
    h = None
    if hessian is not None:
        h = checked_tensor("hessian", hessian)
        if h.shape != (m.numel(), m.numel()):
            fail("hessian", hessian, f"a [d, d] tensor with d = {m.numel()}, the length of mu")
    return m, s, h


def sign_expectation(batch, mu, sigma) -> Tensor:
    r""":math:`\mathcal{E}_i(B) = \mathbb{E}[\mathrm{sign}(G_{\text{est},i})] = \mathrm{erf}(\sqrt{B/2}\,\mu_i/\sigma_i)`
    (Eq. 10); ``[..., d]`` for batch shape ``[...]``."""
    b = checked_tensor("batch", batch, low=0, low_open=True)[..., None]
    m, s, _ = _gradient_stats(mu, sigma)
    return torch.erf((b / 2).sqrt() * m / s)


def sign_optimal_lr(batch, mu, sigma, hessian) -> Tensor:
    """Eq. 9 (Lemma 1 with :math:`V = \\mathrm{sign}(G_\\text{est})`), for each batch size."""
    _, _, h = _gradient_stats(mu, sigma, hessian)
    e = sign_expectation(batch, mu, sigma)
    diag = torch.diagonal(h)
    num = (e * _t(mu)).sum(-1)
    den = ((1 - e**2) * diag).sum(-1) + torch.einsum("...i,ij,...j->...", e, h, e)
    return num / den


def sign_loss_improvement(batch, mu, sigma, hessian) -> Tensor:
    """Eq. 8: the expected loss decrease of one step at the optimal learning rate."""
    _gradient_stats(mu, sigma, hessian)
    e = sign_expectation(batch, mu, sigma)
    return 0.5 * sign_optimal_lr(batch, mu, sigma, hessian) * (e * _t(mu)).sum(-1)


def sign_b_noise(mu, sigma, hessian) -> float:
    """Eq. 14: the batch size at which the optimal learning rate peaks (Eq. 15)."""
    m, s, h = _gradient_stats(mu, sigma, hessian)
    r = m / s
    off = torch.outer(r, r) * h
    off = off - torch.diag(torch.diagonal(off))
    den = float(off.sum())
    if not den > 0:
        return math.inf
    return math.pi * float(torch.diagonal(h).sum()) / (2.0 * den)
