"""Per-group gradient moments captured from autograd hooks, without copying gradients."""

from __future__ import annotations

from functools import partial
from typing import Iterable, Union

import torch
from torch import Tensor, nn

__all__ = ["GradientMomentCollector"]

NamedParams = Union[nn.Module, Iterable[tuple[str, nn.Parameter]]]


class GradientMomentCollector:
    r"""Collects each group's squared gradient norm per parameter tensor during backward.

    A *group* is one backward pass over part of the step's batch (an accumulation micro-batch).
    A hook on each parameter sees that backward's gradient before autograd adds it into
    ``.grad``; the collector takes :math:`|s\,\nabla|^2` from it and, only if ``elementwise``,
    adds :math:`(s\,\nabla)^2` into one parameter-sized buffer (the sum over groups of
    :math:`g_j^2` that GSNR needs). No copy of a gradient is kept. ``s`` is the factor given to
    :meth:`begin_group` that turns the raw gradient into the group's *mean* gradient: it undoes
    the division of the loss by the number of accumulation steps, an AMP loss scale, or a
    sum-reduced loss.

    Plain PyTorch; usable without Lightning.

    Args:
        params: a module (its parameters that require grad) or ``(name, parameter)`` pairs.
        elementwise: also keep the elementwise sum of squared group gradients.

    Example:
        >>> model = nn.Linear(3, 1)
        >>> collector = GradientMomentCollector(model).attach()
        >>> for xb in torch.randn(4, 8, 3).unbind(0):          # 4 micro-batches of 8
        ...     collector.begin_group(scale=4.0, size=8)       # the loss below is divided by 4
        ...     (model(xb).pow(2).mean() / 4).backward()
        ...     collector.end_group()
        >>> collector.group_sq_norms().shape                   # [groups, parameter tensors]
        torch.Size([4, 2])
        >>> collector.detach()
    """

    def __init__(self, params: NamedParams, elementwise: bool = False) -> None:
        named = params.named_parameters() if isinstance(params, nn.Module) else params
        self.names: list[str] = []
        self.params: list[nn.Parameter] = []
        for name, p in named:
            if p.requires_grad:
                self.names.append(name)
                self.params.append(p)
        if not self.params:
            raise ValueError("params has no parameter that requires grad")
        self.elementwise = bool(elementwise)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._scale: float | None = None
        self._current: list[Tensor | None] = [None] * len(self.params)
        self._group_sq: list[Tensor] = []
        self._group_sizes: list[int | None] = []
        self._sq_sum: list[Tensor | None] = [None] * len(self.params)
        self._device = self.params[0].device
        self._zero = torch.zeros((), device=self._device)

    # -- life cycle ---------------------------------------------------------------------------
    def attach(self) -> "GradientMomentCollector":
        """Register the hooks (idempotent). Returns ``self``."""
        if not self._handles:
            self._handles = [p.register_hook(partial(self._on_grad, i)) for i, p in enumerate(self.params)]
        return self

    def detach(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "GradientMomentCollector":
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def set_elementwise(self, enabled: bool) -> None:
        """Start or stop keeping elementwise moments (takes effect from the next group)."""
        self.elementwise = bool(enabled)
        if not enabled:
            self._sq_sum = [None] * len(self.params)

    # -- groups -------------------------------------------------------------------------------
    def begin_group(self, scale: float = 1.0, size: int | None = None) -> None:
        """Start recording one group (one backward). ``scale`` maps raw gradients to the group's
        mean gradient; ``size`` is the group's number of samples."""
        if self._scale is not None:
            raise RuntimeError("begin_group() called twice without end_group()")
        self._scale = float(scale)
        self._group_sizes.append(size)

    def end_group(self) -> None:
        """Close the group: its per-tensor squared norms become one row of :meth:`group_sq_norms`.

        A tensor that got no gradient in the group (unused) counts as zero."""
        if self._scale is None:
            raise RuntimeError("end_group() called without begin_group()")
        zero = self._zero
        row = torch.stack([zero if t is None else t for t in self._current])
        self._group_sq.append(row.square_().mul_(self._scale * self._scale))
        self._current = [None] * len(self.params)
        self._scale = None

    def cancel_group(self) -> None:
        """Drop an open group (e.g. a backward that was skipped)."""
        if self._scale is not None:
            self._group_sizes.pop()
            self._current = [None] * len(self.params)
            self._scale = None

    def reset(self) -> None:
        """Forget all groups of the step (elementwise buffers are zeroed in place, not freed)."""
        self._group_sq = []
        self._group_sizes = []
        self._current = [None] * len(self.params)
        self._scale = None
        for buf in self._sq_sum:
            if buf is not None:
                buf.zero_()

    def _on_grad(self, index: int, grad: Tensor) -> None:
        # The hot path: one kernel per parameter and backward (the scale is applied per group).
        if self._scale is None:
            return
        norm = torch.linalg.vector_norm(grad)
        prev = self._current[index]
        if prev is None:
            self._current[index] = norm
        else:  # rare: a second backward inside one group
            self._current[index] = torch.sqrt(prev.square() + norm.square())
        if self.elementwise:
            buf = self._sq_sum[index]
            if buf is None:
                dtype = torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else grad.dtype
                buf = self._sq_sum[index] = torch.zeros_like(grad, dtype=dtype)
            buf.addcmul_(grad, grad, value=self._scale * self._scale)

    # -- results ------------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        return len(self._group_sq)

    @property
    def group_sizes(self) -> list[int | None]:
        return list(self._group_sizes[: self.num_groups])

    def group_sq_norms(self) -> Tensor:
        """``[groups, tensors]`` squared norms of each group's mean gradient, in float64."""
        if not self._group_sq:
            return torch.zeros(0, len(self.params), dtype=torch.float64, device=self._device)
        return torch.stack(self._group_sq).to(torch.float64)

    def elementwise_sq_sum(self) -> list[Tensor]:
        r""":math:`\sum_j g_j^2` per parameter tensor (zeros for a tensor that got no gradient)."""
        if not self.elementwise:
            raise RuntimeError("elementwise moments were not requested: construct with elementwise=True")
        return [torch.zeros_like(p) if b is None else b for p, b in zip(self.params, self._sq_sum)]
