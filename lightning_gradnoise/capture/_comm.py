"""A DDP communication hook that carries gradient-noise moments inside DDP's own all-reduce."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_gradnoise.capture._collector import GradientMomentCollector

__all__ = ["PACK_LIMIT", "ReducedMoments", "GradNoiseCommState", "gradnoise_comm_hook"]

_FUSE_FROM = 1 << 16
"""Buckets of at least this many elements are divided straight into the packed buffer."""

CommHook = Callable[[Any, dist.GradBucket], torch.futures.Future]

PACK_LIMIT = 1 << 23
"""Default :attr:`GradNoiseCommState.pack_limit`: buckets of at most this many elements (32 MiB in
float32, above DDP's default 25 MB bucket cap) carry the moments inside their own all-reduce;
bigger ones are reduced in place with the moments in a small all-reduce beside them. Packing
copies the bucket twice, a second collective costs a round trip between processes: on two CPU
processes (gloo) with a 2.4 MB bucket, packing cost about half as much
(``benchmarks/ddp_overhead.py --hidden 1024``)."""


@dataclass
class ReducedMoments:
    """One step's moments summed over every group of every process."""

    sq_norm_sums: Tensor
    r""":math:`\sum_j |g_j|^2` per parameter tensor, float64."""
    counts: Tensor
    r""":math:`[k, \sum_j 1/b_j, \sum_j b_j]` on the device (not read back, which on a GPU would
    wait for it: :attr:`num_groups` and the others do)."""
    elementwise: list[Tensor] | None
    r""":math:`\sum_j g_j^2` per parameter tensor, or ``None`` if not asked for this step."""
    packed_bytes: int
    """Bytes this process added to the step's collectives (for the benchmarks)."""

    @property
    def num_groups(self) -> int:
        return int(round(float(self.counts[0])))

    @property
    def inv_size_sum(self) -> float:
        return float(self.counts[1])

    @property
    def size_sum(self) -> float:
        return float(self.counts[2])


class GradNoiseCommState:
    """The state of :func:`gradnoise_comm_hook`: where the local moments come from and where the
    reduced ones go.

    Args:
        collector: the :class:`GradientMomentCollector` whose hooks see the local gradients.
        process_group: the group DDP reduces over (``None``: the default group).
        inner_hook, inner_state: a user's communication hook (e.g. fp16 compression) that still
            reduces the gradients; the moments then travel in one small extra all-reduce.
        pack_limit: buckets of at most this many elements carry the moments in their own
            all-reduce; bigger ones are reduced in place with the moments beside them.
    """

    def __init__(
        self,
        collector: GradientMomentCollector | None = None,
        process_group: Any = None,
        inner_hook: CommHook | None = None,
        inner_state: Any = None,
        pack_limit: int = PACK_LIMIT,
    ) -> None:
        if not (isinstance(pack_limit, int) and pack_limit >= 0):
            raise ValueError(f"pack_limit={pack_limit!r} is invalid: expected an int >= 0 (elements)")
        self.pack_limit = pack_limit
        self.process_group = process_group
        self.inner_hook = inner_hook
        self.inner_state = inner_state
        self.collector: GradientMomentCollector | None = None
        self._index: dict[int, int] = {}
        # reduced buffers as the collectives left them, parsed in take() on the training thread
        # rather than in the futures' callbacks (which hold the GIL on the communication thread)
        self._raw: list[tuple[bool, list[int], list[int], Tensor | torch.futures.Future, int, int, bool, int]] = []
        self._world: tuple[Any, int] | None = None
        self.last_packed_bytes = 0
        """Bytes this process added to the collectives of the last step taken."""
        if collector is not None:
            self.bind(collector)

    def bind(self, collector: GradientMomentCollector | None) -> None:
        """Read local moments from ``collector`` (``None`` unbinds: the hook then only reduces)."""
        self.collector = collector
        self._index = {} if collector is None else {id(p): i for i, p in enumerate(collector.params)}
        self._raw = []

    def take(self) -> ReducedMoments | None:
        """The moments reduced since the last call, or ``None`` if no all-reduce carried them."""
        raw, self._raw = self._raw, []
        parts: list[tuple[list[int], Tensor, Tensor | None, int, list[int]]] = []
        counts: Tensor | None = None
        for last, known, elem_known, out, start, head_numel, has_elem, nbytes in raw:
            if not isinstance(out, Tensor):  # a small all-reduce beside a bucket, not waited for yet
                out = out.wait()[0]
            head = out[start : start + head_numel]
            parts.append((known, head[: len(known)], out[start + head_numel :] if has_elem else None, nbytes, elem_known))
            if last:  # the last bucket also carries the three counts (copied: out is bucket-sized)
                counts = head[len(known) :].to(torch.float64, copy=True)
        col = self.collector
        if col is None or counts is None:
            self.last_packed_bytes = 0
            return None
        n = len(col.params)
        if len(parts) == 1 and len(parts[0][0]) == n and parts[0][0] == list(range(n)):
            sums = parts[0][1].to(torch.float64, copy=True)  # one bucket holds every tensor (small models)
        else:
            sums = torch.zeros(n, dtype=torch.float64, device=col.params[0].device)
            for known, head, *_ in parts:
                sums[known] = head.to(torch.float64)
        elem = None
        if col.elementwise and any(e is not None for _, _, e, *_ in parts):
            elem = [torch.zeros_like(p, dtype=torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype) for p in col.params]
            for _, _, flat, _, elem_known in parts:
                if flat is not None:
                    for i, piece in zip(elem_known, torch.split(flat, [elem[i].numel() for i in elem_known])):
                        elem[i].copy_(piece.view_as(elem[i]))
        nbytes = sum(part[3] for part in parts)
        self.last_packed_bytes = nbytes
        return ReducedMoments(sums, counts, elem, nbytes)


def _local_payload(state: GradNoiseCommState, bucket: dist.GradBucket, buffer_dtype: torch.dtype) -> tuple[list[int], list[Tensor], list[int], Tensor | None]:
    r"""The bucket's tensors as collector indices in parameter order, the payload's head (their
    :math:`\sum_j |g_j|^2` in that order and, in the last bucket, the three counts) as pieces in
    the bucket's dtype, the tensors in bucket order, and the elementwise moments if asked."""
    col = state.collector
    assert col is not None
    index = state._index
    idx = [index.get(id(p), -1) for p in bucket.parameters()]
    known = [i for i in idx if i >= 0]
    # DDP fills buckets in reverse parameter order: sending the head in parameter order lets
    # take() use a one-bucket model's sums as they arrive
    head_known = sorted(known)
    dtype = buffer_dtype if buffer_dtype in (torch.float32, torch.float64) else torch.float64
    pieces: list[Tensor] = []
    if col.mode == "external" and col.num_groups == 0:  # the bucket holds this process's one group
        grads = bucket.gradients()
        col.record(known, grads if len(known) == len(idx) else [g for i, g in zip(idx, grads) if i >= 0])
        sq, k, inv, total = col.open_group_sums(head_known, dtype)
        if sq is not None:
            pieces.append(sq)
    else:
        sums, k, inv, total = col.local_sums()
        pieces.append(sums[head_known].to(dtype))
    if bucket.is_last():
        pieces.append(torch.tensor([k, inv, total], dtype=dtype, device=col.params[0].device))
    return head_known, pieces, known, _elementwise(col, known)


def _elementwise(col: GradientMomentCollector, known: list[int]) -> Tensor | None:
    if not col.elementwise or not known:
        return None
    parts = col.elementwise_sq_sum()
    return torch.cat([parts[i].reshape(-1) for i in known])


def gradnoise_comm_hook(state: GradNoiseCommState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    r"""All-reduce a DDP bucket's gradients (averaged, as DDP does) together with this process's
    gradient-noise moments for the bucket's parameters (summed).

    The moments (one float per parameter tensor, three counts in the last bucket, and only when
    the collector asks for them the elementwise :math:`\sum_j g_j^2`) are appended to a bucket of up
    to ``state.pack_limit`` elements (:data:`PACK_LIMIT`), so they travel in DDP's own collective: no second all-reduce.
    A bigger bucket is reduced in place, as DDP does, with its moments in one small all-reduce
    beside it (packing would copy the bucket twice). With a user ``inner_hook`` or a low-precision
    buffer (a compression wrapper) they also go beside it, in float64, so that they never lose
    range or precision. Steps that measure nothing are reduced exactly as DDP's default hook does.

    Works on any backend (gloo on CPU, NCCL on GPUs). Register it on a plain
    :class:`~torch.nn.parallel.DistributedDataParallel` module::

        tracker = GradNoiseTracker(model).attach()
        ddp = DistributedDataParallel(model)
        state = GradNoiseCommState(tracker.collector)
        ddp.register_comm_hook(state, gradnoise_comm_hook)
        ...  # backward, then: tracker.finish_step(reduced=state.take())
    """
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    if state._world is None or state._world[0] is not group:
        state._world = (group, dist.get_world_size(group))
    world = state._world[1]
    buffer = bucket.buffer()
    col = state.collector
    if col is None or (col.num_groups == 0 and not col.group_open):  # nothing measured this step
        known, head, elem_known, elem = [], [], [], None
    else:
        known, head, elem_known, elem = _local_payload(state, bucket, buffer.dtype)
    n = buffer.numel()
    head_numel = sum(h.numel() for h in head)
    full_precision = buffer.dtype in (torch.float32, torch.float64)
    if state.inner_hook is None and full_precision and not head:  # DDP's own reduction, in place
        return dist.all_reduce(buffer.div_(world), group=group, async_op=True).get_future().then(lambda f: f.value()[0])
    extras = head + ([elem] if elem is not None else [])
    if state.inner_hook is None and full_precision and n + head_numel + (0 if elem is None else elem.numel()) <= state.pack_limit:
        tail = [e.to(buffer.dtype) for e in extras]
        if n < _FUSE_FROM:  # few elements: fewest kernels
            packed = torch.cat([buffer.div_(world)] + tail)
        else:  # many: the division writes straight into the packed buffer, one pass over the bucket
            packed = torch.empty(n + sum(t.numel() for t in tail), dtype=buffer.dtype, device=buffer.device)
            torch.div(buffer, world, out=packed[:n])
            torch.cat(tail, out=packed[n:])
        fut = dist.all_reduce(packed, group=group, async_op=True).get_future()

        last, nbytes = bucket.is_last(), (packed.numel() - n) * packed.element_size()

        def unpack(f: torch.futures.Future) -> Tensor:
            out = f.value()[0]
            state._raw.append((last, known, elem_known, out, n, head_numel, elem is not None, nbytes))
            return out[:n]

        return fut.then(unpack)

    # A bucket above the pack limit is reduced in place (packing copies it twice) and a compression hook or
    # wrapper owns the gradient's collective: the moments go beside it, in the bucket's precision
    # or, beside a low-precision buffer, in float64 so that they never lose range.
    small = torch.cat([e.to(buffer.dtype if full_precision else torch.float64) for e in extras]) if extras else None
    small_fut = dist.all_reduce(small, group=group, async_op=True).get_future() if small is not None else None
    if state.inner_hook is not None:
        grad_fut = state.inner_hook(state.inner_state, bucket)
    else:
        grad_fut = dist.all_reduce(buffer.div_(world), group=group, async_op=True).get_future().then(lambda f: f.value()[0])

    if small is not None:  # waited for in take(), on the training thread
        state._raw.append((bucket.is_last(), known, elem_known, small_fut, 0, head_numel, elem is not None, small.numel() * small.element_size()))
    return grad_fut


# DDP checks a hook's annotations as objects; this module's postponed (string) annotations would fail it.
gradnoise_comm_hook.__annotations__ = {
    "state": GradNoiseCommState,
    "bucket": dist.GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}
