"""GradNoiseMonitor in real Lightning fits, both namespaces, against the linear-regression truth."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import NAMESPACES, LinRegTruth, linreg_module, ns, recording_logger, rel_err, trainer_kwargs
from lightning_gradnoise import GradNoiseMonitor, MisconfigurationError
from lightning_gradnoise.stats import gr_s, gr_t_frozen


def fit(namespace, monitor, truth, steps=300, k=4, b=16, lr=0.0, logger=None, **kw):
    L = ns(namespace)
    model = linreg_module(namespace, truth, lr=lr, batch=b, n_batches=k * steps)
    trainer = L.Trainer(**trainer_kwargs(accumulate_grad_batches=k, callbacks=[monitor], logger=logger or False, **kw))
    trainer.fit(model)
    return trainer, model


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_ground_truth_frozen_linear_regression(namespace) -> None:
    # lr = 0 keeps w at w0: G and Sigma are known exactly. 1200 steps x 64 samples: the EMA with
    # decay 0.999 averages ~1000 steps; the per-step B_simple noise measured in
    # test_stats_noise_scale (SE < 1.3% at 20000 steps of b=8) puts 4 SE well inside 5%.
    truth = LinRegTruth(d=8, seed=0)
    logger = recording_logger(namespace)
    mon = GradNoiseMonitor(statistics="all", log_every_n_steps=50, ema_decay=0.999)
    steps, k, b = 1200, 4, 16
    fit(namespace, mon, truth, steps=steps, k=k, b=b, logger=logger)
    last = dict(logger.rows[-1][1])
    B = k * b
    assert last["gradnoise/batch_size"] == B
    assert rel_err(last["gradnoise/b_simple"], truth.b_simple) < 0.05
    assert rel_err(last["gradnoise/grad_sq"], truth.grad_sq) < 0.05
    assert rel_err(last["gradnoise/trace_cov"], truth.trace_cov) < 0.05
    assert rel_err(last["gradnoise/gr_s"], float(gr_s(truth.b_simple, B))) < 0.05
    # GR_T averaged over the logged steps after burn-in (one value is a 10-step EMA: noisy)
    grt = [v for s, v in logger.series("gradnoise/gr_t") if s >= 100]
    want = float(gr_t_frozen(truth.b_simple / B, 0.9))
    assert rel_err(sum(grt) / len(grt), want) < 0.05
    # GSNR: at w0 every element has signal; mean of g^2/sigma^2 is positive and finite
    assert 0 < last["gradnoise/gsnr"] < math.inf
    assert last["gradnoise/skipped_steps"] == 0
    # logged every 50 optimizer steps, at the optimizer step index, and the last step at the end
    assert [s for s, _ in logger.rows] == list(range(0, steps, 50)) + [steps - 1]
    assert "gradnoise/b_simple" in logger.rows[-1][1]


def test_sum_reduced_loss_gives_the_same_statistics() -> None:
    truth = LinRegTruth(d=4, seed=1)
    namespace = "lightning.pytorch"
    L = ns(namespace)

    class SumLoss(type(linreg_module(namespace, truth, n_batches=4 * 40))):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return 0.5 * (self.lin(x).squeeze(-1) - y).square().sum()

    results = {}
    for reduction in ("mean", "sum"):
        mon = GradNoiseMonitor(statistics=("b_simple", "gr_s"), log_every_n_steps=1, loss_reduction=reduction)
        model = linreg_module(namespace, truth, n_batches=4 * 40) if reduction == "mean" else SumLoss()
        L.Trainer(**trainer_kwargs(accumulate_grad_batches=4, callbacks=[mon], max_steps=40)).fit(model)
        results[reduction] = mon.latest["b_simple"]
    assert results["sum"] == pytest.approx(results["mean"], rel=1e-4)


def test_amp_loss_scale_is_undone() -> None:
    # A GradScaler multiplies the loss by 2^k; the statistics must not change.
    namespace = "lightning.pytorch"
    L = ns(namespace)
    truth = LinRegTruth(d=4, seed=2)
    values = []
    for use_scaler in (False, True):
        mon = GradNoiseMonitor(statistics="all", log_every_n_steps=1)
        plugins = []
        if use_scaler:
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
            plugins = [L.plugins.MixedPrecision("16-mixed", "cpu", scaler=scaler)]
        model = linreg_module(namespace, truth, n_batches=4 * 30)
        L.Trainer(**trainer_kwargs(accumulate_grad_batches=4, callbacks=[mon], plugins=plugins, max_steps=30)).fit(model)
        values.append(mon.latest)
    assert values[1]["skipped_steps"] == 0
    for key in ("b_simple", "grad_sq", "trace_cov", "gr_t"):
        assert values[1][key] == pytest.approx(values[0][key], rel=2e-2), key


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_one_device_without_accumulation_fails_at_setup_only_when_groups_are_asked_for(namespace) -> None:
    truth = LinRegTruth(d=3)
    with pytest.raises(MisconfigurationError, match="capture='auto'.*accumulate_grad_batches.*gnddp"):
        fit(namespace, GradNoiseMonitor(capture="groups"), truth, steps=2, k=1)
    # GR_T alone needs no groups
    mon = GradNoiseMonitor(statistics=("gr_t",), log_every_n_steps=1)
    fit(namespace, mon, truth, steps=5, k=1)
    assert mon.latest["gr_t"] >= 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(statistics=("b_simple", "noise")), "statistics"),
        (dict(statistics=()), "statistics"),
        (dict(log_every_n_steps=0), "log_every_n_steps=0"),
        (dict(ema_decay=1.0), "ema_decay=1.0"),
        (dict(gr_t_beta=0.0), "gr_t_beta=0.0"),
        (dict(loss_reduction="max"), "loss_reduction='max'"),
        (dict(statistics=("b_simple",), histograms=True), "histograms"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        GradNoiseMonitor(**kwargs)


def test_non_finite_step_is_skipped_and_counted() -> None:
    namespace = "lightning.pytorch"
    L = ns(namespace)
    truth = LinRegTruth(d=4, seed=3)

    base = type(linreg_module(namespace, truth, n_batches=24))

    class Poisoned(base):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("inf") if batch_idx == 9 else loss  # step 2 (micro-batches 8..11)

        def on_before_optimizer_step(self, optimizer):
            # runs after the callbacks' hook: keep the weights finite, as a GradScaler would
            for p in self.parameters():
                p.grad.nan_to_num_(0.0, 0.0, 0.0)

    def run(model):
        mon = GradNoiseMonitor(statistics="all", log_every_n_steps=1)
        L.Trainer(**trainer_kwargs(accumulate_grad_batches=4, callbacks=[mon], max_steps=6)).fit(model)
        return mon

    clean = run(linreg_module(namespace, truth, n_batches=24))
    poisoned = run(Poisoned())
    assert poisoned.latest["skipped_steps"] == 1 and clean.latest["skipped_steps"] == 0
    assert poisoned.tracker.noise_scale.grad_sq.count == 5
    assert math.isfinite(poisoned.latest["b_simple"]) and math.isfinite(poisoned.latest["gr_t"])
