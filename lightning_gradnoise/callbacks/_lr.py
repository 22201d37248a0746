"""Auto-tuning of the learning rate: a noise-corrected line search along the optimizer's own step
(the default), or GR_T toward a target (the GR-Gauge card's rule).

Both read :class:`GradNoiseMonitor`'s values and take their decisions in the plain controllers of
:mod:`lightning_gradnoise.control`; this class only measures the step and applies them.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from lightning_gradnoise._validate import check_choice, check_number, check_optional
from lightning_gradnoise.callbacks._adapt import BatchSizeAdapter, _log_text, _lr_scales, _monitor, _schedulers, scale_learning_rate
from lightning_gradnoise.callbacks._compat import CallbackBase
from lightning_gradnoise.callbacks._logging import log_scalars
from lightning_gradnoise.callbacks._monitor import MisconfigurationError, _sharded
from lightning_gradnoise.capture import StepProbe
from lightning_gradnoise.control import LRController, StepSizeController, noise_coupling, step_growth
from lightning_gradnoise.stats import LossTrend, StepSizeRatio

__all__ = ["LRAdapter"]


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



class LRAdapter(CallbackBase):
    r"""Moves the learning rate during training, by one of two rules.

    ``rule="line_search"`` (the default): a noise-corrected line search along the optimizer's own
    step. After each step it measures how the loss curves along that step, from the step's dot
    products with the gradient that made it and the gradient after it, with the noise of the
    step's own batch removed (:class:`~lightning_gradnoise.stats.StepSizeRatio`, the noise from
    the monitor's :math:`B_\text{simple}`). The ratio :math:`r` says how many times longer the best
    step along that direction would be; the rate rises when :math:`r`'s interval lies wholly
    above ``band``, and falls when the training loss rises, or has stopped falling with
    :math:`r` below 1 (:class:`~lightning_gradnoise.control.StepSizeController`), and the
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
        target: ``gr_t`` only: GR_T's target, a number or ``"auto"`` (see
            :class:`~lightning_gradnoise.control.LRController`).
        tolerance: ``gr_t`` only: the factor around the target left alone.
        cooldown: ``gr_t`` only: optimizer steps to wait after a change.
        step_factor: the most one decision multiplies the rate by (default 2 for the line
            search; 1.5 for ``gr_t``, which divides by it too).
        shrink_factor: line search: the most one decision divides the rate by.
        rise_limit: line search: a step's training loss above where the run started, by this
            fraction of it (and five times the first losses' noise), lowers the rate at once as
            divergent (:meth:`~lightning_gradnoise.control.StepSizeController.loss_limit`);
            ``math.inf`` turns it off, for losses that may rise by design.
        gain: the power of the move (default 1 for the line search, 0.5 for ``gr_t``).
        min_scale: lower bound on the product of all moves.
        max_scale: upper bound on the product of all moves.
    """

    def __init__(self, rule: str = "line_search", target: float | str = 20.0, tolerance: float = 1.5,
                 step_factor: Optional[float] = None, cooldown: int = 50, min_scale: float = 1e-3, max_scale: float = 1e3,
                 gain: Optional[float] = None, band: tuple[float, float] = (0.7, 2.0), min_pairs: int = 10, decay: float = 0.9,
                 shrink_factor: float = 2.0, rise_limit: float = 0.1) -> None:
        self.rule = check_choice("rule", rule, ("line_search", "gr_t"))
        step_factor = check_optional(check_number, "step_factor", step_factor, low=1, low_open=True)
        gain = check_optional(check_number, "gain", gain, low=0, low_open=True)
        # both built, so that every argument is checked whichever rule is chosen
        by_gr_t = LRController(target=target, tolerance=tolerance, step_factor=step_factor or 1.5, cooldown=cooldown,
                               min_scale=min_scale, max_scale=max_scale, gain=gain or 0.5)
        by_line_search = StepSizeController(band=band, step_factor=step_factor or 2.0, shrink_factor=shrink_factor, gain=gain or 1.0, min_pairs=min_pairs,
                                            min_scale=min_scale, max_scale=max_scale, rise_limit=rise_limit)
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
        self._falling = False
        self._loss_limit = math.nan
        self._batch_lr = 1.0  # BatchSizeAdapter's learning-rate factor at the last batch change

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
            self._accumulate = trainer.accumulate_grad_batches
            self._batch_changed()
        if following is not None and self._pending is not None:
            own, noise, growth = self._pending
            self.ratio.update(own, following, noise, growth=growth)
        self._pending = None
        self._stepped = True

    def _batch_changed(self) -> None:
        """A new batch, its learning rate rescaled by :class:`BatchSizeAdapter`: measure afresh
        (keeping the pairs before it made the learning rate overshoot after batch changes), and
        test the loss's rise over the first steps only if the change raised the learning rate: a
        change that lowered or kept it cannot have made the rate unstable, and a one-sided 90% test
        on a flat, noisy loss trips one time in ten (the slope since the change is still tested)."""
        self._restart()
        self.controller.last_action = "none"  # not yet tested at this batch
        if self.batch_adapter is None:  # changed by something else: assume the worst
            self.controller.early_rise = True
            return
        batch_lr = self.batch_adapter.lr_scale
        self.controller.early_rise = batch_lr > self._batch_lr * (1 + 1e-9)
        self._batch_lr = batch_lr

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
        step_loss = self._rank_mean(trainer, torch.stack(self._step_loss).sum()) if self._step_loss else math.nan
        self.trend.update(trainer.global_step, step_loss)
        examples, self._step_loss, self._step_examples = self._step_examples * trainer.world_size, [], 0
        optimizer = getattr(trainer.optimizers[0], "optimizer", trainer.optimizers[0])
        measured = self.probe.after_step(noise_coupling(optimizer, self.probe.params))
        noise = self._noise_per_batch(examples)
        if measured is not None and math.isfinite(noise) and measured[2] > 0:
            own, jg2, g2 = measured
            # E[step . noise] = sum_i J_i sigma_i^2 / B, with the noise spread over the elements like
            # the gradient's energy: tr(Sigma)/B * sum J g^2 / |g|^2 (exact for SGD, where J is one number)
            # counted as the step momentum will have built up to (SGD's buffer starts at one gradient)
            self._pending = (own, noise * jg2 / g2, step_growth(optimizer, max(trainer.global_step, 1)))
        if self._diverged(trainer, step_loss):
            return
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
        if not testing or self._batch_moved(trainer):
            return
        interval = (reading["lr_ratio_lo"], reading["lr_ratio_hi"])
        slope, recent, self._falling, peak = self._loss_slopes()
        self._take(trainer, self.controller.decide(reading["lr_ratio"], interval, self.lr_scale, trainer.global_step, pairs, slope,
                                                   recent, peak, self._loss_limit))

    def _batch_moved(self, trainer: Any) -> bool:
        """Whether :class:`BatchSizeAdapter` moved the batch at this step: one adapter moves per step."""
        return self.batch_adapter is not None and self.batch_adapter.last_change == trainer.global_step > 0

    def _take(self, trainer: Any, decision: Any) -> bool:
        """Apply a decision that changed the rate, and measure afresh at the new one."""
        if not decision.changed:
            return False
        self._apply(trainer, decision.value, decision.reason)
        self._restart()
        return True

    def _restart(self) -> None:
        self.ratio.reset()
        self.trend.reset()
        self._pending = None

    @property
    def loss_limit(self) -> float:
        """The training loss above which a step's loss lowers the rate as divergent (line search;
        NaN until ``min_pairs`` steps have been taken): where the run started, plus ``rise_limit`` of it and five times
        its noise (:meth:`~lightning_gradnoise.control.StepSizeController.loss_limit`)."""
        return self._loss_limit

    @property
    def settled(self) -> bool:
        """Whether the rate is where the rule wants it: the latest test held it (line search; the
        ``gr_t`` rule is always settled). :class:`BatchSizeAdapter` moves the batch only then, so
        that a rate still being corrected (an oscillating too-large one reads as a batch past its
        critical size) does not move the batch."""
        return self.rule == "gr_t" or self.controller.last_action == "hold"

    @property
    def loss_falls(self) -> bool:
        """Whether the training loss fell over the last ``2 * min_pairs`` steps at the current rate
        and batch (its slope's interval below zero), at the latest test (line search; always
        ``True`` for ``gr_t``). :class:`BatchSizeAdapter` shrinks the batch only then."""
        return self.rule == "gr_t" or self._falling

    @staticmethod
    def _rank_mean(trainer: Any, loss: torch.Tensor) -> float:
        """A step's training loss averaged over ranks (each sees only its own batches), so that
        every rank keeps the same losses and takes the same decisions: a loss that is not finite on
        one rank is not finite on all. One scalar all-reduce a step, on the ranks' device (NCCL
        reduces no host tensor)."""
        if trainer.world_size == 1:
            return float(loss)
        total = loss.detach().double().reshape(1).to(trainer.strategy.root_device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)  # the strategy's reduce adds a barrier: a second collective a step
        else:
            total = trainer.strategy.reduce(total, reduce_op="sum")
        return float(total) / trainer.world_size

    def _diverged(self, trainer: Any, loss: float) -> bool:
        """The divergence test after every step (:meth:`StepSizeController.diverged`): its limit
        set from the run's first ``min_pairs`` losses; the rate lowered at once, the measurement
        started afresh. ``True`` when it lowered the rate."""
        every = self.controller.min_pairs
        if math.isnan(self._loss_limit) and len(self.trend.losses) >= every:
            self._loss_limit = self.controller.loss_limit(self.trend.losses[:every])
        if math.isnan(loss) or math.isnan(self._loss_limit) or self._batch_moved(trainer):
            return False
        return self._take(trainer, self.controller.diverged(loss, self._loss_limit, self.lr_scale, trainer.global_step,
                                                            len(self.trend.losses)))

    def _loss_slopes(self) -> tuple[Optional[tuple[float, float]], Optional[tuple[float, float]], bool, Optional[float]]:
        """From the losses since the last change (the ranks' mean, step by step): the intervals of
        the loss's slope since the last change (``None`` with fewer than ``2 * min_pairs`` steps)
        and over the last ``min_pairs`` steps (``None`` with fewer), whether it fell over the last
        ``2 * min_pairs`` (``False`` with fewer), and the highest step loss over the last
        ``min_pairs`` steps."""
        trend, every = self.trend, self.controller.min_pairs
        if len(trend.losses) < every:
            return None, None, False, None
        peak = max(trend.losses[-every:])
        level = self.monitor.level
        one_sided = max(2.0 * level - 1.0, 0.5)  # the rule asks only whether the loss rises, or falls
        recent = trend.slope_interval(one_sided, last=every)
        if len(trend.losses) < 2 * every:
            return None, recent, False, peak
        falling = trend.slope_interval(one_sided, last=2 * every)[1] < 0
        return trend.slope_interval(level), recent, falling, peak

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
                "pending": self._pending, "accumulate": self._accumulate, "trend": self.trend.state_dict(),
                "falling": self._falling, "loss_limit": self._loss_limit, "batch_lr": self._batch_lr}

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
            pending = state_dict["pending"]
            self._pending = None if pending is None else (*pending, 1.0)[:3]  # saved without growth: 1
            self._accumulate = state_dict["accumulate"]
            self._falling = bool(state_dict.get("falling", False))
            self._loss_limit = float(state_dict.get("loss_limit", math.nan))
            self._batch_lr = float(state_dict.get("batch_lr", 1.0))
            if self.probe is not None and state_dict["probe"] is not None:
                self.probe.load_state_dict(state_dict["probe"])
            else:
                self._probe_state = state_dict["probe"]
