r"""Per-element gradient signal-to-noise ratio (GSNR) from group gradients.

VRGD (``papers/vrgd-gsnr-large-batch.md``), Eq. 2 and Eq. 7-10. With :math:`k` groups of mean
gradients :math:`g_j` and :math:`g = \frac1k\sum_j g_j`, elementwise:

.. math::
    \sigma^2 = \frac1k\sum_j g_j^2 - g^2, \qquad r = \frac{g^2}{\sigma^2}

:math:`\sigma^2` is the (biased, divide-by-:math:`k`) spread of the group gradients, as in the
paper. Elements with :math:`\sigma^2 = 0` carry no measurable noise: their GSNR is undefined
(NaN), they are left out of means, and the VR scaling leaves them at factor 1.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from lightning_gradnoise._validate import check_choice, check_number, fail

__all__ = ["gsnr_variance", "gsnr", "gsnr_layer_stats", "gsnr_scale", "gsnr_scale_many", "SMALL_K"]

_K_TEXT = "a whole number >= 2: GSNR needs at least 2 gradient groups (devices x accumulation micro-batches)"


def _tensor(name: str, x: Any, like: Tensor | None = None, like_name: str = "") -> Tensor:
    # type and shape only: these run on parameter-sized tensors every step, where a check of the
    # values would cost a pass over them and a device sync
    if not isinstance(x, Tensor):
        fail(name, x, "a tensor", TypeError)
    if like is not None and x.shape != like.shape:
        fail(name, f"<tensor of shape {tuple(x.shape)}>", f"the shape of {like_name}, {tuple(like.shape)}")
    return x


def _groups(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        fail("k", k, _K_TEXT, TypeError if not isinstance(k, int) or isinstance(k, bool) else ValueError)
    return k


def _gamma(gamma: Any) -> float:
    return check_number("gamma", gamma, low=0, low_open=True, high=1)


def _tensor_list(name: str, xs: Any) -> list[Tensor]:
    if isinstance(xs, (Tensor, str, bytes)) or not isinstance(xs, Sequence):
        fail(name, xs, "a list of tensors", TypeError)
    return [_tensor(f"{name}[{i}]", x) for i, x in enumerate(xs)]


def gsnr_variance(sq_sum: Tensor, mean_grad: Tensor, k: int) -> Tensor:
    r""":math:`\sigma^2 = \frac1k \sum_j g_j^2 - g^2`, clamped at 0 against rounding.

    Args:
        sq_sum: :math:`\sum_j g_j^2`, elementwise over the ``k`` groups.
        mean_grad: :math:`g`, the mean of the group gradients.
        k: number of groups, at least 2.
    """
    _groups(k)
    _tensor("mean_grad", mean_grad)
    _tensor("sq_sum", sq_sum, mean_grad, "mean_grad")
    return (sq_sum / k - mean_grad.square()).clamp_min_(0.0)


def gsnr(mean_grad: Tensor, variance: Tensor) -> Tensor:
    r"""Elementwise :math:`r = g^2/\sigma^2`; NaN where :math:`\sigma^2 = 0`."""
    _tensor("mean_grad", mean_grad)
    _tensor("variance", variance, mean_grad, "mean_grad")
    valid = variance > 0
    safe = torch.where(valid, variance, torch.ones_like(variance))
    return torch.where(valid, mean_grad.square() / safe, torch.full_like(variance, float("nan")))


def gsnr_layer_stats(ratios: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Per tensor, the sum of the defined GSNR values and how many there are (float64).

    The layer mean is ``sum / count``; the whole-model mean is ``sum.sum() / count.sum()``.
    """
    if not _tensor_list("ratios", ratios):
        fail("ratios", ratios, "at least one tensor")
    sums = torch.stack([torch.nansum(r, dtype=torch.float64) for r in ratios])
    counts = torch.stack([(~torch.isnan(r)).sum().to(torch.float64) for r in ratios])
    return sums, counts


def gsnr_scale(ratio: Tensor, gamma: float = 0.1) -> Tensor:
    r"""The VR gradient factor of one layer (VRGD Eq. 9-10).

    .. math:: \tilde r = \mathrm{clamp}\!\left(\frac{r}{\mathrm{mean}_\text{layer}(r)}, \gamma, 1\right)

    Undefined ratios (no noise) get factor 1; a layer with no defined ratio gets all ones.

    Examples:
        >>> gsnr_scale(torch.tensor([1.0, 3.0]), gamma=0.1)   # mean 2: [0.5, 1.5] -> clamp
        tensor([0.5000, 1.0000])
    """
    _gamma(gamma)
    _tensor("ratio", ratio)
    defined = ~torch.isnan(ratio)
    count = defined.sum()
    mean = torch.where(defined, ratio, torch.zeros_like(ratio)).sum() / count.clamp_min(1)
    normalized = torch.where(defined & (mean > 0), ratio / torch.where(mean > 0, mean, torch.ones_like(mean)), torch.ones_like(ratio))
    return normalized.clamp_(gamma, 1.0)


SMALL_K = 8
"""Below this many groups :func:`gsnr_scale_many` normalizes by the layer median (VRGD uses k >= 8)."""


def gsnr_scale_many(grads: Sequence[Tensor], sq_sums: Sequence[Tensor], k: int, gamma: float = 0.1,
                    normalizer: str = "auto") -> list[Tensor]:
    r""":func:`gsnr_scale` of :func:`gsnr` of :func:`gsnr_variance` for several tensors (layers)
    at once: one flat pass with a segment mean per tensor, instead of a dozen small operations per
    tensor. Same definition: elements without noise get factor 1, a layer's mean is over its
    defined ratios.

    ``normalizer`` chooses what each layer's ratios are divided by before the clamp: ``"mean"``
    (VRGD Eq. 9, Algorithm 1/3), ``"median"``, or ``"auto"`` (default): the mean from
    :data:`SMALL_K` = 8 groups, the median below. With few groups :math:`\sigma^2` has
    :math:`k - 1` degrees of freedom and :math:`g^2/\sigma^2` a heavy right tail (its mean is
    infinite at k = 2 and 3): the layer mean is then set by a few elements, and dividing by it
    pushes most factors down to :math:`\gamma`, a learning rate cut by up to :math:`1/\gamma`. The
    median is finite at any k and keeps about half the factors at 1.

    Examples:
        >>> grads, sq_sums = [torch.tensor([1.0, 0.1, 0.5])], [torch.tensor([2.5, 0.5, 0.5])]   # k = 2
        >>> gsnr_scale_many(grads, sq_sums, k=2, normalizer="mean")[0]   # GSNR 4, 0.04, none: mean 2.02
        tensor([1.0000, 0.1000, 1.0000])
        >>> gsnr_scale_many(grads, sq_sums, k=2)[0]                      # k < 8: the median, 0.04
        tensor([1., 1., 1.])
    """
    _groups(k)
    _gamma(gamma)
    check_choice("normalizer", normalizer, ("auto", "mean", "median"))
    grads, sq_sums = _tensor_list("grads", grads), _tensor_list("sq_sums", sq_sums)
    if len(sq_sums) != len(grads) or not grads:
        fail("sq_sums", f"<{len(sq_sums)} tensors>", f"one tensor per gradient ({len(grads)}), at least one")
    for i, (g, s2) in enumerate(zip(grads, sq_sums)):
        _tensor(f"sq_sums[{i}]", s2, g, f"grads[{i}]")
    sizes = [g.numel() for g in grads]
    dtype = sq_sums[0].dtype
    g = torch.cat([x.reshape(-1) for x in grads]).to(dtype)
    s = torch.cat([x.reshape(-1) for x in sq_sums])
    g2 = g * g
    var = (s / k - g2).clamp_min_(0.0)
    valid = var > 0
    r = torch.where(valid, g2 / torch.where(valid, var, torch.ones_like(var)), torch.zeros_like(var))
    seg = torch.repeat_interleave(torch.arange(len(sizes), device=g.device), torch.tensor(sizes, device=g.device))
    if normalizer == "median" or (normalizer == "auto" and k < SMALL_K):
        masked = torch.where(valid, r, torch.full_like(r, float("nan")))
        centre = torch.stack([part.nanmedian() for part in masked.split(sizes)]).nan_to_num_(0.0)
    else:
        sums = torch.zeros(len(sizes), dtype=dtype, device=g.device).index_add_(0, seg, r)
        counts = torch.zeros(len(sizes), dtype=dtype, device=g.device).index_add_(0, seg, valid.to(dtype))
        centre = sums / counts.clamp_min(1.0)
    mean = centre[seg]
    out = torch.where(valid & (mean > 0), r / torch.where(mean > 0, mean, torch.ones_like(mean)), torch.ones_like(r))
    return [t.view_as(x) for t, x in zip(out.clamp_(gamma, 1.0).split(sizes), grads)]
