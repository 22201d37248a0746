"""Register ``strategy="gnddp"`` in each Lightning namespace without importing Lightning.

Importing :mod:`lightning_gradnoise` must stay cheap (the ``gradnoise`` command and the math
layers never need Lightning, whose import costs seconds), yet ``Trainer(strategy="gnddp")`` must
resolve whichever namespace the user imports, before or after this package. So: a namespace
that is already imported is registered at once; for one that is not, a finder on
``sys.meta_path`` wraps its loader and registers the strategies right after the namespace's
package has run.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any, Optional, Sequence

__all__ = ["NAMESPACE_MODULES", "flush", "install"]

NAMESPACE_MODULES = ("lightning.pytorch", "pytorch_lightning")
"""The Lightning packages whose strategy registries learn the ``gnddp`` names."""

_busy = False
_pending = False


def _ours_initializing(done: str) -> bool:
    return any(
        name.startswith("lightning_gradnoise.") and name != done
        and getattr(getattr(mod, "__spec__", None), "_initializing", False)
        for name, mod in list(sys.modules.items())
    )


def _register(done: str = "") -> None:
    global _busy, _pending
    if _busy:  # a namespace imported while registering: the outer call registers it as well
        return
    if _ours_initializing(done):
        # Lightning was imported from inside our own Lightning layer, half loaded: registering now
        # would import it again. The layer's packages call flush() when they are complete.
        _pending = True
        return
    _busy, _pending = True, False
    try:
        from lightning_gradnoise.strategies import register_strategies

        register_strategies()
    finally:
        _busy = False


def flush(done: str) -> None:
    """Register now if a namespace was imported while our Lightning layer was loading.

    Called last by each package of that layer, ``done`` naming itself: it is complete though
    still marked as initializing."""
    if _pending:
        _register(done)


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[ModuleType]:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _register()

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ... as the real loader
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Any = None) -> Any:
        if fullname not in NAMESPACE_MODULES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """Register now in every namespace already imported; watch for the others."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    if any(name in sys.modules for name in NAMESPACE_MODULES):
        _register()
