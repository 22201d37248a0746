"""B_simple and its unbiased parts against closed forms (McCandlish et al. 2018, App. A)."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import LinRegTruth
from lightning_gradnoise.stats import (
    BiasCorrectedEMA,
    GradientNoiseScale,
    noise_scale_update,
    noise_scale_update_from_sums,
)


def linreg_group_grads(truth: LinRegTruth, k: int, b: int, steps: int, gen: torch.Generator) -> torch.Tensor:
    """[steps, k, d] exact group-mean gradients of the frozen linear regression."""
    x = torch.randn(steps, k, b, truth.d, generator=gen, dtype=torch.float64)
    e = truth.noise_std * torch.randn(steps, k, b, generator=gen, dtype=torch.float64)
    delta = truth.delta.to(torch.float64)
    resid = x @ delta - e
    return (x * resid[..., None]).mean(2)


def test_equal_groups_match_paper_formulas() -> None:
    # McCandlish App. A: |G|^2 = (B S_big - b S_small)/(B - b), tr = (S_small - S_big)/(1/b - 1/B)
    sq = torch.tensor([3.0, 5.0, 4.0, 8.0])
    big = torch.tensor(2.5)
    b, k = 16, 4
    B = b * k
    s = noise_scale_update(sq, big, group_sizes=b)
    s_small = float(sq.mean())
    assert float(s.grad_sq) == pytest.approx((B * 2.5 - b * s_small) / (B - b), rel=1e-12)
    assert float(s.trace_cov) == pytest.approx((s_small - 2.5) / (1 / b - 1 / B), rel=1e-12)


def test_unbiased_against_linear_regression_closed_form() -> None:
    truth = LinRegTruth(d=6, seed=3)
    gen = torch.Generator().manual_seed(0)
    k, b, steps = 4, 8, 20000
    g = linreg_group_grads(truth, k, b, steps, gen)
    sq = g.square().sum(-1)  # [steps, k]
    big = g.mean(1).square().sum(-1)
    est = noise_scale_update(sq.T, big, b)  # trailing dims are kept: all steps at once
    g2, tr = est.grad_sq, est.trace_cov
    # mean of unbiased per-step estimates: within 4 standard errors of the truth
    for values, target in ((g2, truth.grad_sq), (tr, truth.trace_cov)):
        se = float(values.std()) / math.sqrt(steps)
        assert abs(float(values.mean()) - target) < 4 * se, (float(values.mean()), target, se)
        assert 4 * se < 0.05 * target  # the test has the power to tell 5%
    assert float(tr.mean() / g2.mean()) == pytest.approx(truth.b_simple, rel=0.05)


def test_unequal_groups_stay_unbiased() -> None:
    # g_j ~ N(G, Sigma / b_j) with a known Sigma: the general weights a, c keep both unbiased
    torch.manual_seed(1)
    d, steps = 5, 40000
    G = torch.tensor([1.0, -0.5, 0.2, 0.0, 0.3], dtype=torch.float64)
    sd = torch.tensor([2.0, 1.0, 3.0, 0.5, 1.5], dtype=torch.float64)
    sizes = torch.tensor([8.0, 8.0, 8.0, 3.0], dtype=torch.float64)
    g = G + sd * torch.randn(steps, 4, d, dtype=torch.float64) / sizes.sqrt()[None, :, None]
    sq = g.square().sum(-1)
    big = g.mean(1).square().sum(-1)
    inv = float((1 / sizes).sum())
    s = noise_scale_update_from_sums(sq.sum(1), big, 4, inv)
    for values, target in ((s.grad_sq, float(G.square().sum())), (s.trace_cov, float(sd.square().sum()))):
        se = float(values.std()) / math.sqrt(steps)
        assert abs(float(values.mean()) - target) < 4 * se


def test_ratio_of_emas_converges_and_ratio_of_steps_is_biased() -> None:
    truth = LinRegTruth(d=6, seed=3)
    gen = torch.Generator().manual_seed(5)
    k, b, steps = 4, 8, 8000
    g = linreg_group_grads(truth, k, b, steps, gen)
    gns = GradientNoiseScale(decay=0.999)
    ratio_ema = BiasCorrectedEMA(0.999)
    for t in range(steps):
        sq, big = g[t].square().sum(-1), g[t].mean(0).square().sum()
        gns.update(sq, big, b)
        s = noise_scale_update(sq, big, b)
        ratio_ema.update(s.trace_cov / s.grad_sq)
    assert float(gns.compute()) == pytest.approx(truth.b_simple, rel=0.05)
    # the pitfall MATH.md warns of: an EMA of per-step ratios is badly biased (here by > 30%)
    assert abs(float(ratio_ema.compute()) - truth.b_simple) / truth.b_simple > 0.3


def test_per_layer_values_sum_to_whole_model() -> None:
    torch.manual_seed(0)
    sq = torch.rand(4, 3) + 1
    big = torch.rand(3)
    per_layer = noise_scale_update(sq, big, 10)
    whole = noise_scale_update(sq.sum(1), big.sum(), 10)
    assert torch.allclose(per_layer.grad_sq.sum(), whole.grad_sq)
    assert torch.allclose(per_layer.trace_cov.sum(), whole.trace_cov)


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.tensor([1.0]), torch.tensor(1.0), 4), "at least 2 groups"),
        ((torch.tensor([1.0, 2.0]), torch.tensor(1.0), [4, 4, 4]), "3 entries but there are 2 groups"),
        ((torch.tensor([1.0, 2.0]), torch.tensor(1.0), [4, 0]), "must be positive"),
    ],
)
def test_bad_input_names_the_problem(args, match) -> None:
    with pytest.raises(ValueError, match=match):
        noise_scale_update(*args)


def test_ema_bias_correction_and_non_finite() -> None:
    ema = BiasCorrectedEMA(0.9)
    assert math.isnan(float(ema.compute()))
    for _ in range(3):
        assert ema.update(torch.tensor([2.0, 4.0]))
    assert torch.allclose(ema.compute(), torch.tensor([2.0, 4.0], dtype=torch.float64))
    before = ema.compute().clone()
    assert not ema.update(torch.tensor([float("inf"), 1.0]))
    assert not ema.update(torch.tensor([float("nan"), 1.0]))
    assert torch.equal(ema.compute(), before) and ema.rejected == 2 and ema.count == 3
    # exact EMA by hand: s = (1-b) sum b^(t-i) x_i, corrected by 1 - b^t
    ema2, xs = BiasCorrectedEMA(0.5), [1.0, 3.0, 2.0]
    for x in xs:
        ema2.update(torch.tensor(x))
    s = sum(0.5 * 0.5 ** (2 - i) * x for i, x in enumerate(xs))
    assert float(ema2.compute()) == pytest.approx(s / (1 - 0.5**3))
    clone = BiasCorrectedEMA(0.1)
    clone.load_state_dict(ema2.state_dict())
    assert float(clone.compute()) == float(ema2.compute()) and clone.decay == 0.5


def test_the_float_update_gives_the_bits_of_the_tensor_update() -> None:
    # LRAdapter feeds its step-ratio moments one step at a time: in floats, to the same bits
    from lightning_gradnoise.stats._interval import EMAMoments

    g = torch.Generator().manual_seed(0)
    xs = (torch.randn(300, generator=g, dtype=torch.float64) * 10 ** (torch.rand(300, generator=g) * 10 - 5)).tolist()
    ys = (torch.randn(300, generator=g, dtype=torch.float64) * 3 + 1).tolist()
    xs[7], ys[40] = math.inf, math.nan
    by_tensor, by_float = EMAMoments(0.9), EMAMoments(0.9)
    for i, (x, y) in enumerate(zip(xs, ys)):
        by_tensor.update_many(torch.tensor([x], dtype=torch.float64), torch.tensor([y], dtype=torch.float64))
        assert by_float.update(x, y) == (math.isfinite(x) and math.isfinite(y))
        if i % 37 == 0:
            for mine, theirs in ((by_float.means(), by_tensor.means()), (by_float.mean_covariance(), by_tensor.mean_covariance())):
                assert all(torch.equal(a, b) or (a.isnan() and b.isnan()) for a, b in zip(mine, theirs))
    for key in ("x", "y", "xx", "yy", "xy"):
        a, b = by_tensor.ema(key), by_float.ema(key)
        assert (a.count, a.rejected) == (b.count, b.rejected) and torch.equal(a.state_dict()["sum"], b.state_dict()["sum"])
    # a float-fed average saves as a tensor, resumes, and mixes with tensor updates
    ema = BiasCorrectedEMA(0.5)
    assert ema.update_float(1.0) and not ema.update_float(math.inf) and ema.rejected == 1
    clone = BiasCorrectedEMA(0.5)
    clone.load_state_dict(ema.state_dict())
    assert clone.update_float(3.0) and ema.update(torch.tensor(3.0))
    assert float(clone.compute()) == float(ema.compute()) == pytest.approx((0.25 * 1 + 0.5 * 3) / 0.75)
    vector = BiasCorrectedEMA(0.5)
    vector.update(torch.ones(2))
    with pytest.raises(ValueError, match="shape"):
        vector.update_float(1.0)


@pytest.mark.parametrize("decay", [-0.1, 1.0, 2])
def test_ema_rejects_bad_decay(decay) -> None:
    with pytest.raises(ValueError, match="decay"):
        BiasCorrectedEMA(decay)
