"""``strategy="gnddp"``: DDP that carries gradient-noise moments inside its own all-reduce."""

from __future__ import annotations

import atexit
import inspect
from types import ModuleType
from typing import Any

from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from lightning_gradnoise._validate import check_choice
from lightning_gradnoise.callbacks._compat import NAMESPACES, gradient_as_bucket_view
from lightning_gradnoise.callbacks._monitor import MisconfigurationError
from lightning_gradnoise.capture import GradNoiseCommState, destroy_process_group, gradnoise_comm_hook

__all__ = ["GradNoiseDDPStrategy", "STRATEGY_NAMES", "strategy_class", "register_strategies"]

_START_METHODS = (("gnddp", "popen"), ("gnddp_spawn", "spawn"), ("gnddp_fork", "fork"), ("gnddp_notebook", "fork"))
STRATEGY_NAMES = tuple(name for name, _ in _START_METHODS) + tuple(
    f"{name}_find_unused_parameters_{flag}" for name, _ in _START_METHODS for flag in ("false", "true")
)
"""Every name registered in the Lightning strategy registries."""

_HOOK_CHOICES = ("auto", "always")

_DOC = r"""Lightning's ``DDPStrategy`` that measures every device's gradient moments at DDP's own
    all-reduce.

    Every ``DDPStrategy`` argument works as there, and one more:

    Args:
        moments_hook: ``"auto"`` (default) or ``"always"``: when to register the communication
            hook :func:`~lightning_gradnoise.capture.gradnoise_comm_hook`, which reads each
            device's gradient from DDP's buckets before they are reduced and packs elementwise
            moments into DDP's own collective. ``"auto"`` registers it only where it is the
            cheaper way: when a consumer needs the elementwise moments on every step (the VR
            optimizers' :class:`~lightning_gradnoise.VRMoments`, GSNR logged on every step) or
            with ``gradient_as_bucket_view=True`` (``.grad`` is then DDP's bucket, divided in
            place). Otherwise DDP keeps its built-in C++ all-reduce, and
            :class:`~lightning_gradnoise.GradNoiseMonitor` reads each device's ``.grad`` once at
            the end of backward, before DDP writes the averaged gradient back; the elementwise
            moments of a step that logs GSNR then travel in one all-reduce of their own. A Python
            communication hook on every step costs more than that extra all-reduce on every N-th
            step (see the README's speed section).

    No step communicates anything for the scalar statistics:
    :class:`~lightning_gradnoise.GradNoiseMonitor` sums every process's per-step moments (one
    float per parameter tensor and three counts) in one small all-reduce when it folds the steps
    since the last log into its statistics. Where the hook is registered it runs on every device
    type, gloo on CPU included (Lightning registers hooks only on CUDA); the gradients are
    reduced exactly as DDP does (divided by the world size, then summed). A user's
    ``ddp_comm_hook`` still reduces the gradients, and a ``ddp_comm_wrapper`` (e.g. fp16
    compression) wraps the whole hook; without our hook they are registered on every device
    too (a wrapper alone wraps torch's default all-reduce hook).

    Registered as ``"gnddp"``, ``"gnddp_spawn"``, ``"gnddp_fork"``, ``"gnddp_notebook"`` and their
    ``_find_unused_parameters_{true,false}`` variants in both Lightning namespaces.

    Examples:
        >>> import lightning_gradnoise  # registers "gnddp"
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(accelerator="cpu", devices=2, strategy="gnddp",
        ...                   callbacks=[lightning_gradnoise.GradNoiseMonitor()])  # doctest: +SKIP
    """


def _destroy_at_exit() -> None:
    """Destroy the default process group when the interpreter exits, once per process.

    Lightning does so for NCCL only; a gloo group left to interpreter shutdown sometimes aborts
    the process after a successful fit ("terminate called without an active exception": 1 in 12
    to 16 two-process CPU fits here, plain ``ddp`` alike; none in 24 with this)."""
    atexit.unregister(destroy_process_group)  # registered once however many fits set up
    atexit.register(destroy_process_group)


def _known_arguments(base: type) -> set[str]:
    """What ``DDPStrategy(**kwargs)`` accepts: its own arguments and, passed on, DDP's."""
    from torch.nn.parallel import DistributedDataParallel

    return set(inspect.signature(base.__init__).parameters) | set(inspect.signature(DistributedDataParallel.__init__).parameters)


def _make(ns: ModuleType) -> type:
    base = ns.strategies.DDPStrategy

    class _GradNoiseDDPStrategy(base):  # type: ignore[misc, valid-type]
        __doc__ = _DOC

        def __init__(self, *args: Any, moments_hook: str = "auto", **kwargs: Any) -> None:
            check_choice("moments_hook", moments_hook, _HOOK_CHOICES)
            unknown = sorted(set(kwargs) - _known_arguments(base))
            if unknown:
                raise TypeError(f"{unknown[0]}={kwargs[unknown[0]]!r} is invalid: expected an argument of Lightning's "
                                "DDPStrategy or of torch's DistributedDataParallel")
            super().__init__(*args, **kwargs)
            self.moments_hook = moments_hook
            self.gradnoise = GradNoiseCommState()

        def check_supported(self) -> None:
            """Raise :class:`MisconfigurationError` for settings whose reduction is not DDP's."""
            import torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook as post_local_sgd

            if self._model_averaging_period is not None or isinstance(self._ddp_comm_state, post_local_sgd.PostLocalSGDState):
                raise MisconfigurationError(
                    "strategy='gnddp' does not support post-local SGD model averaging: devices then train apart "
                    "and no step has one global gradient to measure. Use strategy='ddp' without the monitor, or drop "
                    "model_averaging_period / PostLocalSGDState."
                )

        def setup_distributed(self) -> None:
            super().setup_distributed()
            _destroy_at_exit()

        def setup(self, trainer: Any) -> None:
            self.check_supported()
            super().setup(trainer)

        def _register_ddp_hooks(self) -> None:
            # Lightning registers communication hooks on CUDA only; these run on every device.
            state = self.gradnoise
            state.process_group = self._ddp_kwargs.get("process_group")
            state.registered = self.moments_hook == "always" or state.pack_requested or gradient_as_bucket_view(self)
            if state.registered:
                state.inner_hook, state.inner_state = self._ddp_comm_hook, self._ddp_comm_state
                hook, hook_state = gradnoise_comm_hook, state
            elif self._ddp_comm_hook is not None:
                hook, hook_state = self._ddp_comm_hook, self._ddp_comm_state
            elif self._ddp_comm_wrapper is not None:
                hook, hook_state = default_hooks.allreduce_hook, state.process_group
            else:
                return  # DDP's built-in all-reduce
            if self._ddp_comm_wrapper is not None:
                hook = self._ddp_comm_wrapper(hook)
            self.model.register_comm_hook(hook_state, hook)

        @classmethod
        def register_strategies(cls, strategy_registry: Any) -> None:
            for name, start in _START_METHODS:
                strategy_registry.register(
                    name, cls, description=f"DDP with gradient-noise moments, start_method '{start}'",
                    start_method=start, override=True,
                )
                for flag in (False, True):
                    strategy_registry.register(
                        f"{name}_find_unused_parameters_{str(flag).lower()}", cls,
                        description=f"DDP with gradient-noise moments, find_unused_parameters={flag}, start_method '{start}'",
                        start_method=start, find_unused_parameters=flag, override=True,
                    )

    _GradNoiseDDPStrategy.__name__ = _GradNoiseDDPStrategy.__qualname__ = "GradNoiseDDPStrategy"
    _GradNoiseDDPStrategy.__module__ = __name__
    return _GradNoiseDDPStrategy


_TWINS: dict[str, type] = {name: _make(mod) for name, mod in NAMESPACES.items()}


def strategy_class(namespace: str) -> type:
    """The strategy class of one Lightning namespace (``"lightning.pytorch"`` or ``"pytorch_lightning"``)."""
    try:
        return _TWINS[namespace]
    except KeyError:
        raise ValueError(f"namespace={namespace!r} is not installed; installed: {sorted(_TWINS)}") from None


def _namespace_of(obj: Any) -> str | None:
    for name, mod in NAMESPACES.items():
        if isinstance(obj, mod.accelerators.Accelerator):
            return name
    return None


class GradNoiseDDPStrategy(*_TWINS.values()):  # type: ignore[misc]
    __doc__ = _DOC + """
    One object serves either Trainer: it is an instance of both namespaces' ``DDPStrategy`` until
    the Trainer hands it its accelerator, and then becomes, constructed anew from the same
    arguments, the strategy class of that Trainer's namespace (:func:`strategy_class`).
    """

    def __init__(self, *args: Any, moments_hook: str = "auto", **kwargs: Any) -> None:
        kwargs["moments_hook"] = moments_hook
        self._gradnoise_init = (args, kwargs)
        next(iter(_TWINS.values())).__init__(self, *args, **kwargs)

    @property
    def accelerator(self) -> Any:
        return self._accelerator

    @accelerator.setter
    def accelerator(self, accelerator: Any) -> None:
        twin = _TWINS.get(_namespace_of(accelerator) or "")
        if twin is not None and type(self) is not twin:
            args, kwargs = self.__dict__.pop("_gradnoise_init")
            self.__class__ = twin
            self.__dict__.clear()
            twin.__init__(self, *args, **kwargs)
        self._accelerator = accelerator


def register_strategies() -> None:
    """Register every name of :data:`STRATEGY_NAMES` in each installed namespace's registry."""
    for name, mod in NAMESPACES.items():
        _TWINS[name].register_strategies(mod.strategies.StrategyRegistry)
