"""A DDP communication hook that reads each process's gradient moments from DDP's own buckets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_gradnoise._validate import check_callable, check_int, check_optional, fail
from lightning_gradnoise.capture._collector import GradientMomentCollector
from lightning_gradnoise.capture._dist import WorldSize

__all__ = ["PACK_LIMIT", "ReducedMoments", "GradNoiseCommState", "gradnoise_comm_hook"]

_FUSE_FROM = 1 << 16
"""Buckets of at least this many elements are divided straight into the packed buffer."""

CommHook = Callable[[Any, dist.GradBucket], torch.futures.Future]

PACK_LIMIT = 1 << 23
"""Default :attr:`GradNoiseCommState.pack_limit`: a bucket that, with its elementwise moments,
holds at most this many elements (32 MiB in float32, above DDP's default 25 MB bucket cap)
carries them inside its own all-reduce; a bigger one is reduced in place with the moments in an
all-reduce beside it. Packing copies the bucket twice, a second collective costs a round trip
between processes: on two CPU processes (gloo) with a 2.4 MB bucket, packing cost about half as
much (``benchmarks/ddp_overhead.py --hidden 1024``)."""


@dataclass
class ReducedMoments:
    r"""One step's elementwise moments, summed over every group of every process by the hook."""

    elementwise: list[Tensor] | None
    r""":math:`\sum_j g_j^2` per parameter tensor, or ``None`` if not asked for this step."""
    packed_bytes: int
    """Bytes this process added to the step's collectives (for the benchmarks)."""


class GradNoiseCommState:
    """The state of :func:`gradnoise_comm_hook`: where the local moments come from and where the
    reduced ones go.

    Args:
        collector: the :class:`GradientMomentCollector` that the hook feeds (its local norms, in
            ``mode="external"``) and reads (its elementwise moments, when it keeps them).
        process_group: the group DDP reduces over (``None``: the default group).
        inner_hook: a user's communication hook (e.g. fp16 compression) that still reduces the
            gradients; elementwise moments then travel in one extra all-reduce.
        inner_state: the state ``inner_hook`` is called with.
        pack_limit: a bucket of at most this many elements with its elementwise moments carries
            them in its own all-reduce; a bigger one is reduced in place with the moments beside it.
    """

    def __init__(
        self,
        collector: GradientMomentCollector | None = None,
        process_group: Any = None,
        inner_hook: CommHook | None = None,
        inner_state: Any = None,
        pack_limit: int = PACK_LIMIT,
    ) -> None:
        self.pack_limit = check_int("pack_limit", pack_limit, low=0)
        if collector is not None and not isinstance(collector, GradientMomentCollector):
            fail("collector", collector, "a GradientMomentCollector or None", TypeError)
        check_optional(check_callable, "inner_hook", inner_hook)
        self.process_group = process_group
        self.inner_hook = inner_hook
        self.inner_state = inner_state
        self.collector: GradientMomentCollector | None = None
        self._index: dict[int, int] = {}
        # reduced buffers as the collectives left them, parsed in take() on the training thread
        # rather than in the futures' callbacks (which hold the GIL on the communication thread):
        # (collector indices, buffer or future, offset of the moments, bytes added)
        self._raw: list[tuple[list[int], Tensor | torch.futures.Future, int, int]] = []
        self._world_size = WorldSize()
        self.last_packed_bytes = 0
        """Bytes this process added to the collectives of the last step taken."""
        self.pack_requested = False
        """Set by a consumer that needs elementwise moments on every step, before DDP is set up
        (:meth:`request_packing`)."""
        self.registered = False
        """Whether :func:`gradnoise_comm_hook` was registered with this state (set by whoever
        registers it; ``strategy="gnddp"`` does)."""
        if collector is not None:
            self.bind(collector)

    def bind(self, collector: GradientMomentCollector | None) -> None:
        """Feed and read ``collector`` (``None`` unbinds: the hook then only reduces)."""
        self.collector = collector
        self._index = {} if collector is None else {id(p): i for i, p in enumerate(collector.params)}
        self._raw = []

    def request_packing(self) -> None:
        """Ask for the hook: a consumer needs elementwise moments on every step, cheapest packed
        into DDP's own all-reduce. Takes effect when DDP is set up (call it before)."""
        self.pack_requested = True

    def take(self) -> ReducedMoments | None:
        """The elementwise moments reduced since the last call, or ``None`` if no all-reduce
        carried any."""
        raw, self._raw = self._raw, []
        col = self.collector
        if col is None or not raw:
            self.last_packed_bytes = 0
            return None
        elem = [torch.zeros_like(p, dtype=torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype) for p in col.params]
        nbytes = 0
        for known, out, start, added in raw:
            if not isinstance(out, Tensor):  # an all-reduce beside a bucket, not waited for yet
                out = out.wait()[0]
            for i, piece in zip(known, torch.split(out[start:], [elem[i].numel() for i in known])):
                elem[i].copy_(piece.view_as(elem[i]))
            nbytes += added
        self.last_packed_bytes = nbytes
        return ReducedMoments(elem, nbytes)


def gradnoise_comm_hook(state: GradNoiseCommState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    r"""All-reduce a DDP bucket's gradients (averaged, as DDP does) and feed this process's
    gradient-noise moments to the collector of ``state``.

    Scalar moments need no communication here: in ``mode="external"`` the hook records the
    bucket's local per-tensor norms :math:`|g_j|` into the collector (one multi-tensor kernel,
    before the reduction overwrites them), and :class:`~lightning_gradnoise.capture.GradNoiseTracker`
    sums every process's per-step values in one small all-reduce when it folds steps into its
    statistics (on logged steps). Only when the collector keeps elementwise moments (GSNR, the VR
    optimizers) do they travel with the gradients: appended to a bucket of up to
    ``state.pack_limit`` elements (:data:`PACK_LIMIT`), so that DDP's own collective sums them,
    or in one all-reduce beside a bigger bucket, a user's ``inner_hook`` or a low-precision
    buffer (then in float32 or wider, never losing range). Otherwise the bucket is reduced in
    place, exactly as DDP's default hook does.

    Works on any backend (gloo on CPU, NCCL on GPUs). Register it on a plain
    :class:`~torch.nn.parallel.DistributedDataParallel` module::

        tracker = GradNoiseTracker(model).attach()
        ddp = DistributedDataParallel(model)
        state = GradNoiseCommState(tracker.collector)
        ddp.register_comm_hook(state, gradnoise_comm_hook)
        ...  # backward, then: tracker.finish_step(reduced=state.take())
    """
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = state._world_size(group)
    buffer = bucket.buffer()
    col = state.collector
    elem = known = None
    if col is not None and col.group_open:
        if col.mode == "external" or col.elementwise:
            index = state._index
            idx = [index.get(id(p), -1) for p in bucket.parameters()]
            known = [i for i in idx if i >= 0]
            if col.mode == "external" and col.num_groups == 0:  # the bucket holds this process's one group
                grads = bucket.gradients()
                col.record(known, grads if len(known) == len(idx) else [g for i, g in zip(idx, grads) if i >= 0])
            if col.elementwise and known and state.pack_requested:
                parts = col.elementwise_sq_sum()
                elem = torch.cat([parts[i].reshape(-1) for i in known])
    full_precision = buffer.dtype in (torch.float32, torch.float64)
    if elem is None:
        if state.inner_hook is not None:
            return state.inner_hook(state.inner_state, bucket)
        return dist.all_reduce(buffer.div_(world), group=group, async_op=True).get_future().then(lambda f: f.value()[0])
    assert known is not None
    n = buffer.numel()
    if state.inner_hook is None and full_precision and n + elem.numel() <= state.pack_limit:
        tail = elem.to(buffer.dtype)
        if n < _FUSE_FROM:  # few elements: fewest kernels
            packed = torch.cat([buffer.div_(world), tail])
        else:  # many: the division writes straight into the packed buffer, one pass over the bucket
            packed = torch.empty(n + tail.numel(), dtype=buffer.dtype, device=buffer.device)
            torch.div(buffer, world, out=packed[:n])
            packed[n:].copy_(tail)
        fut = dist.all_reduce(packed, group=group, async_op=True).get_future()
        nbytes = tail.numel() * tail.element_size()

        def unpack(f: torch.futures.Future) -> Tensor:
            out = f.value()[0]
            state._raw.append((known, out, n, nbytes))
            return out[:n]

        return fut.then(unpack)

    # Beside the gradient's collective: a bucket above the pack limit is reduced in place
    # (packing would copy it twice), and a compression hook or wrapper owns its collective; beside a
    # low-precision buffer the moments stay in their own precision (float32 or wider).
    small_fut = dist.all_reduce(elem, group=group, async_op=True).get_future()
    state._raw.append((known, small_fut, 0, elem.numel() * elem.element_size()))  # waited for in take()
    if state.inner_hook is not None:
        return state.inner_hook(state.inner_state, bucket)
    return dist.all_reduce(buffer.div_(world), group=group, async_op=True).get_future().then(lambda f: f.value()[0])


# DDP checks a hook's annotations as objects; this module's postponed (string) annotations would fail it.
gradnoise_comm_hook.__annotations__ = {
    "state": GradNoiseCommState,
    "bucket": dist.GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}
