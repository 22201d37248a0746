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

__all__ = ["sign_expectation", "sign_optimal_lr", "sign_loss_improvement", "sign_b_noise"]


def _t(x) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def sign_expectation(batch, mu, sigma) -> Tensor:
    r""":math:`\mathcal{E}_i(B) = \mathbb{E}[\mathrm{sign}(G_{\text{est},i})] = \mathrm{erf}(\sqrt{B/2}\,\mu_i/\sigma_i)`
    (Eq. 10); ``[..., d]`` for batch shape ``[...]``."""
    b = _t(batch)[..., None]
    return torch.erf((b / 2).sqrt() * _t(mu) / _t(sigma))


def sign_optimal_lr(batch, mu, sigma, hessian) -> Tensor:
    """Eq. 9 (Lemma 1 with :math:`V = \\mathrm{sign}(G_\\text{est})`), for each batch size."""
    e = sign_expectation(batch, mu, sigma)
    h = _t(hessian)
    diag = torch.diagonal(h)
    num = (e * _t(mu)).sum(-1)
    den = ((1 - e**2) * diag).sum(-1) + torch.einsum("...i,ij,...j->...", e, h, e)
    return num / den


def sign_loss_improvement(batch, mu, sigma, hessian) -> Tensor:
    """Eq. 8: the expected loss decrease of one step at the optimal learning rate."""
    e = sign_expectation(batch, mu, sigma)
    return 0.5 * sign_optimal_lr(batch, mu, sigma, hessian) * (e * _t(mu)).sum(-1)


def sign_b_noise(mu, sigma, hessian) -> float:
    """Eq. 14: the batch size at which the optimal learning rate peaks (Eq. 15)."""
    r = _t(mu) / _t(sigma)
    h = _t(hessian)
    off = torch.outer(r, r) * h
    off = off - torch.diag(torch.diagonal(off))
    den = float(off.sum())
    if not den > 0:
        return math.inf
    return math.pi * float(torch.diagonal(h).sum()) / (2.0 * den)
