"""GradNoiseMonitor: the gradient-noise statistics of a Lightning fit, logged as it trains."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable

import torch

from lightning_gradnoise._validate import check_bool, check_callable, check_choice, check_int, check_number, check_optional
from lightning_gradnoise.capture import GradNoiseTracker, needs_groups, parse_statistics
from lightning_gradnoise.callbacks._compat import CallbackBase, extract_batch_size, gradient_as_bucket_view, namespace_of
from lightning_gradnoise.callbacks._logging import log_histograms, log_scalars

__all__ = ["GradNoiseMonitor", "MisconfigurationError"]


def _sharded(trainer: Any) -> bool:
    """Whether the Trainer shards gradients in a way per-example capture measures (FSDP2 through
    ``ModelParallelStrategy``)."""
    mp = getattr(namespace_of(trainer).strategies, "ModelParallelStrategy", None)
    return mp is not None and isinstance(trainer.strategy, mp)


class MisconfigurationError(ValueError):
    """The Trainer is set up in a way the callback cannot measure; the message says how to fix it."""


class GradNoiseMonitor(CallbackBase):
    r"""Logs the gradient noise scale, gradient redundancy and GSNR while a model trains.

    Each optimizer step's batch of :math:`B` samples is split into :math:`k` groups (devices x
    ``accumulate_grad_batches`` micro-batches). From the groups' gradient norms it estimates
    :math:`|G|^2` and :math:`\mathrm{tr}\,\Sigma` without bias (McCandlish et al. 2018, App. A),
    smooths each with a bias-corrected EMA and logs, under ``gradnoise/``:

    - ``b_simple`` :math:`= \mathrm{tr}\,\Sigma / |G|^2`, ``grad_sq``, ``trace_cov``;
    - ``gr_s`` :math:`= (1 + B_\text{simple})/(B + B_\text{simple})` (GR-Gauge Lemma 2), ideal in
      [0.5, 0.65];
    - ``gr_t`` :math:`= |\hat v|_1/|\hat m|^2` (GR-Gauge Def. 1), ideal near 20; costs two
      parameter-sized buffers and one multi-tensor update per step;
    - ``gsnr``: the per-sample GSNR :math:`G_i^2/\rho_i^2` (VRGD Eq. 2) averaged over elements and
      smoothed over the logged steps (:class:`~lightning_gradnoise.stats.GSNRStatistic`); costs four
      parameter-sized buffers, filled only on the steps that are logged;
    - ``batch_size`` (the global :math:`B`), ``skipped_steps`` (steps with non-finite gradients
      or an empty micro-batch: skipped whole and counted).

    The groups are, by default (``capture="auto"``), the step's devices x micro-batches when there
    are at least two, and otherwise each example of the batch (``capture="per_example"``: every
    example's gradient norm from its layers' inputs and output gradients,
    :class:`~lightning_gradnoise.capture.PerExampleCollector`). Per example, the parameters of
    module types it does not cover are left out (listed in a warning at the start; the covered
    fraction of parameters is logged as ``coverage``) and GSNR is not measured (it needs two
    groups). Sharded training (Lightning's ``ModelParallelStrategy`` with FSDP2) is measured per
    example.

    Each of ``b_simple``, ``grad_sq``, ``trace_cov``, ``gr_s``, ``gr_t`` and ``gsnr`` comes with its two-sided
    ``level`` interval as ``<key>_lo`` and ``<key>_hi`` (:meth:`GradientNoiseScale.reading
    <lightning_gradnoise.stats.GradientNoiseScale.reading>`). While :math:`|G|^2` is not resolved
    from zero, ``b_simple`` and ``gr_s`` and their intervals are NaN: not determined yet, rather
    than a negative :math:`B_\text{simple}` or a :math:`GR_S` above 1. The last steps of a run,
    after the last log, are folded and logged when training ends.

    Per parameter tensor under ``gradnoise/layer/<name>/<statistic>`` with ``per_layer=True``;
    histograms of each layer's :math:`\log_{10}` GSNR to TensorBoard and W&B with
    ``histograms=True``.

    Args:
        statistics: any of ``"b_simple"``, ``"gr_s"``, ``"gr_t"``, ``"gsnr"``, or ``"all"``.
        log_every_n_steps: log every this many optimizer steps; ``None`` takes the Trainer's.
        ema_decay: EMA decay for :math:`|G|^2` and :math:`\mathrm{tr}\,\Sigma`, in ``[0, 1)``.
        gr_t_beta: :math:`\beta` of :math:`GR_T` (0.9 in GR-Gauge), in ``(0, 1)``.
        per_layer: also log one value per parameter tensor.
        histograms: log per-layer GSNR histograms (needs ``"gsnr"``).
        loss_reduction: ``"mean"`` if the training loss averages over the batch (the usual case),
            ``"sum"`` if it sums; the group's mean gradient is recovered either way.
        batch_size_fn: ``batch -> number of samples``; by default Lightning's own rule.
        level: the two-sided level of the logged intervals, in ``(0, 1)`` (0.9 by default).
        capture: ``"auto"``, ``"groups"`` or ``"per_example"`` (see above).
        per_example_every: per example, measure one optimizer step in this many (and every
            logged step). Per-example norms of sequence layers cost a share of the backward; the
            statistics are averages over steps, so measuring a quarter of them (the default)
            keeps their expected values and costs a quarter as much, with an EMA that spans four
            times as many steps. ``1`` measures every step.

    Examples:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(accumulate_grad_batches=4, callbacks=[GradNoiseMonitor(statistics="all")])
    """

    def __init__(
        self,
        statistics: str | Iterable[str] = ("b_simple", "gr_s", "gsnr"),
        log_every_n_steps: int | None = None,
        ema_decay: float = 0.95,
        gr_t_beta: float = 0.9,
        per_layer: bool = False,
        histograms: bool = False,
        loss_reduction: str = "mean",
        batch_size_fn: Callable[[Any], int] | None = None,
        level: float = 0.9,
        capture: str = "auto",
        per_example_every: int = 4,
    ) -> None:
        self.statistics = parse_statistics(statistics)
        self.capture = check_choice("capture", capture, ("auto", "groups", "per_example"))
        self.per_example_every = check_int("per_example_every", per_example_every, low=1)
        self.level = check_number("level", level, low=0, low_open=True, high=1, high_open=True)
        log_every_n_steps = check_optional(check_int, "log_every_n_steps", log_every_n_steps, low=1)
        check_number("ema_decay", ema_decay, low=0, high=1, high_open=True)
        check_number("gr_t_beta", gr_t_beta, low=0, low_open=True, high=1, high_open=True)
        check_bool("per_layer", per_layer)
        check_bool("histograms", histograms)
        check_choice("loss_reduction", loss_reduction, ("mean", "sum"))
        check_optional(check_callable, "batch_size_fn", batch_size_fn)
        if histograms and "gsnr" not in self.statistics:
            raise ValueError("histograms=True needs 'gsnr' in statistics")
        self.log_every_n_steps = log_every_n_steps
        self.ema_decay = float(ema_decay)
        self.gr_t_beta = float(gr_t_beta)
        self.per_layer = bool(per_layer)
        self.histograms = bool(histograms)
        self.loss_reduction = loss_reduction
        self.batch_size_fn = batch_size_fn or extract_batch_size
        self.tracker: GradNoiseTracker | None = None
        self.latest: dict[str, float] = {}
        self._pending_state: dict[str, Any] | None = None
        self._micro_size: int | None = None
        self._logging_step = False
        self._step_scale = 1.0
        self._accumulate: int | None = None
        self._comm: Any = None
        self._last_logged = -1
        self._empty_step = False
        self.log_results = True
        self._per_example = False
        self._began = -1  # the optimizer step whose first micro-batch was seen

    @property
    def state_key(self) -> str:
        """Names the settings, so that several monitors on one Trainer keep their own state."""
        return self._generate_state_key(statistics=sorted(self.statistics), log_every_n_steps=self.log_every_n_steps,
                                        ema_decay=self.ema_decay, gr_t_beta=self.gr_t_beta, per_layer=self.per_layer,
                                        level=self.level)

    @property
    def _legacy_state_key(self) -> str:  # what checkpoints saved before the key named the settings hold
        return type(self).__qualname__

    # -- set-up --------------------------------------------------------------------------------
    def check_trainer(self, trainer: Any, pl_module: Any) -> None:
        """Raise :class:`MisconfigurationError` if this Trainer cannot be measured."""
        ns = namespace_of(trainer)
        if not pl_module.automatic_optimization:
            raise MisconfigurationError(
                "GradNoiseMonitor needs automatic optimization; this LightningModule sets "
                "automatic_optimization = False. Use GradNoiseTracker in your training_step instead."
            )
        params = list(pl_module.parameters())
        if params and not any(p.requires_grad for p in params):
            # (a model built in configure_model has no parameters yet here: on_train_start tells)
            raise MisconfigurationError(
                f"{type(self).__name__} has nothing to measure: every parameter of {type(pl_module).__name__} is frozen "
                "(requires_grad=False). Unfreeze the parameters that train, or remove the callback."
            )
        strategy = trainer.strategy
        ddp = ns.strategies.DDPStrategy
        sharded = _sharded(trainer)
        if not (isinstance(strategy, (ddp, ns.strategies.SingleDeviceStrategy)) or sharded):
            raise MisconfigurationError(
                f"GradNoiseMonitor does not support strategy {type(strategy).__name__}. Use strategy='gnddp' (or "
                "'ddp') or a single device; for sharded training, Lightning's ModelParallelStrategy with "
                "fully_shard (FSDP2) in configure_model."
            )
        if sharded and self.capture == "groups":
            raise MisconfigurationError(
                "GradNoiseMonitor(capture='groups') needs whole gradients on every device, and "
                f"{type(strategy).__name__} shards them: use capture='auto' or 'per_example' (per-example norms "
                "are computed from each device's own layer inputs and output gradients)."
            )
        if sharded and "gr_t" in self.statistics:
            raise MisconfigurationError(
                "GradNoiseMonitor cannot measure 'gr_t' under sharded training yet (its elementwise EMAs would "
                "need the whole gradient): leave 'gr_t' out of statistics."
            )
        k = trainer.world_size * trainer.accumulate_grad_batches
        if needs_groups(self.statistics) and k < 2 and (self.capture == "groups" or not self.statistics - {"gsnr"}):
            raise MisconfigurationError(
                f"GradNoiseMonitor({sorted(self.statistics)}, capture='groups') needs at least 2 gradient groups "
                f"per step, and this Trainer has {trainer.world_size} device(s) x accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches}. "
                + ("Use capture='auto' (each example is a group), set " if self.statistics - {"gsnr"} else "Set ")
                + "Trainer(accumulate_grad_batches=4) (any value >= 2), or train on 2+ devices with strategy='gnddp'."
            )

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self.check_trainer(trainer, pl_module)
            comm = getattr(trainer.strategy, "gradnoise", None)
            if comm is not None and self._wants_packing(trainer):
                comm.request_packing()  # elementwise moments on every step: in DDP's own all-reduce

    _moments_only = False  # a consumer of every step's elementwise moments (VRMoments), measuring no GSNR

    def _wants_packing(self, trainer: Any) -> bool:
        # sums of squares in DDP's own all-reduce serve a VR optimizer; the logged GSNR combines
        # the processes' centred moments instead (no float32 cancellation), on logged steps
        return self._moments_only and "gsnr" in self.statistics and self._every(trainer) == 1

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # Where gnddp registered its hook, the hook reads DDP's buckets and packs elementwise
        # moments into DDP's own all-reduce; elsewhere the tracker sums what it needs in
        # collectives of its own, once per fold (and once per GSNR step). The hook feeds one
        # collector: a consumer of elementwise moments on every step if there is one; any other
        # (a second monitor, a monitor beside VRMoments) reads .grad itself.
        comm = getattr(trainer.strategy, "gradnoise", None)
        self._per_example = self.uses_per_example(trainer)
        usable = comm is not None and comm.registered and comm.collector is None and not self._per_example
        self._comm = comm if usable and (self._wants_packing(trainer) or not comm.pack_requested) else None
        statistics = self.statistics
        if self._per_example:
            statistics = self._per_example_statistics(trainer, pl_module)
        self.tracker = GradNoiseTracker(
            pl_module if self._per_example else pl_module.named_parameters(),
            statistics,
            ema_decay=self.ema_decay,
            gr_t_beta=self.gr_t_beta,
            mode="hooks" if self._per_example else self.capture_mode(trainer),
            level=self.level,
            capture="per_example" if self._per_example else "groups",
        ).attach()
        self.tracker._histograms = self.histograms
        self.tracker.moments_only = self._moments_only
        if self._pending_state is not None:
            self.tracker.load_state_dict(self._pending_state)
            self._pending_state = None
        if self._comm is not None:
            self._comm.bind(self.tracker.collector)
        self._accumulate = trainer.accumulate_grad_batches

    def uses_per_example(self, trainer: Any) -> bool:
        """Whether this Trainer is measured per example: asked for, or (``capture="auto"``) one
        gradient group per step, or sharded gradients."""
        if self.capture != "auto":
            return self.capture == "per_example"
        return trainer.world_size * trainer.accumulate_grad_batches < 2 or _sharded(trainer)

    def _per_example_statistics(self, trainer: Any, pl_module: Any) -> frozenset[str]:
        from lightning_gradnoise.capture import uncovered_parameters

        left = uncovered_parameters(pl_module)
        if left and trainer.is_global_zero:
            total = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
            shown = ", ".join(f"{name} ({n})" for name, n in left[:8]) + (" ..." if len(left) > 8 else "")
            warnings.warn(
                f"GradNoiseMonitor measures per example and cannot see {len(left)} trainable parameter tensor(s) "
                f"({sum(n for _, n in left)} of {total} parameters), held by module types other than "
                f"Linear, Embedding, LayerNorm, RMSNorm, Conv1d and Conv2d: {shown}. They are left out; "
                "gradnoise/coverage logs the covered fraction. With accumulate_grad_batches >= 2 (or 2+ "
                "devices) capture='groups' measures every parameter.",
                UserWarning,
                stacklevel=2,
            )
        if "gsnr" in self.statistics:
            if trainer.is_global_zero:
                warnings.warn(
                    "GradNoiseMonitor measures per example here (one gradient group per step), and GSNR needs at "
                    "least 2 groups: it is not logged. Set accumulate_grad_batches >= 2 (or train on 2+ devices) "
                    "to measure it.",
                    UserWarning,
                    stacklevel=2,
                )
            return self.statistics - {"gsnr"}
        return self.statistics

    def capture_mode(self, trainer: Any) -> str:
        """How the collector sees each group's gradient on this Trainer (see GradientMomentCollector).

        Per example: ``"per_example"``. One process: ``"swap"`` (no per-tensor hook). Under DDP without accumulation:
        ``"external"`` when ``gnddp``'s communication hook reads DDP's buckets, otherwise
        ``"final"`` (``.grad`` read once at the end of backward, before DDP writes the averaged
        gradient back), or ``"hooks"`` with ``gradient_as_bucket_view=True``. With accumulation
        under DDP: ``"hooks"``, since DDP's reducer owns ``.grad`` in backward."""
        if self._per_example:
            return "per_example"
        if self._comm is not None:
            return "external" if trainer.accumulate_grad_batches == 1 else "hooks"
        strategy = trainer.strategy
        ddp = namespace_of(trainer).strategies.DDPStrategy
        if trainer.world_size == 1 and not isinstance(strategy, ddp):
            return "swap"
        return "final" if trainer.accumulate_grad_batches == 1 and not gradient_as_bucket_view(strategy) else "hooks"

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        # the steps after the last log (a run's end rarely falls on the cadence): fold and log them
        last = trainer.global_step - 1
        if self.tracker is not None and self.log_results and last > self._last_logged:
            summary = self.tracker.summarize(per_layer=self.per_layer)
            if "gsnr" in self.latest:
                summary.setdefault("gsnr", self.latest["gsnr"])  # GSNR needs a step's moments: the last one stands
            self.latest = summary
            self._log(trainer, summary, last, histograms=False)
        self._release()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._release()

    def _release(self) -> None:
        if self.tracker is not None:
            self.tracker.detach()
        if self._comm is not None:
            self._comm.bind(None)
            self._comm = None

    # -- per micro-batch -----------------------------------------------------------------------
    def _every(self, trainer: Any) -> int:
        return self.log_every_n_steps or max(int(trainer.log_every_n_steps), 1)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        assert self.tracker is not None
        self._micro_size = int(self.batch_size_fn(batch))
        if self._micro_size <= 0 and trainer.world_size == 1:
            self._empty_step = True  # no samples, no mean gradient: the step is skipped and counted
        if self._began != trainer.global_step:
            # First micro-batch of a step (every micro-batch of a step sees the same global_step).
            # The divisor and the AMP loss scale hold for the whole accumulation window
            # (GradScaler updates after the optimizer step): read them once.
            self._began = trainer.global_step
            self._logging_step = trainer.global_step % self._every(trainer) == 0
            if self._per_example:  # the same decision on every process (from the step number)
                self.tracker.collector.enabled = self._logging_step or trainer.global_step % self.per_example_every == 0
            self.tracker.begin_step(elementwise=self._logging_step)
            if trainer.accumulate_grad_batches != self._accumulate:  # changed (a scheduler, an adapter)
                self._accumulate = trainer.accumulate_grad_batches
                mode = self.capture_mode(trainer)
                if mode != self.tracker.collector.mode:
                    self.tracker.collector.set_mode(mode)
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            loss_scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
            self._step_scale = self.group_scale(trainer.accumulate_grad_batches, loss_scale)

    @staticmethod
    def group_scale(accumulate: int, loss_scale: float) -> float:
        """The factor from a micro-batch's raw gradient to its mean gradient (for a mean-reduced
        loss; :meth:`on_before_backward` divides a summed one by the micro-batch size too).

        Lightning divides the loss by ``accumulate_grad_batches`` and AMP multiplies it by the loss
        scale."""
        return accumulate / loss_scale

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        assert self.tracker is not None
        size = self._micro_size if self._micro_size and self._micro_size > 0 else None
        scale = self._step_scale / size if self.loss_reduction == "sum" and size else self._step_scale
        self.tracker.begin_group(scale=scale, size=size, loss=loss)

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        assert self.tracker is not None
        self.tracker.end_group()

    # -- per optimizer step --------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        tracker = self.tracker
        assert tracker is not None
        if self._empty_step:  # one device; under DDP the fold skips a step with a sizeless group on every rank
            self._empty_step = False
            tracker.skip_step()
            self.consume_step(trainer, optimizer)
            self._release_step(tracker)
            self._logging_step = False
            return
        summary = tracker.finish_step(
            loss_divisor=trainer.accumulate_grad_batches,
            loss_reduction=self.loss_reduction,
            summarize=self._logging_step,
            reduced=self._comm.take() if self._comm is not None else None,
            per_layer=self.per_layer,
        )
        self.consume_step(trainer, optimizer)
        self._release_step(tracker)
        self._logging_step = False
        if summary is None:
            return
        self.latest = summary
        self._log(trainer, summary, trainer.global_step)

    def _log(self, trainer: Any, summary: dict[str, float], step: int, histograms: bool = True) -> None:
        self._last_logged = step
        tracker = self.tracker
        if trainer.is_global_zero and self.log_results:
            log_scalars(trainer.loggers, {f"gradnoise/{k}": v for k, v in summary.items()}, step)
            if histograms and self.histograms and tracker.histograms:
                hists = {
                    f"gradnoise/layer/{name}/log10_gsnr": values.clamp_min(1e-30).log10()
                    for name, values in tracker.histograms.items()
                    if values.numel()
                }
                log_histograms(trainer.loggers, hists, step)

    @staticmethod
    def _release_step(tracker: Any) -> None:
        # a capture that other consumers read is reset by its owner's next step, not now (the
        # others read it after this callback)
        if not getattr(tracker.collector, "followers", 0):
            tracker.collector.reset()

    def consume_step(self, trainer: Any, optimizer: Any) -> None:
        """Called after the step's statistics, before the captured moments are cleared."""

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.tracker is not None:
            return {"tracker": self.tracker.state_dict(), "latest": dict(self.latest)}
        return {"tracker": self._pending_state, "latest": dict(self.latest)} if self._pending_state else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self.latest = dict(state_dict.get("latest", {}))
        if self.tracker is not None:
            self.tracker.load_state_dict(state_dict["tracker"])
        else:
            self._pending_state = state_dict["tracker"]
