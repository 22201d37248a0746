"""Auto-tuning: the decision rules without a Trainer, then in real fits (one device and 2-process DDP)."""

from __future__ import annotations

import glob
import math
import warnings
from types import SimpleNamespace

import pytest
import torch

from helpers import LinRegTruth, linreg_module, ns, recording_logger, trainer_kwargs
from lightning_gradnoise import BatchSizeAdapter, GradNoiseMonitor, LRAdapter, MisconfigurationError
from lightning_gradnoise.control import BatchSizeController, LRController, lr_rule_for
from lightning_gradnoise.optim import LAMB, LARS, create_optimizer
from lightning_gradnoise.stats import ema_effective_steps
from test_ddp import launch


def test_batch_rule_moves_the_right_way() -> None:
    c = BatchSizeController(unit=16, min_batch=16, max_batch=256, cooldown=10)
    assert c.decide(0.9, 64, step=100).value == 128  # above the band: grow (Theorem 2: GR_S falls)
    assert c.decide(0.9, 128, step=105).changed is False  # cooldown
    assert c.decide(0.57, 128, step=200).value == 128  # inside
    assert c.decide(0.3, 128, step=300).value == 64  # below: shrink
    assert c.decide(0.66, 64, step=400).changed is False  # within the hysteresis
    assert c.decide(0.9, 256, step=500).changed is False  # at max_batch
    assert c.decide(0.1, 16, step=600).changed is False  # at min_batch
    assert c.decide(math.nan, 64, step=700).changed is False
    lo, hi = c.target_range(100.0)
    assert lo < 100.0 < hi


def test_batch_rule_holds_a_shrink_when_told_the_reading_is_not_about_the_batch() -> None:
    # a too-large learning rate makes the gradients oscillate: GR_S reads low, yet the batch is not the cause
    c = BatchSizeController(unit=16, min_batch=16, max_batch=1024, cooldown=0)
    held = c.decide(0.2, 256, step=10, may_shrink=False)
    assert not held.changed and "not falling" in held.reason and c.last_change == 0
    assert c.decide(0.9, 256, step=11, may_shrink=False).value == 512  # growing is not held
    assert c.decide(0.2, 512, step=12).value == 256


def test_lr_rule_moves_the_right_way() -> None:
    c = LRController(target=20, tolerance=1.5, step_factor=1.25, cooldown=5)
    assert c.decide(45.0, 1.0, step=10).value == pytest.approx(0.8)  # GR_T too high (Theorem 1)
    assert c.decide(5.0, 0.8, step=12).changed is False  # cooldown
    assert c.decide(5.0, 0.8, step=20).value == pytest.approx(1.0)  # too low: raise
    assert c.decide(22.0, 1.0, step=40).changed is False  # near target


def test_batch_rule_jumps_to_the_band_that_b_simple_implies() -> None:
    """Given B_simple the move goes to the allowed batch whose Lemma 2 GR_S is nearest the band's
    middle, within max_factor, and always the way GR_S says."""
    from lightning_gradnoise.stats import gr_s

    c = BatchSizeController(unit=16, min_batch=16, max_batch=4096, cooldown=0, max_factor=8)
    for b_simple, batch in [(600.0, 64), (100.0, 512), (300.0, 32), (40.0, 256)]:
        now = float(gr_s(b_simple, batch))
        d = c.decide(now, batch, step=1, b_simple=b_simple)
        assert d.changed and (d.value > batch) == (now > 0.65)
        assert 0.5 <= float(gr_s(b_simple, d.value)) <= 0.65, (b_simple, batch, d.value)
    # far from the band: no more than max_factor per decision
    assert c.decide(float(gr_s(1e5, 16)), 16, step=2, b_simple=1e5).value == 128
    assert c.decide(float(gr_s(5.0, 4096)), 4096, step=3, b_simple=5.0).value == 512
    # a B_simple that disagrees with GR_S (stale) still moves the way GR_S says, by one doubling
    assert c.decide(0.9, 64, step=4, b_simple=10.0).value == 128
    with pytest.raises(ValueError, match="max_factor"):
        BatchSizeController(unit=16, min_batch=16, max_batch=64, max_factor=3)


def test_batch_decision_uses_the_configured_batch_not_a_short_window() -> None:
    """An epoch's short last window (here 16 of 64 samples) reads GR_S = 0.72 at B = 16; at the
    configured B = 64 the same B_simple gives 0.39: shrink, not grow."""
    from lightning_gradnoise.stats import gr_s

    c = BatchSizeController(unit=16, min_batch=16, max_batch=1024, cooldown=0)
    assert float(gr_s(40.0, 16)) > 0.65 > 0.5 > float(gr_s(40.0, 64))
    assert c.decide_from_noise_scale(40.0, 64, step=1).value == 32
    assert c.decide_from_noise_scale(float("nan"), 64, step=2).changed is False


def test_lr_rule_discounts_the_target_for_a_young_gr_t_ema() -> None:
    # After t steps a frozen model's GR_T reads (1 + r)/(1 + r/n_t) <= n_t (stats.gr_t_frozen), 9.18
    # at t = 10: a reading of 12 then is not "far below 20", it is above what pure noise gives.
    c = LRController(target=20, tolerance=1.5, cooldown=0)
    young = 20 * ema_effective_steps(0.9, 10) / ema_effective_steps(0.9)
    assert c.decide(12.0, 1.0, step=10, age=10).changed is False
    assert f"near {young:.3g}" in c.decide(12.0, 1.0, step=11, age=10).reason
    assert c.decide(12.0, 1.0, step=12).value > 1.0  # no age: the steady-state target
    assert c.decide(12.0, 1.0, step=13, age=10_000).value > 1.0  # an old EMA: the same
    assert c.decide(30.0, 1.0, step=14, age=10).value < 1.0  # above what a young EMA can read: lower it
    assert c.decide(3.0, 1.0, step=15, age=10).value > 1.0


def test_lr_rule_steps_in_proportion_to_the_distance_from_target() -> None:
    c = LRController(target=20, tolerance=1.5, step_factor=2.0, gain=0.5, cooldown=0)
    assert c.decide(80.0, 1.0, step=1).value == pytest.approx(0.5)  # (20/80)^0.5
    assert c.decide(40.0, 1.0, step=2).value == pytest.approx(0.5**0.5)
    assert c.decide(2.0, 1.0, step=3).value == pytest.approx(2.0)  # (10)^0.5 capped at step_factor
    assert c.decide(25.0, 1.0, step=4).changed is False  # within tolerance
    with pytest.raises(ValueError, match="gain"):
        LRController(gain=0.0)


def test_auto_gr_t_target_is_lemma_1_at_the_sgd_optimal_learning_rate() -> None:
    """target='auto': Eq. 19 at r = mu/B and lambda*eta = 1/(1 + r) (McCandlish Eq. 2.7 with
    eps_max = 1/lambda), capped to Eq. 19's domain q >= 0; at r = 1 it is the paper's ~20 (23.0)."""
    from lightning_gradnoise.control import gr_t_target
    from lightning_gradnoise.stats import gr_t_expected

    assert gr_t_target(1.0) == pytest.approx(float(gr_t_expected(1.0, 0.5)), rel=1e-12)
    assert gr_t_target(1.0) == pytest.approx(23.0, abs=0.05)
    for r in (0.5, 2.0, 4.0, 16.0):
        assert gr_t_target(r) == pytest.approx(float(gr_t_expected(r, 1 / (1 + r))), rel=1e-12)
    assert gr_t_target(0.2) == pytest.approx(float(gr_t_expected(0.2, 0.6)), rel=1e-12)  # capped: (1 + r)/2
    values = [gr_t_target(r) for r in (0.0, 0.1, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)]
    assert all(5 < v < 50 for v in values) and values == sorted(values)  # flat, where Eq. 19 at x = 1/2 is not
    assert float(gr_t_expected(16.0, 0.5)) > 1000
    c = LRController(target="auto", tolerance=1.5, step_factor=2.0, cooldown=0)
    assert c.decide(20.0, 1.0, step=1, mu_over_b=4.0).value == pytest.approx((gr_t_target(4.0) / 20.0) ** 0.5)
    assert c.decide(20.0, 1.0, step=2, mu_over_b=1.0).changed is False  # 20 is near 23
    assert c.decide(20.0, 1.0, step=3, mu_over_b=0.05).value < 1.0  # a large batch expects a lower GR_T
    assert c.decide(20.0, 1.0, step=4).changed is False and "B_simple" in c.decide(20.0, 1.0, step=4).reason
    with pytest.raises(ValueError, match="target='best'"):
        LRController(target="best")


def test_batch_adapter_keeps_two_groups_on_one_device() -> None:
    """On one device the batch never drops to one micro-batch (no second group: B_simple would
    freeze), whatever min_batch says; under DDP the devices are the groups."""
    assert BatchSizeAdapter().batch_bounds(16, 1) == (16, 32, 16 * 1024)
    assert BatchSizeAdapter(min_batch=16).batch_bounds(16, 1)[1] == 32
    assert BatchSizeAdapter(max_batch=16).batch_bounds(16, 1)[1:] == (32, 32)
    with pytest.raises(ValueError, match="min_batch=64"):
        BatchSizeAdapter(min_batch=64, max_batch=16)
    assert BatchSizeAdapter().batch_bounds(16, 2) == (32, 32, 32 * 1024)
    unit, lo, hi = BatchSizeAdapter().batch_bounds(16, 1)
    c = BatchSizeController(unit=unit, min_batch=lo, max_batch=hi, cooldown=0)
    assert c.decide(0.1, 64, step=1).value == 32 and c.decide(0.1, 32, step=2).changed is False


def test_batch_adapter_warns_when_it_raises_the_bounds_it_was_given() -> None:
    one_device = SimpleNamespace(world_size=1)  # all _ensure_controller reads of the trainer
    with pytest.warns(UserWarning, match=r"raised min_batch=16 to 32 and max_batch=16 to 32: with a micro-batch of 16"):
        controller = BatchSizeAdapter(min_batch=16, max_batch=16)._ensure_controller(one_device, 16)
    assert (controller.min_batch, controller.max_batch) == (32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BatchSizeAdapter(min_batch=32)._ensure_controller(one_device, 16)  # within reach: no warning


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(unit=16, min_batch=16, max_batch=8), "min_batch"),
        (dict(unit=16, min_batch=16, max_batch=64, band=(0.7, 0.6)), "band"),
        (dict(unit=16, min_batch=16, max_batch=64, band=(0.5, 1.2)), "band"),
        (dict(unit=0, min_batch=16, max_batch=64), "unit"),
        (dict(unit=16, min_batch=16, max_batch=64, hysteresis=0.5), "hysteresis"),
    ],
)
def test_batch_controller_rejects_bad_settings(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        BatchSizeController(**kwargs)


def test_rule_detection() -> None:
    w = [torch.nn.Parameter(torch.ones(1))]
    assert lr_rule_for(torch.optim.SGD(w, lr=0.1)) == "sgd"
    assert lr_rule_for(torch.optim.AdamW(w)) == "adam"
    assert lr_rule_for(LAMB(w)) == "adam" and lr_rule_for(LARS(w)) == "sgd"
    assert lr_rule_for(create_optimizer("vr_adam", w)) == "adam"
    with pytest.raises(ValueError, match="lr_rule"):
        lr_rule_for(torch.optim.LBFGS(w))
    with pytest.raises(ValueError, match="lr_rule"):
        BatchSizeAdapter(lr_rule="lion")


def adapt_run(tmp_path=None, max_epochs=2, resume=None, ckpt=False):
    L = ns("lightning.pytorch")
    truth = LinRegTruth(d=8, seed=1)
    # a learning rate far below the greedy one (about 0.4 here): the line search raises it
    base = type(linreg_module("lightning.pytorch", truth, lr=0.005, batch=16, n_batches=256))

    class WithScheduler(base):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.005)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.001 * s))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    logger = recording_logger("lightning.pytorch")
    mon = GradNoiseMonitor(statistics="all", log_every_n_steps=5)
    bsa, lra = BatchSizeAdapter(cooldown=10), LRAdapter(cooldown=10)
    cbs = [mon, bsa, lra]
    if ckpt:
        cbs.append(L.callbacks.ModelCheckpoint(dirpath=str(tmp_path), save_top_k=-1, every_n_epochs=1))
    kw = trainer_kwargs(accumulate_grad_batches=2, callbacks=cbs, logger=logger, max_epochs=max_epochs)
    kw["enable_checkpointing"] = ckpt
    model = WithScheduler()
    trainer = L.Trainer(**kw)
    trainer.fit(model, ckpt_path=resume)
    return trainer, model, bsa, lra, logger


def test_adapters_in_a_fit_compose_with_a_scheduler_and_resume_exactly(tmp_path) -> None:
    trainer, model, bsa, lra, logger = adapt_run(tmp_path, ckpt=True)
    assert bsa.decisions and trainer.accumulate_grad_batches > 2  # the batch grew mid-epoch
    assert any(s % 64 for s, _ in bsa.decisions)  # not only at epoch boundaries (64 steps at K=2)
    # the two adapters never move in one step, and the learning rate waits a cooldown after a batch move
    assert lra.decisions and all("interval" in reason for _, reason in lra.decisions)
    assert logger.series("gradnoise/decision/lr_scale") and logger.series("gradnoise/lr_ratio")
    for step, _ in lra.decisions:
        assert not any(0 <= step - b < 10 for b, _ in bsa.decisions), (step, bsa.decisions)
    # the learning rate actually used = the schedule (LambdaLR from base 0.005) x both scales
    group = trainer.optimizers[0].param_groups[0]
    sched = trainer.lr_scheduler_configs[0].scheduler
    want = 0.005 * bsa.lr_scale * lra.lr_scale / (1.0 + 0.001 * sched.last_epoch)
    assert group["lr"] == pytest.approx(want, rel=1e-9)
    # one key per meaning: gradnoise/lr_scale is the factor applied on top of the schedule
    logged = logger.series("gradnoise/lr_scale")
    assert logged and logged[-1][1] == pytest.approx(bsa.lr_scale * lra.lr_scale, rel=1e-12)
    assert logger.series("gradnoise/lr_scale/batch")[-1][1] == bsa.lr_scale
    assert logger.series("gradnoise/lr_scale/line_search")[-1][1] == lra.lr_scale
    assert math.isfinite(float(model.lin.weight.sum()))
    # resume from the end of epoch 1 (after changes): same batch size, scales and next decisions
    (ckpt,) = glob.glob(str(tmp_path / "epoch=0-*.ckpt"))
    t2, m2, bsa2, lra2, _ = adapt_run(resume=ckpt)
    assert t2.accumulate_grad_batches == trainer.accumulate_grad_batches
    assert bsa2.decisions == bsa.decisions and lra2.decisions == lra.decisions
    assert bsa2.lr_scale == bsa.lr_scale and lra2.lr_scale == lra.lr_scale
    assert math.isfinite(lra.loss_limit) and lra2.loss_limit == lra.loss_limit
    assert lra._batch_lr == bsa.lr_scale and (lra2._batch_lr, lra2.controller.early_rise) == (lra._batch_lr, lra.controller.early_rise)
    assert torch.equal(m2.lin.weight, model.lin.weight)


def _linreg_losses(lr: float, adapt: bool) -> tuple[list[float], LRAdapter]:
    L = ns("lightning.pytorch")
    truth = LinRegTruth(d=8, seed=1)
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    lra = LRAdapter()
    callbacks = [GradNoiseMonitor(statistics=("b_simple",)), lra, Record()] if adapt else [Record()]
    L.Trainer(**trainer_kwargs(accumulate_grad_batches=2, callbacks=callbacks)).fit(
        linreg_module("lightning.pytorch", truth, lr=lr, batch=16, n_batches=128))
    return losses, lra


def test_a_rate_that_diverges_from_the_first_step_is_lowered_until_training_recovers() -> None:
    # plain SGD at twice the stable rate: left fixed, the loss grows without bound
    fixed, _ = _linreg_losses(2.0, adapt=False)
    assert not (max(fixed[-10:]) < 1e3)
    losses, lra = _linreg_losses(2.0, adapt=True)
    diverged = [(step, why) for step, why in lra.decisions if "diverges" in why]
    assert diverged and diverged[0][0] <= 12, lra.decisions  # at the first test, before r is read
    assert all(f"above {lra.loss_limit:.4g}" in why for _, why in diverged)
    # a stable rate: the limit is set, never crossed; the lowered run ends at its loss level
    steady, calm = _linreg_losses(0.3, adapt=True)
    assert sum(losses[-20:]) < 1.5 * sum(steady[-20:])
    assert math.isfinite(calm.loss_limit) and calm.loss_limit > losses[0] and not any("diverges" in why for _, why in calm.decisions)


def test_adapters_need_the_monitor() -> None:
    L = ns("lightning.pytorch")
    model = linreg_module("lightning.pytorch", LinRegTruth(d=3), lr=0.1, n_batches=8)
    with pytest.raises(MisconfigurationError, match="GradNoiseMonitor"):
        L.Trainer(**trainer_kwargs(accumulate_grad_batches=2, callbacks=[BatchSizeAdapter()])).fit(model)
    with pytest.raises(MisconfigurationError, match="target='auto'"):
        L.Trainer(**trainer_kwargs(accumulate_grad_batches=2, callbacks=[GradNoiseMonitor(statistics=("gr_t",)), LRAdapter(rule="gr_t", target="auto")])).fit(model)
    with pytest.raises(MisconfigurationError, match="b_simple"):
        L.Trainer(**trainer_kwargs(accumulate_grad_batches=2, callbacks=[GradNoiseMonitor(statistics=("gr_t",)), LRAdapter()])).fit(model)
    with pytest.raises(MisconfigurationError, match="power of two"):
        L.Trainer(**trainer_kwargs(accumulate_grad_batches=3, callbacks=[GradNoiseMonitor(), BatchSizeAdapter()])).fit(model)


def test_batch_changes_mid_epoch_under_ddp_without_hang_and_ranks_agree(tmp_path) -> None:
    ranks = launch(tmp_path, "adapt", steps=200, accumulate=2, lr=0.005, batch=8, every=5, decay=0.95)
    a, b = ranks
    assert a["decisions"] == b["decisions"] and a["decisions"][0] and a["decisions"][1]  # same decisions of both adapters, and some
    assert all("interval" in reason for adapter in a["decisions"] for _, reason in adapter)
    assert a["accumulate"] == b["accumulate"] and max(a["accumulate"]) > 2  # the batch changed
    assert a["weight"] == b["weight"] and all(math.isfinite(w) for w in a["weight"])
    assert a["micro_batches_seen"] == b["micro_batches_seen"] == 400  # every batch of the epoch, once


def test_ddp_run_resumed_after_a_change_continues_identically(tmp_path) -> None:
    common = dict(steps=100, accumulate=2, lr=0.005, batch=8, every=5, decay=0.95, epochs=2)
    ckpt_dir = tmp_path / "ckpt"
    full = launch(tmp_path, "adapt", ckpt_dir=ckpt_dir, **common)
    (ckpt,) = glob.glob(str(ckpt_dir / "epoch=0-*.ckpt"))
    resumed = launch(tmp_path, "adapt", resume=ckpt, **common)
    assert full[0]["decisions"][0] and full[0]["decisions"][1]  # both adapters moved
    assert any(step <= 100 for step, _ in full[0]["decisions"][1])  # the learning rate moved during the first epoch
    for a, b in zip(full, resumed):
        assert b["decisions"] == a["decisions"] and b["lr_scales"] == a["lr_scales"]
        assert b["final_accumulate"] == a["final_accumulate"] and b["weight"] == a["weight"]
