"""Auto-tuning callbacks: batch size toward the GR_S band, learning rate by a line search along the step (or GR_T).

Both read :class:`GradNoiseMonitor`'s values (identical on every rank) and take their decisions in
the plain controllers of :mod:`lightning_gradnoise.control`; these classes only apply them.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn

from lightning_gradnoise._validate import check_choice, check_int, check_number, check_optional, fail
from lightning_gradnoise.callbacks._compat import CallbackBase, namespace_of
from lightning_gradnoise.callbacks._logging import log_scalars
from lightning_gradnoise.callbacks._monitor import GradNoiseMonitor, MisconfigurationError, _sharded
from lightning_gradnoise.capture import StepProbe
from lightning_gradnoise.control import BatchSizeController, LRController, StepSizeController, lr_rule_for, noise_coupling
from lightning_gradnoise.scaling import lr_scale_factor
from lightning_gradnoise.stats import LossTrend, StepSizeRatio

__all__ = ["BatchSizeAdapter", "LRAdapter", "scale_learning_rate"]

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
             for cb in trainer.callbacks if isinstance(cb, (BatchSizeAdapter, LRAdapter))}
    return {"gradnoise/lr_scale": math.prod(parts.values()), **parts}


def _log_text(trainer: Any, reason: str) -> None:
    """A decision's reason as text where the logger takes text (TensorBoard, W&B)."""
    for logger in trainer.loggers:
        kind = type(logger).__name__
        if kind == "TensorBoardLogger":
            logger.experiment.add_text("gradnoise/decisions", reason, trainer.global_step)
        elif kind == "WandbLogger":
            logger.experiment.log({"gradnoise/decisions": reason, "trainer/global_step": trainer.global_step})


def _dataset_size(trainer: Any) -> Optional[int]:
    """How many examples an epoch draws from, when the training data is a sized map-style
    dataset sampled without replacement (``None`` otherwise: an iterable stream, a sampler with
    replacement)."""
    from torch.utils.data import IterableDataset, RandomSampler

    loader = getattr(trainer, "train_dataloader", None)
    dataset = getattr(loader, "dataset", None)
    if dataset is None or isinstance(dataset, IterableDataset):
        return None
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, RandomSampler) and sampler.replacement:
        return None
    try:
        return int(len(dataset))
    except TypeError:
        return None


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
        self.lr_adapter: Optional[LRAdapter] = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self.monitor = _monitor(trainer, "gr_s", "BatchSizeAdapter")
        self.lr_adapter = next((cb for cb in trainer.callbacks if isinstance(cb, LRAdapter)), None)
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
        if latest is not self._seen and "gr_s" in latest and not lr_moved:  # one adapter moves per step
            self._seen = latest
            controller = self._ensure_controller(trainer, self.monitor._micro_size or 1)
            batch = controller.unit * k
            # GR_S at the configured batch: the measured step may have been an epoch's short last window
            interval = (latest["b_simple_lo"], latest["b_simple_hi"]) if "b_simple_lo" in latest else None
            decision = controller.decide_from_noise_scale(latest.get("b_simple"), batch, trainer.global_step, interval)
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


class LRAdapter(CallbackBase):
    r"""Moves the learning rate during training, by one of two rules.

    ``rule="line_search"`` (the default): a noise-corrected line search along the optimizer's own
    step. After each step it measures how the loss curves along that step, from the step's dot
    products with the gradient that made it and the gradient after it, with the noise of the
    step's own batch removed (:class:`~lightning_gradnoise.stats.StepSizeRatio`, the noise from
    the monitor's :math:`B_\text{simple}`). The ratio :math:`r` says how many times longer the best
    step along that direction would be; the rate moves when :math:`r`'s interval lies wholly
    outside ``band`` (:class:`~lightning_gradnoise.control.StepSizeController`), and the
    measurement starts afresh after every change. Works with ``torch.optim`` SGD (with or
    without momentum), Adam and AdamW, and needs a :class:`GradNoiseMonitor` measuring
    ``b_simple``.

    ``rule="gr_t"``: the GR-Gauge card's rule, :math:`GR_T` toward ``target`` (Theorem 1: GR_T
    rises with the learning rate), in bounded multiplicative steps
    :math:`(\text{target}/GR_T)^\text{gain}` capped at ``step_factor``, with a cooldown
    (:class:`~lightning_gradnoise.control.LRController`). Needs a monitor measuring ``gr_t`` (and
    ``b_simple`` for ``target="auto"``). In the noise-dominated regime :math:`GR_T` sits near its
    noise ceiling whatever the rate, and holding it at 20 lowers the rate as a run goes on (see the
    auto-tuning benchmark).

    Both compose with LR schedulers (:func:`scale_learning_rate`) and with
    :class:`BatchSizeAdapter`: after a batch change (which rescales the learning rate itself) the
    measurement starts afresh, and the two never move in the same step. Every decision is kept in
    ``decisions`` as ``(step, reason)``, the reason naming the reading and the interval it acted
    on, and logged (``gradnoise/decision/lr_scale``; the reason as text on TensorBoard).

    Args:
        rule: ``"line_search"`` or ``"gr_t"``.
        band: line search: the band of :math:`r` left alone, ``(low, high)`` with ``low < 1 < high``.
        min_pairs: line search: step pairs to measure at a rate before moving it.
        decay: line search: the EMA decay of :math:`r`'s means.
        target, tolerance, cooldown: ``gr_t`` only (see :class:`~lightning_gradnoise.control.LRController`).
        step_factor: the most one decision multiplies the rate by (default 1.5; for ``gr_t``,
            divides by too).
        shrink_factor: line search: the most one decision divides the rate by.
        gain: the power of the move (default 1 for the line search, 0.5 for ``gr_t``).
        min_scale, max_scale: bounds on the product of all moves.
    """

    def __init__(self, rule: str = "line_search", target: float | str = 20.0, tolerance: float = 1.5,
                 step_factor: Optional[float] = None, cooldown: int = 50, min_scale: float = 1e-3, max_scale: float = 1e3,
                 gain: Optional[float] = None, band: tuple[float, float] = (0.7, 2.0), min_pairs: int = 10, decay: float = 0.9,
                 shrink_factor: float = 2.0) -> None:
        self.rule = check_choice("rule", rule, ("line_search", "gr_t"))
        step_factor = check_optional(check_number, "step_factor", step_factor, low=1, low_open=True)
        gain = check_optional(check_number, "gain", gain, low=0, low_open=True)
        # both built, so that every argument is checked whichever rule is chosen
        by_gr_t = LRController(target=target, tolerance=tolerance, step_factor=step_factor or 1.5, cooldown=cooldown,
                               min_scale=min_scale, max_scale=max_scale, gain=gain or 0.5)
        by_line_search = StepSizeController(band=band, step_factor=step_factor or 1.5, shrink_factor=shrink_factor, gain=gain or 1.0, min_pairs=min_pairs,
                                            min_scale=min_scale, max_scale=max_scale)
        self.controller: Any = by_gr_t if self.rule == "gr_t" else by_line_search
        self.ratio = StepSizeRatio(decay)
        self.trend = LossTrend(window=200)
        self._step_loss: list[torch.Tensor] = []
        self._step_examples = 0
        self._dataset_size: Optional[int] = None
        self.lr_scale = 1.0
        self.decisions: list[tuple[int, str]] = []
        self._seen: Any = None
        self.batch_adapter: Optional[BatchSizeAdapter] = None
        self.probe: Optional[StepProbe] = None
        self._pending: Optional[tuple[float, float]] = None
        self._stepped = False
        self._accumulate: Optional[int] = None
        self._probe_state: Optional[dict] = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if self.rule == "gr_t":
            self.monitor = _monitor(trainer, "gr_t", "LRAdapter")
            if self.controller.target == "auto" and "b_simple" not in self.monitor.statistics:
                raise MisconfigurationError(
                    "LRAdapter(target='auto') sets GR_T's target from B_simple: measure it too, "
                    "GradNoiseMonitor(statistics=('b_simple', 'gr_t', ...)), or give a number as target"
                )
            self.controller.beta = self.monitor.gr_t_beta
        else:
            self.monitor = _monitor(trainer, "b_simple", "LRAdapter(rule='line_search')")
            if _sharded(trainer):
                raise MisconfigurationError(
                    "LRAdapter(rule='line_search') reads whole gradients and parameters, which sharded training "
                    "does not hold on one device: train with a single device or (gn)ddp to adapt the learning rate"
                )
        self.batch_adapter = next((cb for cb in trainer.callbacks if isinstance(cb, BatchSizeAdapter)), None)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.rule != "line_search":
            return
        optimizer = getattr(trainer.optimizers[0], "optimizer", trainer.optimizers[0])
        if len(trainer.optimizers) != 1:
            raise MisconfigurationError("LRAdapter(rule='line_search') steers one optimizer: use rule='gr_t' with several")
        try:
            noise_coupling(optimizer, [])
        except ValueError as err:
            raise MisconfigurationError(str(err)) from None
        self.probe = StepProbe(pl_module)
        self._dataset_size = _dataset_size(trainer)
        if self._probe_state is not None:
            self.probe.load_state_dict(self._probe_state)
            self._probe_state = None
        if self._accumulate is None:
            self._accumulate = trainer.accumulate_grad_batches

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.probe is None:
            return
        following = self.probe.before_step()
        if trainer.accumulate_grad_batches != self._accumulate:
            # a new batch, its learning rate rescaled by BatchSizeAdapter: measure afresh (keeping
            # the pairs before it made the learning rate overshoot after batch changes)
            self._accumulate = trainer.accumulate_grad_batches
            self.ratio.reset()
            self.trend.reset()
            self._pending = None
        if following is not None and self._pending is not None:
            self.ratio.update(self._pending[0], following, self._pending[1])
        self._pending = None
        self._stepped = True

    def _noise_per_batch(self, examples: int) -> float:
        r""":math:`\mathrm{tr}(\Sigma)/B` for the step just taken, :math:`B` = ``examples`` (all
        ranks), times :math:`(N - B)/(N - 1)` for a dataset of :math:`N` examples drawn without
        replacement (a batch that is a third of the data has a third less noise). The per-example
        trace comes from the monitor's latest reading, which does not depend on the batch (the
        reading's own batch may be a few steps stale after a batch change). NaN before the first
        reading."""
        trace = self.monitor.latest.get("trace_cov", math.nan)
        if not (examples > 0 and math.isfinite(trace)):
            return math.nan
        noise = max(trace, 0.0) / examples
        n = self._dataset_size
        return noise * (n - examples) / (n - 1) if n and n > examples else noise

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.rule == "gr_t":
            self._gr_t_step(trainer)
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._step_loss.append(loss.detach())
        self._step_examples += int(self.monitor._micro_size or 0)
        if not self._stepped or self.probe is None:
            return
        self._stepped = False
        if self._step_loss:
            self.trend.update(trainer.global_step, float(torch.stack(self._step_loss).sum()))
        examples, self._step_loss, self._step_examples = self._step_examples * trainer.world_size, [], 0
        optimizer = getattr(trainer.optimizers[0], "optimizer", trainer.optimizers[0])
        measured = self.probe.after_step(noise_coupling(optimizer, self.probe.params))
        noise = self._noise_per_batch(examples)
        if measured is not None and math.isfinite(noise) and measured[2] > 0:
            own, jg2, g2 = measured
            # E[step . noise] = sum_i J_i sigma_i^2 / B, with the noise spread over the elements like
            # the gradient's energy: tr(Sigma)/B * sum J g^2 / |g|^2 (exact for SGD, where J is one number)
            self._pending = (own, noise * jg2 / g2)
        pairs, every = self.ratio.count, self.controller.min_pairs
        logging = self.monitor.latest is not self._seen
        testing = pairs >= every and pairs % every == 0  # the rule tests its reading once per min_pairs pairs
        if not (logging or testing):
            return
        reading = self.ratio.reading(self.monitor.level)
        if logging:
            self._seen = self.monitor.latest
            if trainer.is_global_zero:
                log_scalars(trainer.loggers, {f"gradnoise/{k}": v for k, v in reading.items()}, trainer.global_step)
        if not testing:
            return
        batch_adapter = self.batch_adapter
        if batch_adapter is not None and batch_adapter.last_change == trainer.global_step > 0:
            return  # one adapter moves per step
        interval = (reading["lr_ratio_lo"], reading["lr_ratio_hi"])
        slope = self._loss_slope(trainer)
        decision = self.controller.decide(reading["lr_ratio"], interval, self.lr_scale, trainer.global_step, pairs, slope)
        if decision.changed:
            self._apply(trainer, decision.value, decision.reason)
            self.ratio.reset()
            self.trend.reset()
            self._pending = None

    def _loss_slope(self, trainer: Any) -> Optional[tuple[float, float]]:
        """The interval of the loss's slope since the last change, from every rank's losses
        (each rank sees only its own batches; every rank tests at the same step, since the ratio
        comes from all-reduced gradients). ``None`` with fewer than ``2 * min_pairs`` steps."""
        if len(self.trend.losses) < 2 * self.controller.min_pairs:
            return None
        trend = self.trend
        if trainer.world_size > 1:
            losses = trainer.strategy.reduce(torch.tensor(self.trend.losses, dtype=torch.float64), reduce_op="mean")
            trend = LossTrend(self.trend.window)
            for step, value in zip(self.trend.steps, losses.tolist()):
                trend.update(step, value)
        return trend.slope_interval(self.monitor.level)

    def _gr_t_step(self, trainer: Any) -> None:
        latest = self.monitor.latest
        if latest is self._seen or "gr_t" not in latest:
            return
        self._seen = latest
        batch = self.batch_adapter
        if batch is not None and batch.last_change > 0 and trainer.global_step - batch.last_change < self.controller.cooldown:
            return  # GR_T's EMAs still span the batch before the change: wait a cooldown
        b_simple, batch_size = latest.get("b_simple", math.nan), latest.get("batch_size") or math.nan
        # a negative B_simple is |G|^2 not yet resolved from zero: no ratio to set a target from
        mu_over_b = b_simple / batch_size if b_simple >= 0 and batch_size > 0 else math.nan
        age = self.monitor.tracker.temporal.count if self.monitor.tracker is not None else None
        interval = (latest["gr_t_lo"], latest["gr_t_hi"]) if "gr_t_lo" in latest else None
        decision = self.controller.decide(latest["gr_t"], self.lr_scale, trainer.global_step, mu_over_b, age, interval)
        new_scale, changed, reason = trainer.strategy.broadcast((decision.value, decision.changed, decision.reason))
        if changed:
            self._apply(trainer, new_scale, reason)

    def _apply(self, trainer: Any, new_scale: float, reason: str) -> None:
        for opt in trainer.optimizers:
            scale_learning_rate(opt, _schedulers(trainer), new_scale / self.lr_scale)
        self.lr_scale = new_scale
        self.decisions.append((trainer.global_step, reason))
        if trainer.is_global_zero:
            log_scalars(trainer.loggers, {"gradnoise/decision/lr_scale": new_scale, **_lr_scales(trainer)}, trainer.global_step)
            _log_text(trainer, reason)

    def state_dict(self) -> dict[str, Any]:
        probe = self.probe.state_dict() if self.probe is not None else self._probe_state
        return {"rule": self.rule, "controller": self.controller.state_dict(), "lr_scale": self.lr_scale,
                "decisions": list(self.decisions), "ratio": self.ratio.state_dict(), "probe": probe,
                "pending": self._pending, "accumulate": self._accumulate, "trend": self.trend.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rule = state_dict.get("rule", "gr_t")
        if rule != self.rule:
            raise ValueError(f"state_dict: saved by LRAdapter(rule={rule!r}), loaded into LRAdapter(rule={self.rule!r})")
        self.controller.load_state_dict(state_dict["controller"])
        self.lr_scale = state_dict["lr_scale"]
        self.decisions = [tuple(d) for d in state_dict["decisions"]]
        if "ratio" in state_dict:
            self.ratio.load_state_dict(state_dict["ratio"])
            self.trend.load_state_dict(state_dict["trend"])
            self._pending = None if state_dict["pending"] is None else tuple(state_dict["pending"])
            self._accumulate = state_dict["accumulate"]
            if self.probe is not None and state_dict["probe"] is not None:
                self.probe.load_state_dict(state_dict["probe"])
            else:
                self._probe_state = state_dict["probe"]
