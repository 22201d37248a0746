"""The two Lightning namespaces: ``lightning.pytorch`` and ``pytorch_lightning``.

They are separate class hierarchies; a callback is accepted by a Trainer only if it is an
instance of *that* namespace's ``Callback``. Our callbacks inherit from every ``Callback`` class
that is importable, so one object serves both Trainers.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from torch import Tensor

__all__ = ["NAMESPACES", "CallbackBase", "namespace_of", "extract_batch_size"]


def _import(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


NAMESPACES: dict[str, ModuleType] = {
    name: mod for name in ("lightning.pytorch", "pytorch_lightning") if (mod := _import(name)) is not None
}
if not NAMESPACES:  # pragma: no cover - packaging guarantees one
    raise ImportError("lightning_gradnoise needs `pytorch-lightning` or `lightning`: pip install pytorch-lightning")

_callback_classes = tuple(mod.Callback for mod in NAMESPACES.values())


class CallbackBase(*_callback_classes):  # type: ignore[misc]
    """A ``Callback`` of every installed Lightning namespace."""

    @property
    def state_key(self) -> str:
        return type(self).__qualname__


def namespace_of(trainer: Any) -> ModuleType:
    """The Lightning namespace a Trainer belongs to."""
    for mod in NAMESPACES.values():
        if isinstance(trainer, mod.Trainer):
            return mod
    raise TypeError(f"{type(trainer).__module__}.{type(trainer).__qualname__} is not a Lightning Trainer")


def gradient_as_bucket_view(strategy: Any) -> bool:
    """Whether a DDP strategy makes ``.grad`` a view of DDP's buckets (divided in place there)."""
    return bool(getattr(strategy, "_ddp_kwargs", {}).get("gradient_as_bucket_view", False))


def extract_batch_size(batch: Any) -> int:
    """Samples in a batch, found as Lightning finds them (first dimension of the first tensor)."""
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.dim() else 1
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor) and batch[0].dim():
        return batch[0].shape[0]  # the common (inputs, targets) case, without the generic walk
    from_ns = next(iter(NAMESPACES.values()))
    return int(from_ns.utilities.data.extract_batch_size(batch))
