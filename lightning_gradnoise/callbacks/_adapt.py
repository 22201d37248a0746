"""Auto-tuning of the batch size: toward the GR_S band (and what both adapters share).

Both read :class:`GradNoiseMonitor`'s values (identical on every rank) and take their decisions in
the plain controllers of :mod:`lightning_gradnoise.control`; these classes only apply them.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from lightning_utilities.core.rank_zero import rank_zero_warn

from lightning_gradnoise._validate import check_choice, check_int, check_number, check_optional, fail
from lightning_gradnoise.callbacks._compat import CallbackBase, namespace_of
from lightning_gradnoise.callbacks._logging import log_scalars
from lightning_gradnoise.callbacks._monitor import GradNoiseMonitor, MisconfigurationError
from lightning_gradnoise.control import BatchSizeController, lr_rule_for
from lightning_gradnoise.scaling import lr_scale_factor

__all__ = ["BatchSizeAdapter", "scale_learning_rate"]

_GROUP_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")


def scale_learning_rate(optimizer: Any, schedulers: list[Any], factor: float) -> None:
    """Multiply the learning rate by ``factor`` so that schedulers keep it.

    The current ``lr`` of every group and the values schedulers compute from (``initial_lr``,
    ``max_lr``, ``min_lr`` in the groups, ``base_lrs`` of each scheduler) are scaled alike:
    chainable schedulers (``StepLR``, ``ExponentialLR``) continue from the scaled ``lr``, closed-form
    ones (``LambdaLR``, ``OneCycleLR``, ...) recompute from the scaled bases, so the schedule's
    shape is kept and the scale is not wiped out.

    Args:
        optimizer: a torch optimizer.
        schedulers: the learning-rate schedulers of that optimizer (a list, maybe empty).
        factor: a finite number > 0.
    """
    if not hasattr(optimizer, "param_groups"):
        fail("optimizer", optimizer, "a torch optimizer (with param_groups)", TypeError)
    if isinstance(schedulers, (str, bytes)) or not isinstance(schedulers, (list, tuple)):
        fail("schedulers", schedulers, "a list of learning-rate schedulers (maybe empty)", TypeError)
    factor = check_number("factor", factor, low=0, low_open=True)
    for group in optimizer.param_groups:
        for key in _GROUP_KEYS:
            if isinstance(group.get(key), (int, float)):
                group[key] = group[key] * factor
    for sched in schedulers:
        if hasattr(sched, "base_lrs"):
            sched.base_lrs = [b * factor for b in sched.base_lrs]
        if hasattr(sched, "_last_lr"):
            sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]


def _monitor(trainer: Any, needs: str, who: str) -> GradNoiseMonitor:
    for cb in trainer.callbacks:
        if type(cb) is GradNoiseMonitor and needs in cb.statistics:  # not VRMoments, its subclass
            return cb
    raise MisconfigurationError(
        f"{who} steers by {needs.upper()}: add GradNoiseMonitor(statistics=(..., '{needs}')) to the Trainer's callbacks"
    )


def _lr_scales(trainer: Any) -> dict[str, float]:
    """What the adapters multiply the schedule's learning rate by: ``gradnoise/lr_scale`` is the
    factor actually applied (the product), the others each adapter's own part."""
    parts = {f"gradnoise/lr_scale/{'batch' if isinstance(cb, BatchSizeAdapter) else cb.rule}": cb.lr_scale
             for cb in trainer.callbacks if isinstance(cb, BatchSizeAdapter) or _is_lr_adapter(cb)}
    return {"gradnoise/lr_scale": math.prod(parts.values()), **parts}


def _is_lr_adapter(callback: Any) -> bool:
    from lightning_gradnoise.callbacks._lr import LRAdapter  # its module imports this one

    return isinstance(callback, LRAdapter)


def _log_text(trainer: Any, reason: str) -> None:
    """A decision's reason as text where the logger takes text (TensorBoard, W&B)."""
    for logger in trainer.loggers:
        kind = type(logger).__name__
        if kind == "TensorBoardLogger":
            logger.experiment.add_text("gradnoise/decisions", reason, trainer.global_step)
        elif kind == "WandbLogger":
            logger.experiment.log({"gradnoise/decisions": reason, "trainer/global_step": trainer.global_step})


def _schedulers(trainer: Any) -> list[Any]:
    return [cfg.scheduler for cfg in trainer.lr_scheduler_configs]


class BatchSizeAdapter(CallbackBase):
    r"""Changes the global batch during training to keep :math:`GR_S` in ``band``.

    The batch grows and shrinks through ``accumulate_grad_batches`` (powers of two), so the
    micro-batch, and the memory it takes, never changes and every sample of an epoch is still
    used once. Changes happen at optimizer-step boundaries, mid-epoch too, once the accumulation
    windows line up. On each change the learning rate is rescaled by
    :math:`\epsilon_\text{opt}(B_2)/\epsilon_\text{opt}(B_1)` at :math:`B_\text{noise} = B_\text{simple}`
    (McCandlish Eq. 2.7 for SGD-style optimizers, the surge rule for Adam-style ones; ``lr_rule``
    overrides the detection). Needs a :class:`GradNoiseMonitor` measuring ``gr_s``.

    Args:
        min_batch: lower bound on the global batch (default: the smallest batch the monitor can
            still measure). On one device the batch never goes below two micro-batches, whatever
            ``min_batch`` says (a bound raised to that floor is warned about): with one, there is
            no second gradient group and :math:`B_\text{simple}` would stop updating.
        max_batch: upper bound on the global batch (default: 1024 micro-batches per device).
        band: the :math:`GR_S` band to keep, ``(low, high)`` with ``0 < low < high < 1``.
        hysteresis: how far outside the band :math:`GR_S` must be before the batch moves.
        cooldown: optimizer steps to wait after a change.
        lr_rule: ``"auto"``, ``"sgd"``, ``"adam"``, or ``None`` to leave the learning rate alone.
        max_factor: the most the batch may grow or shrink per decision (a power of two); see
            :class:`~lightning_gradnoise.control.BatchSizeController`.
    """

    def __init__(
        self,
        min_batch: Optional[int] = None,
        max_batch: Optional[int] = None,
        band: tuple[float, float] = (0.5, 0.65),
        hysteresis: float = 0.02,
        cooldown: int = 50,
        lr_rule: Optional[str] = "auto",
        max_factor: int = 2,
    ) -> None:
        check_choice("lr_rule", lr_rule, ("auto", "sgd", "adam", None))
        min_batch = check_optional(check_int, "min_batch", min_batch, low=1)
        max_batch = check_optional(check_int, "max_batch", max_batch, low=1)
        if min_batch is not None and max_batch is not None and min_batch > max_batch:
            raise ValueError(f"min_batch={min_batch!r} is above max_batch={max_batch!r}: expected min_batch <= max_batch")
        BatchSizeController(unit=1, min_batch=1, max_batch=1, band=band, hysteresis=hysteresis, cooldown=cooldown, max_factor=max_factor)
        self.min_batch, self.max_batch, self.max_factor = min_batch, max_batch, max_factor
        self.band, self.hysteresis, self.cooldown, self.lr_rule = tuple(band), hysteresis, cooldown, lr_rule
        self.controller: Optional[BatchSizeController] = None
        self.pending: Optional[int] = None
        self.accumulate: Optional[int] = None
        self.lr_scale = 1.0
        self.decisions: list[tuple[int, str]] = []
        self._seen: Any = None
        self._restored: Optional[dict] = None
        self.lr_adapter: Any = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self.monitor = _monitor(trainer, "gr_s", "BatchSizeAdapter")
        self.lr_adapter = next((cb for cb in trainer.callbacks if _is_lr_adapter(cb)), None)
        ns = namespace_of(trainer)
        if not isinstance(trainer.strategy, (ns.strategies.DDPStrategy, ns.strategies.SingleDeviceStrategy)):
            raise MisconfigurationError(
                f"BatchSizeAdapter changes accumulate_grad_batches, which {type(trainer.strategy).__name__} does not "
                "support mid-run: use a single device, strategy='ddp' or strategy='gnddp'."
            )
        k = trainer.accumulate_grad_batches
        if k & (k - 1):
            raise MisconfigurationError(f"BatchSizeAdapter needs accumulate_grad_batches to be a power of two, got {k}")

    @property
    def last_change(self) -> int:
        """The optimizer step of the last batch decision (0: none yet), restored ones included."""
        if self.controller is not None:
            return self.controller.last_change
        return int(self._restored["controller"]["last_change"]) if self._restored else 0

    def batch_bounds(self, micro: int, world_size: int) -> tuple[int, int, int]:
        r"""``(unit, min_batch, max_batch)`` for this micro-batch and number of devices.

        The floor keeps at least two gradient groups per step (two micro-batches on one device),
        the least the monitor needs to keep measuring :math:`B_\text{simple}`."""
        unit = micro * world_size
        floor = unit * 2 if world_size == 1 else unit
        return unit, max(self.min_batch or floor, floor), max(self.max_batch or unit * 1024, floor)

    def _ensure_controller(self, trainer: Any, micro: int) -> BatchSizeController:
        if self.controller is None:
            unit, min_batch, max_batch = self.batch_bounds(micro, trainer.world_size)
            raised = [f"{name}={asked} to {used}" for name, asked, used in
                      (("min_batch", self.min_batch, min_batch), ("max_batch", self.max_batch, max_batch)) if asked is not None and asked < used]
            if raised:
                rank_zero_warn(
                    f"BatchSizeAdapter raised {' and '.join(raised)}: with a micro-batch of {micro} on "
                    f"{trainer.world_size} device(s), a smaller batch leaves fewer than two gradient groups per step "
                    "and B_simple would stop updating. Use a smaller micro-batch to allow smaller batches."
                )
            self.controller = BatchSizeController(
                unit=unit,
                min_batch=min_batch,
                max_batch=max_batch,
                band=self.band,
                hysteresis=self.hysteresis,
                cooldown=self.cooldown,
                max_factor=self.max_factor,
            )
            if self._restored:
                self.controller.load_state_dict(self._restored["controller"])
        return self.controller

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.accumulate is not None:  # resumed: the batch this run had reached
            trainer.accumulate_grad_batches = self.accumulate
        self.accumulate = trainer.accumulate_grad_batches
        if self.lr_rule == "auto":
            self.rule = lr_rule_for(getattr(trainer.optimizers[0], "optimizer", trainer.optimizers[0]))
        else:
            self.rule = self.lr_rule

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        k = trainer.accumulate_grad_batches
        if (batch_idx + 1) % k != 0:
            return  # not an optimizer-step boundary
        latest = self.monitor.latest
        lr_moved = self.lr_adapter is not None and self.lr_adapter.controller.last_change == trainer.global_step > 0
        # the rate first: one adapter moves per step, and the batch waits while the rate is being corrected
        lr_settled = self.lr_adapter is None or self.lr_adapter.settled
        if latest is not self._seen and "gr_s" in latest and not lr_moved and lr_settled:
            self._seen = latest
            controller = self._ensure_controller(trainer, self.monitor._micro_size or 1)
            batch = controller.unit * k
            # GR_S at the configured batch: the measured step may have been an epoch's short last window
            interval = (latest["b_simple_lo"], latest["b_simple_hi"]) if "b_simple_lo" in latest else None
            # a rate too large makes gradients oscillate, which reads as a batch past its critical size
            may_shrink = self.lr_adapter is None or self.lr_adapter.loss_falls
            decision = controller.decide_from_noise_scale(latest.get("b_simple"), batch, trainer.global_step, interval, may_shrink)
            # every rank holds the same all-reduced values; rank 0's word settles it regardless
            new_batch, changed, reason = trainer.strategy.broadcast((decision.value, decision.changed, decision.reason))
            if changed:
                self.pending = int(round(new_batch / controller.unit))
                self._announce(trainer, reason, new_batch)
        if self.pending is not None and (batch_idx + 1) % self.pending == 0:
            self._apply(trainer, k, self.pending)

    def _apply(self, trainer: Any, old_k: int, new_k: int) -> None:
        self.pending = None
        if new_k == old_k:
            return
        unit = self.controller.unit
        if self.rule is not None:
            b_noise = self.monitor.latest.get("b_simple", float("nan"))
            if b_noise > 0:
                factor = float(lr_scale_factor(self.rule, unit * old_k, unit * new_k, b_noise))
                for opt in trainer.optimizers:
                    scale_learning_rate(opt, _schedulers(trainer), factor)
                self.lr_scale *= factor
        trainer.accumulate_grad_batches = new_k
        self.accumulate = new_k
        if trainer.is_global_zero:
            log_scalars(trainer.loggers, {"gradnoise/batch_target": float(unit * new_k), **_lr_scales(trainer)}, trainer.global_step)

    def _announce(self, trainer: Any, reason: str, new_batch: float) -> None:
        self.decisions.append((trainer.global_step, reason))
        if trainer.is_global_zero:
            log_scalars(trainer.loggers, {"gradnoise/decision/batch_size": float(new_batch)}, trainer.global_step)
            _log_text(trainer, reason)

    def state_dict(self) -> dict[str, Any]:
        return {
            "controller": self.controller.state_dict() if self.controller else {"last_change": 0},
            "pending": self.pending,
            "accumulate": self.accumulate,
            "lr_scale": self.lr_scale,
            "decisions": list(self.decisions),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict
        self.pending = state_dict["pending"]
        self.accumulate = state_dict["accumulate"]
        self.lr_scale = state_dict["lr_scale"]
        self.decisions = [tuple(d) for d in state_dict["decisions"]]
        if self.controller is not None:
            self.controller.load_state_dict(state_dict["controller"])
