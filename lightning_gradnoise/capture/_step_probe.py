r"""The dot products of a step with the gradients around it (plain PyTorch).

:class:`StepProbe` keeps one parameter-sized buffer: the parameters before a step, then the step
:math:`\Delta_t = \theta_t - \theta_{t+1}` itself. From it, per optimizer step,
:math:`\Delta_t\cdot\hat g_t`, :math:`\sum_i J_i\hat g_{t,i}^2`, :math:`|\hat g_t|^2` and, at the next step,
:math:`\Delta_t\cdot\hat g_{t+1}`: what :class:`~lightning_gradnoise.stats.StepSizeRatio` needs.
The gradients are read where the optimizer reads them, so under DDP they are the all-reduced ones
and every rank computes the same numbers.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lightning_gradnoise._validate import fail

__all__ = ["StepProbe"]

Coupling = Union[float, Sequence[Union[float, Tensor]]]


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return torch.dot(a.reshape(-1), b.reshape(-1)).to(torch.float64)


class StepProbe:
    r"""Measures one step against the gradient that made it and the gradient after it.

    Call :meth:`before_step` where the optimizer is about to step (gradients final), and
    :meth:`after_step` right after it. Parameters without a gradient are left out.

    Args:
        params: the parameters (a module or an iterable of tensors).

    Examples:
        >>> lin = nn.Linear(3, 1)
        >>> opt = torch.optim.SGD(lin.parameters(), lr=0.1)
        >>> probe = StepProbe(lin)
        >>> lin(torch.ones(2, 3)).sum().backward()
        >>> probe.before_step() is None   # no earlier step to compare with
        True
        >>> opt.step()
        >>> own, jg2, g2 = probe.after_step(coupling=0.1)
        >>> round(own, 6) == round(jg2, 6)   # SGD: the step is 0.1 g, so both are 0.1 |g|^2
        True
    """

    def __init__(self, params: Union[nn.Module, Iterable[Tensor]]) -> None:
        if isinstance(params, nn.Module):
            params = params.parameters()
        try:
            self.params = [p for p in params if isinstance(p, Tensor) and p.requires_grad]
        except TypeError:
            fail("params", params, "a module or an iterable of tensors", TypeError)
        if not self.params:
            fail("params", params, "at least one tensor that requires a gradient")
        for p in self.params:
            if type(p.data).__name__ == "DTensor":
                raise ValueError("params: sharded (DTensor) parameters are not supported by StepProbe")
        self._buffer: Optional[list[Optional[Tensor]]] = None
        self._holds_step = False

    def _with_grads(self) -> list[tuple[int, Tensor, Tensor]]:
        return [(i, p, p.grad) for i, p in enumerate(self.params) if p.grad is not None]

    @torch.no_grad()
    def before_step(self) -> Optional[float]:
        r""":math:`\Delta_{t-1}\cdot\hat g_t` (``None`` without an earlier step), then keeps
        :math:`\theta_t`."""
        out = None
        if self._holds_step and self._buffer is not None:
            terms = [_dot(self._buffer[i], g) for i, _, g in self._with_grads() if self._buffer[i] is not None]
            out = float(torch.stack(terms).sum()) if terms else None
        if self._buffer is None:
            self._buffer = [None] * len(self.params)
        kept, now = [], []
        for i, p, _ in self._with_grads():
            if self._buffer[i] is None:
                self._buffer[i] = p.detach().clone()
            else:
                kept.append(self._buffer[i])
                now.append(p.detach())
        if kept:
            torch._foreach_copy_(kept, now)  # one call, not one per tensor
        for i, p in enumerate(self.params):
            if p.grad is None:
                self._buffer[i] = None
        self._holds_step = False
        return out

    @torch.no_grad()
    def after_step(self, coupling: Coupling) -> Optional[tuple[float, float, float]]:
        r"""Turns the kept :math:`\theta_t` into :math:`\Delta_t` and returns
        :math:`(\Delta_t\cdot\hat g_t,\ \sum_i J_i\hat g_{t,i}^2,\ |\hat g_t|^2)`; ``coupling`` is :math:`J`: one
        number for every element, or one number or tensor per parameter. ``None`` when the
        step did not move the parameters (a skipped step)."""
        if self._buffer is None:
            return None
        per_param = coupling if isinstance(coupling, (list, tuple)) else [coupling] * len(self.params)
        if len(per_param) != len(self.params):
            fail("coupling", f"<{len(per_param)} entries>", f"one number, or one entry per parameter ({len(self.params)})")
        own, jg2, g2, moved = [], [], [], []
        for i, p, g in self._with_grads():
            buf = self._buffer[i]
            if buf is None:
                continue
            buf.sub_(p)
            own.append(_dot(buf, g))
            j = per_param[i]
            sq = _dot(g, g)
            g2.append(sq)
            jg2.append((g.to(j.dtype).square() * j).sum(dtype=torch.float64) if isinstance(j, Tensor) else float(j) * sq)
            moved.append(buf)
        # did the step move anything (a skipped step moves nothing; a NaN step counts as none):
        # max |step| from each tensor's min and max, without allocating |step|
        if moved:
            ends = torch.stack([torch.stack(torch.aminmax(b)) for b in moved])
            self._holds_step = bool(torch.maximum(-ends[:, 0], ends[:, 1]).max() > 0)
        else:
            self._holds_step = False
        if not self._holds_step:
            return None
        return float(torch.stack(own).sum()), float(torch.stack(jg2).sum()), float(torch.stack(g2).sum())

    def state_dict(self) -> dict[str, Any]:
        buf = None if self._buffer is None else [None if b is None else b.detach().cpu().clone() for b in self._buffer]
        return {"buffer": buf, "holds_step": self._holds_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        buf = state["buffer"]
        if buf is not None and len(buf) != len(self.params):
            raise ValueError(f"state: {len(buf)} buffers for {len(self.params)} parameters")
        self._buffer = None if buf is None else [None if b is None else b.to(p.device, p.dtype) for b, p in zip(buf, self.params)]
        self._holds_step = bool(state["holds_step"])
