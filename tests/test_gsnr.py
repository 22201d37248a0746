"""Per-element GSNR (VRGD Eq. 2, 7-10) against per-sample autograd and the closed form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import LinRegTruth
from lightning_gradnoise.capture import GradientMomentCollector
from lightning_gradnoise.stats import gsnr, gsnr_layer_stats, gsnr_scale, gsnr_variance


def test_collector_moments_match_per_sample_brute_force() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    k, b = 4, 6
    x, y = torch.randn(k, b, 5), torch.randn(k, b, 3)
    loss_fn = lambda out, tgt: (out - tgt).square().sum(-1).mean()  # noqa: E731
    # brute force: every sample's gradient by its own backward
    per_sample = []
    for j in range(k):
        for i in range(b):
            model.zero_grad()
            loss_fn(model(x[j, i : i + 1]), y[j, i : i + 1]).backward()
            per_sample.append([p.grad.clone() for p in model.parameters()])
    group = [[torch.stack([per_sample[j * b + i][t] for i in range(b)]).mean(0) for t in range(4)] for j in range(k)]
    mean = [torch.stack([group[j][t] for j in range(k)]).mean(0) for t in range(4)]
    # hooks
    model.zero_grad()
    col = GradientMomentCollector(model, elementwise=True).attach()
    for j in range(k):
        col.begin_group(scale=float(k), size=b)
        (loss_fn(model(x[j]), y[j]) / k).backward()
        col.end_group()
    col.detach()
    want = torch.tensor([[float(g.square().sum()) for g in group[j]] for j in range(k)], dtype=torch.float64)
    assert torch.allclose(col.group_sq_norms(), want, rtol=1e-5)
    for t, p in enumerate(model.parameters()):
        assert torch.allclose(p.grad, mean[t] / 1.0, atol=1e-6)
        sq_sum = sum(group[j][t].square() for j in range(k))
        assert torch.allclose(col.elementwise_sq_sum()[t], sq_sum, rtol=1e-5, atol=1e-8)
        var = gsnr_variance(col.elementwise_sq_sum()[t], p.grad, k)
        want_var = sum((group[j][t] - mean[t]).square() for j in range(k)) / k
        assert torch.allclose(var, want_var, rtol=1e-3, atol=1e-7)


def test_variance_is_unbiased_for_group_spread_linear_regression() -> None:
    # E[(1/k) sum_j g_j^2 - g^2] = (k-1)/k * Sigma_ii / b  with Sigma_ii = |delta|^2 + delta_i^2 + s^2
    truth = LinRegTruth(d=5, seed=1)
    gen = torch.Generator().manual_seed(2)
    k, b, steps = 4, 8, 20000
    x = torch.randn(steps, k, b, truth.d, generator=gen, dtype=torch.float64)
    e = torch.randn(steps, k, b, generator=gen, dtype=torch.float64) * truth.noise_std
    g = (x * (x @ truth.delta.double() - e)[..., None]).mean(2)
    var = gsnr_variance(g.square().sum(1), g.mean(1), k)
    want = (k - 1) / k * truth.cov_diag.double() / b
    se = var.std(0) / steps**0.5
    assert bool(((var.mean(0) - want).abs() < 4 * se).all())


def test_gsnr_undefined_without_noise_and_layer_means() -> None:
    g = torch.tensor([1.0, 2.0, 0.0, 3.0])
    var = torch.tensor([1.0, 0.0, 0.0, 9.0])
    r = gsnr(g, var)
    assert r[0] == 1.0 and torch.isnan(r[1]) and torch.isnan(r[2]) and r[3] == 1.0
    sums, counts = gsnr_layer_stats([r, torch.tensor([4.0])])
    assert sums.tolist() == [2.0, 4.0] and counts.tolist() == [2.0, 1.0]
    with pytest.raises(ValueError, match="k=1"):
        gsnr_variance(g, g, 1)


def test_gsnr_scale_normalizes_per_layer_and_clamps() -> None:
    r = torch.tensor([0.01, 1.0, 2.0, 5.0, float("nan")])
    s = gsnr_scale(r, gamma=0.1)
    mean = (0.01 + 1 + 2 + 5) / 4
    want = torch.tensor([max(0.01 / mean, 0.1), 1 / mean, 2 / mean, 1.0, 1.0])
    assert torch.allclose(s, want)
    assert torch.equal(gsnr_scale(torch.full((3,), float("nan"))), torch.ones(3))
    with pytest.raises(ValueError, match="gamma"):
        gsnr_scale(r, gamma=0.0)


@pytest.mark.parametrize("k", [8, 16])
def test_flat_many_tensor_scaling_equals_per_tensor_definition(k: int) -> None:
    """From 8 groups the default is VRGD's Eq. 9 exactly: the layer mean."""
    from lightning_gradnoise.stats import gsnr_scale_many

    torch.manual_seed(3)
    groups = [torch.randn(k, 3, 5, dtype=torch.float64), torch.randn(k, 7, dtype=torch.float64), torch.zeros(k, 2, dtype=torch.float64)]
    grads = [gj.mean(0) for gj in groups]
    sq = [gj.square().sum(0) for gj in groups]
    flat = gsnr_scale_many(grads, sq, k, gamma=0.1)
    for f, g, s in zip(flat, grads, sq):
        want = gsnr_scale(gsnr(g, gsnr_variance(s, g, k)), gamma=0.1)
        assert torch.allclose(f, want, rtol=1e-12)
    assert torch.equal(flat[2], torch.ones(2, dtype=torch.float64))  # no noise: factor 1


def test_below_eight_groups_the_layer_median_keeps_the_factors_off_the_floor() -> None:
    """k = 2, 1000 elements of one layer with the same true GSNR: one step's g^2/sigma^2 has an
    infinite mean, so the layer mean is set by a few elements and most factors land on gamma
    (the learning rate cut by 10); the median keeps half of them at 1."""
    from lightning_gradnoise.stats import gsnr_scale_many

    gen = torch.Generator().manual_seed(0)
    k, n = 2, 1000
    groups = 0.3 + torch.randn(k, n, generator=gen, dtype=torch.float64)  # GSNR per group 0.09
    grads, sq = [groups.mean(0)], [groups.square().sum(0)]
    by_mean = gsnr_scale_many(grads, sq, k, gamma=0.1, normalizer="mean")[0]
    by_median = gsnr_scale_many(grads, sq, k, gamma=0.1)[0]  # auto: the median below 8 groups
    assert float((by_mean == 0.1).double().mean()) > 0.6
    assert float(by_mean.mean()) < 0.3
    assert float((by_median == 1.0).double().mean()) == pytest.approx(0.5, abs=0.01)
    assert float(by_median.mean()) > 0.6
    # at 8 groups and more, "auto" is the paper's mean
    groups8 = 0.3 + torch.randn(8, n, generator=gen, dtype=torch.float64)
    args = ([groups8.mean(0)], [groups8.square().sum(0)], 8)
    assert torch.equal(gsnr_scale_many(*args)[0], gsnr_scale_many(*args, normalizer="mean")[0])
