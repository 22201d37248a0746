"""VRMoments: hands the VR optimizers the elementwise gradient moments of every step."""

from __future__ import annotations

import warnings
from typing import Any

from lightning_gradnoise.callbacks._monitor import GradNoiseMonitor, MisconfigurationError
from lightning_gradnoise.stats import SMALL_K

__all__ = ["VRMoments"]


class VRMoments(GradNoiseMonitor):
    r"""Feeds :math:`\sum_j g_j^2` (elementwise, over the step's k groups) to a VR optimizer
    (``optimizer.set_moments``) before each optimizer step.

    The groups are those of :class:`GradNoiseMonitor`: accumulation micro-batches on one device,
    devices x micro-batches under ``strategy="gnddp"`` (the moments then ride in DDP's own
    all-reduce) or ``"ddp"`` (one extra parameter-sized all-reduce per step). It logs nothing;
    add a :class:`GradNoiseMonitor` for that.

    Examples:
        >>> from lightning_gradnoise.optim import create_optimizer
        >>> # in configure_optimizers: return create_optimizer("vr_adam", self, lr=1e-3)
        >>> # Trainer(accumulate_grad_batches=4, callbacks=[VRMoments()])
    """

    def __init__(self, loss_reduction: str = "mean", batch_size_fn: Any = None) -> None:
        super().__init__(statistics=("gsnr",), log_every_n_steps=1, loss_reduction=loss_reduction, batch_size_fn=batch_size_fn,
                         capture="groups")
        self.log_results = False

    _moments_only = True

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        missing = [type(o).__name__ for o in trainer.optimizers if not hasattr(o, "set_moments")]
        if missing:
            raise MisconfigurationError(
                f"VRMoments feeds VR optimizers, but {missing} has no set_moments(); use create_optimizer('vr_adam', ...) "
                "(or another vr_* name) in configure_optimizers, or drop the VRMoments callback."
            )
        k = trainer.world_size * trainer.accumulate_grad_batches
        if k < SMALL_K and trainer.is_global_zero:
            warnings.warn(
                f"VR optimizers with k = {k} gradient groups per step ({trainer.world_size} device(s) x "
                f"accumulate_grad_batches={trainer.accumulate_grad_batches}): each element's variance has only "
                f"{k - 1} degree(s) of freedom, so its GSNR is mostly noise. Below {SMALL_K} groups each layer's "
                "ratios are divided by their median instead of their mean (VRGD uses k >= 8); for the paper's "
                f"algorithm use {SMALL_K}+ groups (more devices or accumulation micro-batches).",
                UserWarning,
                stacklevel=2,
            )
        super().on_train_start(trainer, pl_module)

    def consume_step(self, trainer: Any, optimizer: Any) -> None:
        assert self.tracker is not None
        moments = self.tracker.last_elementwise
        target = getattr(optimizer, "optimizer", optimizer)  # Lightning wraps optimizers
        if moments is None:
            # a skipped step (non-finite gradients, decided on the reduced gradient, so on every
            # rank alike; or an empty micro-batch): the optimizer skips it too, as the monitor does
            target.skip_step()
            return
        sq_sums, k = moments
        by_id = {id(p): s for p, s in zip(self.tracker.collector.params, sq_sums)}
        ordered = [by_id[id(p)] for p in target.params_in_order()]
        target.set_moments(ordered, k)

    def state_dict(self) -> dict[str, Any]:
        return {}  # the GSNR momentum lives in the optimizer's own state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return None
