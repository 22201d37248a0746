"""torch.distributed helpers shared by the tracker, the communication hook and the strategy."""

from __future__ import annotations

import gc
from typing import Any

import torch.distributed as dist

__all__ = ["WorldSize", "destroy_process_group"]

_UNSET = object()


class WorldSize:
    """``dist.get_world_size(group)``, asked once per group: a group's size is fixed.

    1 while ``torch.distributed`` is not initialized (not remembered: it may be initialized
    later). ``None`` is the default group, as in ``torch.distributed``."""

    __slots__ = ("_group", "_size")

    def __init__(self) -> None:
        self._group: Any = _UNSET
        self._size = 1

    def __call__(self, group: Any) -> int:
        if group is self._group:
            return self._size
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        self._group, self._size = group, dist.get_world_size(group)
        return self._size


def destroy_process_group() -> None:
    """Destroy the default process group, if there is one, without hanging on gloo.

    A ``DistributedDataParallel`` reducer that holds the last reference to a gloo group destroys
    it with the GIL held and joins the group's threads, and one of them may be waiting for the
    GIL to free a finished collective's tensors: the process hangs. Unreachable DDP wrappers are
    freed first (``gc.collect()``), so the group's own Python handle, which releases the GIL,
    destroys it. Drop your own references to the DDP model before calling this.

    Examples:
        >>> destroy_process_group()   # nothing to do without torch.distributed
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
