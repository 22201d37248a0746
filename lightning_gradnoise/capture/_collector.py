"""Per-group gradient moments captured from autograd hooks, without copying gradients."""

from __future__ import annotations

import weakref
from functools import partial
from typing import Any, Iterable, Union

import torch
from torch import Tensor, nn

from lightning_gradnoise._validate import check_bool, check_choice, check_int, check_number, fail

__all__ = ["GradientMomentCollector", "SharedCapture", "named_parameters", "size_sums"]

MODES = ("hooks", "swap", "final", "external")
_SWAPPING: dict[int, "weakref.ref[GradientMomentCollector]"] = {}
"""The attached swap-mode collector of each model (keyed by its first parameter): one at most."""
NamedParams = Union[nn.Module, Iterable[tuple[str, nn.Parameter]]]


def named_parameters(params: Any) -> list[tuple[str, Tensor]]:
    """``params`` (a module, or ``(name, parameter)`` pairs) as a list of pairs, checked."""
    if isinstance(params, nn.Module):
        return list(params.named_parameters())
    expected = "a module or (name, parameter) pairs, e.g. model.named_parameters()"
    if params is None or isinstance(params, (Tensor, str, bytes)) or not isinstance(params, Iterable):
        fail("params", params, expected, TypeError)
    pairs = list(params)
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str) and isinstance(pair[1], Tensor)):
            fail("params", pairs if len(pairs) < 4 else f"[..., {pair!r}, ...]", expected, TypeError)
    return pairs


def size_sums(sizes: list[int | None]) -> tuple[float, float]:
    """:math:`\\sum_j 1/b_j` and :math:`\\sum_j b_j` of group sizes (NaN if one is unknown)."""
    if not sizes or not all(sizes):
        return float("nan"), float("nan")
    return sum(1.0 / b for b in sizes), float(sum(sizes))


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

    Two ways to see a group's gradient, with the same results:

    - ``mode="hooks"``: a hook per parameter tensor reads the gradient as autograd produces it.
      Works everywhere, under DDP too (the hook sees the local gradient before DDP reduces it).
    - ``mode="swap"``: :meth:`begin_group` sets each ``.grad`` aside so that backward writes the
      group's gradient alone, and :meth:`end_group` takes all norms in one multi-tensor kernel
      and adds the set-aside gradient back in place, the very addition autograd would have done
      (bit-identical ``.grad``, no extra memory). No per-tensor Python call: several times cheaper
      for small models. Not for DDP, whose reducer owns ``.grad`` during backward.
    - ``mode="final"``: :meth:`begin_group` is given the group's loss; a hook on it queues one
      callback on the autograd engine that reads every ``.grad`` in one multi-tensor kernel
      when backward has finished, before any callback queued later. Under DDP (without
      ``gradient_as_bucket_view``) that is before the reducer writes the averaged gradient
      back: ``.grad`` is still this process's own, so DDP needs no communication hook and no
      per-tensor Python hook runs. Each group must start from zeroed gradients (one backward
      per optimizer step, no accumulation); a second backward through the group's loss is
      refused while elementwise moments are kept.
    - ``mode="external"``: nothing is hooked; whoever sees the group's gradient calls
      :meth:`record` (the DDP communication hook does, from each bucket, when each process's
      group is its whole local batch, i.e. without gradient accumulation).

    Plain PyTorch; usable without Lightning.

    Args:
        params: a module (its parameters that require grad) or ``(name, parameter)`` pairs.
        elementwise: also keep the elementwise sum of squared group gradients.
        mode: ``"hooks"``, ``"swap"`` or ``"external"``.

    Examples:
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

    def __init__(self, params: NamedParams, elementwise: bool = False, mode: str = "hooks") -> None:
        self.mode = self._requested = check_choice("mode", mode, MODES)
        self.names: list[str] = []
        self.params: list[nn.Parameter] = []
        for name, p in named_parameters(params):
            if p.requires_grad:
                self.names.append(name)
                self.params.append(p)
        if not self.params:
            raise ValueError("params has no parameter that requires grad: is every parameter frozen? "
                             "Unfreeze at least one, or measure a module that trains")
        self.elementwise = check_bool("elementwise", elementwise)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._scale: float | None = None
        self._current: list[Tensor | None] = [None] * len(self.params)
        # closed groups: their raw norms, flat (groups x tensors), and their scales; squared and
        # scaled in one vectorized pass when read, not per group
        self._norms: list[Tensor] = []
        self._scales: list[float] = []
        self._group_sizes: list[int | None] = []
        # elementwise moments, Welford's way: each tensor's running mean of the group gradients
        # and centred sum of squares (no float32 cancellation, unlike a sum of squares)
        self._m2: list[Tensor | None] = [None] * len(self.params)
        self._mean: list[Tensor | None] = [None] * len(self.params)
        self._elem_seen: set[int] = set()
        self._device = self.params[0].device
        self._zero = torch.zeros((), device=self._device)
        self._all = list(range(len(self.params)))
        self._read_in_group = False
        self._attached = False
        self._stale = False
        self._saved: list[Tensor | None] | None = None
        self.followers = 0
        """How many :class:`SharedCapture` views read this capture."""

    # -- life cycle ---------------------------------------------------------------------------
    def leader(self) -> "GradientMomentCollector | None":
        """The attached swap-mode collector of these same parameters, if another one is: a
        second consumer reads that one's capture (:class:`SharedCapture`) instead of capturing."""
        other = _SWAPPING.get(id(self.params[0]))
        found = other() if other is not None else None
        if found is None or found is self or not found._attached or [id(p) for p in found.params] != [id(p) for p in self.params]:
            return None
        return found

    def attach(self) -> "GradientMomentCollector":
        """Start observing backward passes (idempotent). Returns ``self``.

        A second collector in ``mode="swap"`` on the same parameters reads them with hooks
        instead (the same results): two that each set ``.grad`` aside would each see the
        other's running sum."""
        if self.mode == "swap" and not self._attached:
            key = id(self.params[0])
            other = _SWAPPING.get(key)
            if other is not None and other() is not None and other() is not self:
                self.mode = "hooks"
            else:
                _SWAPPING[key] = weakref.ref(self)
        if self.mode == "hooks" and not self._handles:
            self._handles = [p.register_hook(partial(self._on_grad, i)) for i, p in enumerate(self.params)]
        self._attached = True
        return self

    def detach(self) -> None:
        """Stop observing (removes the hooks; an open group is cancelled)."""
        self.cancel_group()
        for h in self._handles:
            h.remove()
        self._handles = []
        self._attached = False
        key = id(self.params[0])
        if key in _SWAPPING and _SWAPPING[key]() is self:
            del _SWAPPING[key]
        self.mode = self._requested

    def __enter__(self) -> "GradientMomentCollector":
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def set_mode(self, mode: str) -> None:
        """Change how groups are seen, between steps (no group may be open)."""
        check_choice("mode", mode, MODES)
        if mode == self._requested:
            return  # (attach may have chosen hooks for a requested swap: nothing to change)
        if self.group_open:
            raise RuntimeError("set_mode() called while a group is open")
        attached = self._attached
        self.detach()
        self.mode = self._requested = mode
        if attached:
            self.attach()

    def record(self, indices: list[int], grads: list[Tensor]) -> None:
        """Take the open group's gradients of the tensors ``indices`` (``mode="external"``)."""
        if self._scale is None or not indices:
            return
        self._take(indices, grads)

    def _take(self, indices: list[int], grads: list[Tensor]) -> None:
        """The open group's norms of tensors ``indices`` (one multi-tensor kernel) and, if asked,
        their scaled squares into the elementwise buffers."""
        for i, norm in zip(indices, torch._foreach_norm(grads)):
            self._current[i] = norm
        if self.elementwise:
            self._square_into(indices, grads)

    def _take_present(self, grads: list[Tensor | None]) -> None:
        """:meth:`_take` of the tensors that got a gradient (the others count as zero)."""
        idx = [i for i, g in enumerate(grads) if g is not None]
        if idx:
            self._take(idx, [grads[i] for i in idx])  # type: ignore[misc]

    def _square_into(self, indices: Iterable[int], grads: list[Tensor]) -> None:
        """Welford's update of the open group's scaled gradients into the elementwise moments."""
        indices = list(indices)
        j = len(self._scales) + 1  # this group's number
        means = [self._elem_buffer(self._mean, i, g) for i, g in zip(indices, grads)]
        m2s = [self._elem_buffer(self._m2, i, g) for i, g in zip(indices, grads)]
        xs = torch._foreach_mul([g.to(m.dtype) for g, m in zip(grads, means)], self._scale)
        delta = torch._foreach_sub(xs, means)
        torch._foreach_add_(means, delta, alpha=1.0 / j)
        torch._foreach_addcmul_(m2s, delta, torch._foreach_sub(xs, means))
        self._elem_seen.update(indices)

    def _close_elementwise(self) -> None:
        """A tensor that got no gradient in the closing group counts a zero in its moments."""
        if self.elementwise:
            j = len(self._scales) + 1
            missed = [i for i, m in enumerate(self._mean) if m is not None and i not in self._elem_seen]
            if missed:
                means = [self._mean[i] for i in missed]
                m2s = [self._m2[i] for i in missed]
                old = [m.clone() for m in means]
                torch._foreach_mul_(means, 1.0 - 1.0 / j)
                torch._foreach_addcmul_(m2s, old, means)  # delta = -M, x - M_new = -M_new
        self._elem_seen = set()

    def set_elementwise(self, enabled: bool) -> None:
        """Start or stop keeping elementwise moments (takes effect from the next group)."""
        self.elementwise = bool(enabled)
        if not enabled:
            self._m2 = [None] * len(self.params)
            self._mean = [None] * len(self.params)

    # -- groups -------------------------------------------------------------------------------
    def begin_group(self, scale: float = 1.0, size: int | None = None, loss: Tensor | None = None) -> None:
        """Start recording one group (one backward). ``scale`` maps raw gradients to the group's
        mean gradient; ``size`` is the group's number of samples; ``loss``, the tensor that
        backward starts from (or any tensor on its way to the parameters), is needed by
        ``mode="final"`` and ignored otherwise."""
        if self._scale is not None:
            raise RuntimeError("begin_group() called twice without end_group()")
        check_number("scale", scale, low=0, low_open=True)
        if size is not None:
            check_int("size", size, low=1)
        if self.mode == "final" and self._attached:
            if loss is None or not loss.requires_grad:
                raise ValueError(
                    f"mode='final' reads .grad at the end of backward and needs the group's loss: "
                    f"begin_group(..., loss=loss) with a loss that requires grad (got {type(loss).__name__})"
                )
            if loss.grad_fn is not None:  # the backward's first node: no Python tensor-hook machinery
                loss.grad_fn.register_prehook(self._queue_read)
            else:
                loss.register_hook(self._queue_read)
        self._scale = float(scale)
        self._read_in_group = False
        self._group_sizes.append(size)
        if self._stale:
            self._stale = False
            for buf in self._m2 + self._mean:
                if buf is not None:
                    buf.zero_()
        if self.mode == "swap" and self._attached:
            params = self.params
            self._saved = [p.grad for p in params]
            for p in params:
                p.grad = None

    def end_group(self) -> None:
        """Close the group: its per-tensor squared norms become one row of :meth:`group_sq_norms`.

        A tensor that got no gradient in the group (unused) counts as zero."""
        if self._scale is None:
            raise RuntimeError("end_group() called without begin_group()")
        swapped = self._saved is not None and self._end_swapped_group()
        self._close_elementwise()
        if swapped:
            self._scales.append(self._scale)
            self._scale = None
            return
        zero = self._zero
        self._norms.extend(zero if t is None else t for t in self._current)
        self._scales.append(self._scale)
        self._current = [None] * len(self.params)
        self._scale = None

    def _end_swapped_group(self) -> bool:
        """Take the group's gradients from ``.grad`` and put the set-aside ones back with the new
        ones added. Returns whether the norms went straight into the closed groups (every tensor
        got a gradient: the common case, with the least Python per micro-batch)."""
        saved, self._saved = self._saved, None
        assert saved is not None
        params = self.params
        fresh = [p.grad for p in params]
        # (`None in list_of_tensors` would call Tensor.__eq__: test identity only)
        if not any(g is None for g in fresh):
            norms = torch._foreach_norm(fresh)
            if self.elementwise:
                self._square_into(range(len(params)), fresh)
            if not any(g is None for g in saved):  # .grad = old + new, in place in old, as autograd does
                torch._foreach_add_(saved, fresh)
                for p, old in zip(params, saved):
                    p.grad = old
            elif any(g is not None for g in saved):
                self._add_back(saved, fresh)
            self._norms.extend(norms)
            return True
        self._take_present(fresh)
        self._add_back(saved, fresh)
        return False

    def _add_back(self, saved: list[Tensor | None], fresh: list[Tensor | None]) -> None:
        params = self.params
        back = [i for i, (old, new) in enumerate(zip(saved, fresh)) if old is not None and new is not None]
        if back:
            torch._foreach_add_([saved[i] for i in back], [fresh[i] for i in back])
        for p, old in zip(params, saved):
            if old is not None:
                p.grad = old

    def cancel_group(self) -> None:
        """Drop an open group (e.g. a backward that was skipped); gradients are kept."""
        if self._scale is not None:
            if self._saved is not None and self._end_swapped_group():
                del self._norms[len(self._norms) - len(self.params) :]
            self._group_sizes.pop()
            self._current = [None] * len(self.params)
            self._scale = None
            self._elem_seen = set()

    def reset(self) -> None:
        """Forget all groups of the step (elementwise buffers are zeroed in place, not freed, when
        the next group begins)."""
        self.cancel_group()
        self._norms = []
        self._scales = []
        self._group_sizes = []
        # zeroed when the next group begins, not now: a VR optimizer may still read this step's
        # moments (handed over by reference) after the step's statistics are done
        self._stale = True

    def _queue_read(self, *grad: Any) -> None:
        # Runs as backward starts: the callback is queued before DDP's reducer queues its own
        # (when the last bucket is ready), and the engine runs callbacks in order.
        torch.autograd.Variable._execution_engine.queue_callback(self._read_grads)

    def _read_grads(self) -> None:
        if self._scale is None:
            return
        if self._read_in_group and self.elementwise:
            # the norms of .grad would be right (it holds the sum) but the squares of the first
            # read are already in the elementwise sum
            raise RuntimeError(
                "mode='final' reads .grad once per group, and this group ran a second backward through its loss; "
                "use mode='hooks' for several backward passes per group"
            )
        self._read_in_group = True
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):
            self._take_present(grads)
        else:
            self._take(self._all, grads)  # type: ignore[arg-type]

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
            if index in self._elem_seen:
                raise RuntimeError("elementwise moments need one gradient per tensor and group; this group ran a "
                                   "second backward through the same parameters: end the group in between")
            self._square_into([index], [grad])

    def _elem_buffer(self, buffers: list[Tensor | None], index: int, like: Tensor) -> Tensor:
        buf = buffers[index]
        if buf is None:
            dtype = torch.float32 if like.dtype in (torch.float16, torch.bfloat16) else like.dtype
            buf = buffers[index] = torch.zeros_like(like, dtype=dtype)
        return buf

    # -- results ------------------------------------------------------------------------------
    @property
    def group_open(self) -> bool:
        """Whether :meth:`begin_group` was called and :meth:`end_group` not yet."""
        return self._scale is not None

    @property
    def num_groups(self) -> int:
        return len(self._scales)

    @property
    def group_sizes(self) -> list[int | None]:
        return list(self._group_sizes[: self.num_groups])

    def group_sq_norms(self) -> Tensor:
        """``[groups, tensors]`` squared norms of each group's mean gradient, in float64."""
        return self._squared(self._norms, self._scales)

    def _squared(self, norms: list[Tensor], scales: list[float]) -> Tensor:
        n = len(self.params)
        if not scales:
            return torch.zeros(0, n, dtype=torch.float64, device=self._device)
        rows = torch.stack(norms).view(len(scales), n).to(torch.float64).square_()
        factor = torch.tensor(scales, dtype=torch.float64, device=rows.device).square_()
        return rows.mul_(factor[:, None])

    def raw_norms(self) -> tuple[list[Tensor], list[float]] | None:
        r"""The closed groups as captured, the cheapest form of :meth:`group_sq_norms`: their raw
        per-tensor norms, flat and group-major (``groups x tensors`` 0-d tensors, not copied), and
        their scales :math:`s_j`; :math:`|g_{ij}|^2 = s_j^2\,\text{raw}_{ij}^2`. ``None`` while a
        group is open."""
        if self._scale is not None:
            return None
        return self._norms, self._scales

    def local_sums(self) -> tuple[Tensor, int, float, float]:
        r"""This process's :math:`\sum_j |g_j|^2` per tensor (float64, the open group included),
        its number of groups, :math:`\sum_j 1/b_j` and :math:`\sum_j b_j` (NaN if a size is unknown)."""
        norms, scales, sizes = list(self._norms), list(self._scales), list(self._group_sizes)
        if self._scale is not None:
            norms.extend(self._zero if t is None else t for t in self._current)
            scales.append(self._scale)
        else:
            sizes = sizes[: len(scales)]
        return (self._squared(norms, scales).sum(0), len(scales), *size_sums(sizes))

    def elementwise_sq_sum(self) -> list[Tensor]:
        r""":math:`\sum_j g_j^2` per parameter tensor (zeros for a tensor that got no gradient),
        as :math:`M_2 + n\bar g^2` from :meth:`elementwise_moments`."""
        means, m2s, n = self.elementwise_moments()
        # (in an open group, e.g. read by the DDP hook in backward, a tensor already seen counts it)
        return [torch.addcmul(m2, mean, mean, value=float(n + (i in self._elem_seen)))
                for i, (mean, m2) in enumerate(zip(means, m2s))]

    def elementwise_moments(self) -> tuple[list[Tensor], list[Tensor], int]:
        r"""Per parameter tensor, the mean :math:`\bar g` of this process's closed groups'
        gradients and their centred sum of squares :math:`M_2 = \sum_j (g_j - \bar g)^2`
        (Welford's update: no float32 cancellation), and the number of groups."""
        if not self.elementwise:
            raise RuntimeError("elementwise moments were not requested: construct with elementwise=True")
        zeros = [torch.zeros_like(p, dtype=torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype)
                 if m is None else None for p, m in zip(self.params, self._mean)]
        means = [z if m is None else m for z, m in zip(zeros, self._mean)]
        m2s = [torch.zeros_like(m) if s is None else s for m, s in zip(means, self._m2)]
        return means, m2s, self.num_groups  # type: ignore[return-value]


class SharedCapture:
    """A second consumer's view of another collector's capture (one device, ``mode="swap"``):
    the same groups' norms and elementwise moments, captured once.

    Its group and step calls are no-ops, except that asking for elementwise moments turns them on
    in the shared capture, and a group's ``scale`` must match the capture's (two consumers that
    read one loss differently cannot share it). The capture is reset by its owner at the start of
    the next step, so every consumer reads it after backward, in any order.
    """

    def __init__(self, leader: GradientMomentCollector) -> None:
        if not isinstance(leader, GradientMomentCollector):
            fail("leader", leader, "a GradientMomentCollector", TypeError)
        self.leader = leader
        self.names, self.params = leader.names, leader.params
        leader.followers += 1

    mode = property(lambda self: self.leader.mode)
    elementwise = property(lambda self: self.leader.elementwise)
    group_open = property(lambda self: self.leader.group_open)
    num_groups = property(lambda self: self.leader.num_groups)
    group_sizes = property(lambda self: self.leader.group_sizes)

    def attach(self) -> "SharedCapture":
        return self

    def detach(self) -> None:
        self.leader.followers = max(self.leader.followers - 1, 0)

    def set_elementwise(self, enabled: bool) -> None:
        if enabled:
            self.leader.set_elementwise(True)

    def set_mode(self, mode: str) -> None:
        return None

    def begin_group(self, scale: float = 1.0, size: int | None = None, loss: Tensor | None = None) -> None:
        check_number("scale", scale, low=0, low_open=True)
        own = self.leader._scale
        if own is not None and abs(own - scale) > 1e-9 * max(abs(own), 1.0):
            raise RuntimeError(
                f"two consumers of one model's gradients read a group differently (scale {scale} against {own}): "
                "give every GradNoiseMonitor / VRMoments of a Trainer the same loss_reduction"
            )

    def end_group(self) -> None:
        return None

    def cancel_group(self) -> None:
        return None

    def reset(self) -> None:
        return None

    def raw_norms(self) -> Any:
        return self.leader.raw_norms()

    def local_sums(self) -> Any:
        return self.leader.local_sums()

    def group_sq_norms(self) -> Tensor:
        return self.leader.group_sq_norms()

    def elementwise_moments(self) -> Any:
        return self.leader.elementwise_moments()

    def elementwise_sq_sum(self) -> list[Tensor]:
        return self.leader.elementwise_sq_sum()
