"""How sure a reading is: intervals that cover the truth as often as they say, readings inside
their range from the first step, and adapters that act only on intervals that say something."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from helpers import LinRegTruth, digits, digits_mlp, exact_b_simple, linreg_module, ns, per_sample_grads, recording_logger, trainer_kwargs
from lightning_gradnoise import BatchSizeAdapter, GradNoiseMonitor, GradNoiseTracker
from lightning_gradnoise.control import BatchSizeController, LRController
from lightning_gradnoise.stats import GradientNoiseScale, fieller_interval, noise_scale_update_from_sums, t_quantile


def simulate(k: int, b: int, steps: int, reps: int, decay: float = 0.95, seed: int = 0) -> tuple[dict, LinRegTruth]:
    """``reps`` independent runs of the estimator at a frozen linear regression (exact G and
    Sigma), vectorized: each run is one 'layer' of one GradientNoiseScale."""
    truth = LinRegTruth(d=8)
    delta = truth.delta.double()
    g = torch.Generator().manual_seed(seed)
    gns = GradientNoiseScale(decay)
    chunk = max(1, 2_000_000 // (reps * k * b * truth.d))
    done = 0
    while done < steps:
        n = min(chunk, steps - done)
        x = torch.randn(n, reps, k, b, truth.d, generator=g, dtype=torch.float64)
        e = torch.randn(n, reps, k, b, generator=g, dtype=torch.float64) * truth.noise_std
        group = (x * ((x @ delta) - e)[..., None]).mean(3)  # each group's mean gradient
        est = noise_scale_update_from_sums(group.square().sum(-1).sum(-1), group.mean(2).square().sum(-1), k, k / b)
        gns.update_many(est.grad_sq, est.trace_cov)
        done += n
    return gns.reading(0.9, total=False), truth


@pytest.mark.parametrize(("k", "b"), [(2, 16), (8, 4)], ids=["k2", "k8"])
@pytest.mark.parametrize("steps", [20, 2000], ids=["early", "late"])
def test_a_90_percent_interval_covers_the_truth_85_to_95_percent_of_the_time(k: int, b: int, steps: int) -> None:
    reading, truth = simulate(k, b, steps, reps=400)
    for key, true in (("grad_sq", truth.grad_sq), ("trace_cov", truth.trace_cov), ("b_simple", truth.b_simple)):
        lo, hi = reading[f"{key}_lo"], reading[f"{key}_hi"]
        assert bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()), f"{key}: undetermined in some runs"
        covered = float(((lo <= true) & (true <= hi)).double().mean())
        assert 0.85 <= covered <= 0.95, f"{key} at k={k}, {steps} steps: covered {covered:.3f}"


def test_t_quantile_matches_scipy() -> None:
    from scipy import stats

    for df in (1, 2, 3, 4.5, 10, 38, 1000):
        for level in (0.8, 0.9, 0.95):
            want = stats.t.ppf(0.5 + level / 2, df)
            assert abs(t_quantile(level, df) - want) / want < (1e-12 if df in (1, 2) else 2e-3)


def test_fieller_is_unbounded_when_the_denominator_is_not_resolved_from_zero() -> None:
    one = torch.tensor(1.0)
    lo, hi = fieller_interval(torch.tensor(10.0), torch.tensor(0.5), one, torch.tensor(0.25), torch.tensor(0.0), 2.0)
    assert math.isinf(float(lo)) and math.isinf(float(hi))  # |0.5| < 2 x 0.5
    lo, hi = fieller_interval(torch.tensor(10.0), torch.tensor(2.0), one, torch.tensor(0.01), torch.tensor(0.0), 2.0)
    assert float(lo) < 5.0 < float(hi)


def _frozen_tracker_run(truth: LinRegTruth, micro: int, k: int, steps: int, seed: int = 3):
    model = nn.Linear(truth.d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(truth.w0[None])
    tracker = GradNoiseTracker(model, statistics=("b_simple", "gr_s"), mode="swap").attach()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model.zero_grad()
        tracker.begin_step()
        for _ in range(k):
            x, y = truth.sample(micro, g)
            tracker.begin_group(scale=float(k), size=micro)
            ((model(x).squeeze(-1) - y).square().mean() / 2 / k).backward()
            tracker.end_group()
        yield tracker.finish_step(loss_divisor=k, summarize=True)


def check_in_range(summary: dict) -> None:
    for key in ("b_simple", "b_simple_lo", "b_simple_hi"):
        assert math.isnan(summary[key]) or summary[key] >= 0, (key, summary[key])
    for key in ("gr_s", "gr_s_lo", "gr_s_hi"):
        assert math.isnan(summary[key]) or 0 < summary[key] <= 1, (key, summary[key])
    if not math.isnan(summary["b_simple"]):
        assert summary["b_simple_lo"] <= summary["b_simple"] <= summary["b_simple_hi"]
        assert summary["gr_s_lo"] <= summary["gr_s"] <= summary["gr_s_hi"]
    for key in ("grad_sq", "trace_cov"):
        assert summary[key] >= 0, key
        if not math.isnan(summary[f"{key}_lo"]):  # NaN until a spread is seen (two steps)
            assert 0 <= summary[f"{key}_lo"] <= summary[key] <= summary[f"{key}_hi"], key


def test_readings_stay_in_range_from_the_first_step_with_micro_batches_of_4_and_k_2() -> None:
    truth = LinRegTruth(d=8)
    summaries = list(_frozen_tracker_run(truth, micro=4, k=2, steps=400))
    for s in summaries:
        check_in_range(s)
    assert math.isnan(summaries[0]["b_simple"])  # one step: no spread seen, nothing determined
    assert not math.isnan(summaries[-1]["b_simple"])
    assert summaries[-1]["b_simple_lo"] <= truth.b_simple <= summaries[-1]["b_simple_hi"] * 1.25


def test_readings_stay_in_range_on_a_frozen_real_data_model() -> None:
    """Digits, a small MLP frozen at its initialization, micro-batches of 4 drawn with replacement,
    k = 2: every logged value in range, and the final interval holds the exact population value
    from all per-sample gradients (float64)."""
    x_all, y_all = digits()
    x_all = x_all.double()
    model = digits_mlp().double()
    b_true = exact_b_simple(per_sample_grads(model, x_all, y_all))

    tracker = GradNoiseTracker(model, statistics=("b_simple", "gr_s"), mode="swap", ema_decay=0.99).attach()
    g = torch.Generator().manual_seed(1)
    k, micro = 2, 4
    last = None
    for step in range(1500):
        model.zero_grad()
        tracker.begin_step()
        for _ in range(k):
            idx = torch.randint(len(x_all), (micro,), generator=g)
            tracker.begin_group(scale=float(k), size=micro)
            (nn.functional.cross_entropy(model(x_all[idx]), y_all[idx]) / k).backward()
            tracker.end_group()
        summary = tracker.finish_step(loss_divisor=k, summarize=step < 50 or step % 10 == 0)
        if summary is not None:
            check_in_range(summary)
            last = summary
    assert last is not None and last["b_simple_lo"] <= b_true <= last["b_simple_hi"], (last, b_true)


def test_the_batch_rule_waits_while_the_interval_reaches_into_the_band() -> None:
    c = BatchSizeController(unit=8, min_batch=8, max_batch=1024, cooldown=0)
    # the point says "grow", the interval does not: wait
    d = c.decide(0.9, 64, step=10, interval=(0.55, 0.97))
    assert not d.changed and "interval" in d.reason
    d = c.decide(0.9, 64, step=11, interval=(0.7, 0.97))
    assert d.changed and d.value > 64
    # unbounded B_simple, or none: nothing to act on
    assert not c.decide_from_noise_scale(40.0, 64, step=20, interval=(5.0, math.inf)).changed
    assert not c.decide_from_noise_scale(float("nan"), 64, step=21).changed
    assert not c.decide_from_noise_scale(-13.0, 64, step=22).changed


def test_the_batch_adapter_does_not_run_away_on_early_readings() -> None:
    """Micro-batches of 4, 2 groups (the set-up where out-of-range early readings once grew the
    batch from 8 to 256 in 16 steps): every decision rests on an interval outside the band."""
    namespace = "lightning.pytorch"
    truth = LinRegTruth(d=8, seed=0)  # B_simple about 13: batch 8 is inside the band's range
    logger = recording_logger(namespace)
    monitor = GradNoiseMonitor(statistics=("b_simple", "gr_s"), log_every_n_steps=1)
    adapter = BatchSizeAdapter(cooldown=2, max_factor=8)
    model = linreg_module(namespace, truth, lr=0.0, batch=4, n_batches=2 * 40)
    ns(namespace).Trainer(**trainer_kwargs(accumulate_grad_batches=2, callbacks=[monitor, adapter], logger=logger)).fit(model)
    for _, reason in adapter.decisions:
        assert "interval" in reason, reason
    sizes = [v for _, v in logger.series("gradnoise/batch_size")]
    assert len(sizes) >= 30 and max(sizes) <= 64, sizes
    for _, row in logger.rows:
        gs = row.get("gradnoise/gr_s", math.nan)
        assert math.isnan(gs) or 0 < gs <= 1
        bs = row.get("gradnoise/b_simple", math.nan)
        assert math.isnan(bs) or bs >= 0


def test_gr_t_interval_covers_the_frozen_steady_state() -> None:
    """Frozen model, i.i.d. step gradients G + noise: GR_T's nominal 90% interval covers
    E|v_hat|_1 / E|m_hat|^2 (gr_t_frozen) in 85-95% of 300 runs late (300 steps, beyond 15
    effective steps), and in at least 85% early (20 steps; conservative there)."""
    from lightning_gradnoise.stats import TemporalRedundancy, gr_t_frozen

    d, runs = 20, 300
    G = torch.full((d,), 0.3, dtype=torch.float64)
    for steps, (low, high) in ((300, (0.85, 0.95)), (20, (0.85, 1.0))):
        gen = torch.Generator().manual_seed(steps)
        truth = float(gr_t_frozen(d / float(G.square().sum()), 0.9, steps))
        # the runs as the tensors of one tracker: each tensor's interval is its own run's
        trackers = TemporalRedundancy(0.9)
        for _ in range(steps):
            noise = torch.randn(runs, d, generator=gen, dtype=torch.float64)
            trackers.update(list(G + noise))
        r = trackers.reading()
        covered = ((r["layer_gr_t_lo"] <= truth) & (truth <= r["layer_gr_t_hi"])).double().mean()
        assert low <= float(covered) <= high, (steps, float(covered))


def test_the_learning_rate_rule_waits_while_gr_t_s_interval_reaches_the_band() -> None:
    c = LRController(target=20.0, tolerance=1.5, cooldown=0)
    assert not c.decide(40.0, 1.0, step=10, interval=(25.0, 60.0)).changed  # 25 < 30: wait
    assert "interval" in c.decide(40.0, 1.0, step=11, interval=(25.0, 60.0)).reason
    assert c.decide(40.0, 1.0, step=12, interval=(31.0, 60.0)).value < 1.0  # wholly above: lower
    assert not c.decide(8.0, 1.0, step=20, interval=(5.0, math.inf)).changed  # unbounded: nothing yet
    assert c.decide(8.0, 1.0, step=21, interval=(5.0, 12.0)).value > 1.0  # wholly below 13.3: raise
