"""GR_S and GR_T against GR-Gauge's lemmas and exact closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import LinRegTruth
from lightning_gradnoise.stats import (
    TemporalRedundancy,
    batch_range_for_gr_s,
    gr_s,
    gr_s_groups,
    gr_t_expected,
    ema_effective_steps,
    gr_t_frozen,
    mu_from_gr_s_groups,
)


def per_sample_grads(truth: LinRegTruth, n: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, truth.d, generator=gen, dtype=torch.float64)
    e = truth.noise_std * torch.randn(n, generator=gen, dtype=torch.float64)
    return x * (x @ truth.delta.double() - e)[:, None]


def test_lemma2_per_sample_gr_s_matches_expectation() -> None:
    # GR-Gauge Def. 2 / Lemma 2 (Eq. 25-28): E[sum_i |g_i|^2] / E[|sum_i g_i|^2] = (1 + mu)/(B + mu)
    truth = LinRegTruth(d=6, seed=2)
    gen = torch.Generator().manual_seed(0)
    B, steps = 32, 6000
    g = per_sample_grads(truth, B * steps, gen).view(steps, B, -1)
    num = g.square().sum((1, 2))
    den = g.sum(1).square().sum(-1)
    expected = float(gr_s(truth.b_simple, B))
    assert float(num.mean() / den.mean()) == pytest.approx(expected, rel=0.03)


def test_appendix_d_group_estimate_inverts_to_mu() -> None:
    # App. D Eq. 33-34: E[xi_k] = (1 + mu/b)/(k + mu/b) and mu = b((k-1)/(1-xi_k) - k)
    mu, b, k = 37.0, 8, 4
    xi = (1 + mu / b) / (k + mu / b)
    assert float(mu_from_gr_s_groups(xi, k, b)) == pytest.approx(mu, rel=1e-12)
    truth = LinRegTruth(d=6, seed=2)
    gen = torch.Generator().manual_seed(1)
    steps = 8000
    g = per_sample_grads(truth, steps * k * b, gen).view(steps, k, b, -1).mean(2)
    num = g.square().sum((1, 2)).mean()
    den = g.sum(1).square().sum(-1).mean()
    xi_hat = num / den
    # the per-step helper is the same ratio
    t0 = gr_s_groups(g[0].square().sum(-1), g[0].mean(0).square().sum())
    assert float(t0) == pytest.approx(float(g[0].square().sum() / g[0].sum(0).square().sum()), rel=1e-12)
    assert float(mu_from_gr_s_groups(xi_hat, k, b)) == pytest.approx(truth.b_simple, rel=0.1)


def test_batch_range_inverts_lemma2_and_theorem2_direction() -> None:
    for mu in (3.0, 100.0, 5000.0):
        lo, hi = batch_range_for_gr_s(mu, (0.5, 0.65))
        assert float(gr_s(mu, lo)) == pytest.approx(0.65)
        assert float(gr_s(mu, hi)) == pytest.approx(0.5)
        # Theorem 2: GR_S falls as B grows
        bs = torch.linspace(1, 10 * mu, 50)
        assert bool((gr_s(mu, bs).diff() < 0).all())
    with pytest.raises(ValueError, match="band"):
        batch_range_for_gr_s(10.0, (0.7, 0.6))


def eq19_direct(r: float, x: float, beta: float = 0.9) -> float:
    """Eq. 19 transcribed as printed."""
    t = 1 / (1 - beta)
    q = 1 - 2 * x / (1 + r)
    num = (1 + r) ** 2 * (1 - x - beta) ** 2 * (beta**t - q**t)
    den = (1 - beta) * (2 * x - (1 - beta) * (1 + r)) * (beta**t - (1 - x) ** t) ** 2
    return num / den


def test_lemma1_eq19_values_singularity_and_limits() -> None:
    # App. E: B = mu, eta = 1/(2 lambda), beta = 0.9 -> about 23 ("around 20")
    assert float(gr_t_expected(1.0, 0.5)) == pytest.approx(eq19_direct(1.0, 0.5), rel=1e-12)
    assert 22 < float(gr_t_expected(1.0, 0.5)) < 24
    for r, x in [(0.3, 0.2), (2.0, 0.4), (5.0, 0.01), (1.0, 0.9)]:
        assert float(gr_t_expected(r, x)) == pytest.approx(eq19_direct(r, x), rel=1e-9)
    # removable singularity at 2x = (1 - beta)(1 + r): continuous across it
    r = 2.0
    x0 = 0.1 * (1 + r) / 2
    vals = gr_t_expected(r, torch.tensor([x0 - 1e-4, x0, x0 + 1e-4], dtype=torch.float64))
    assert torch.isfinite(vals).all()
    assert float(vals[1]) == pytest.approx(0.5 * float(vals[0] + vals[2]), rel=1e-5)
    # eta -> 0 limit: (1 + r)/(1 - beta^(1/(1-beta)))
    assert float(gr_t_expected(r, 1e-10)) == pytest.approx((1 + r) / (1 - 0.9 ** (1 / 0.1)), rel=1e-6)
    # outside the model's validity: NaN, not a number that looks right
    assert math.isnan(float(gr_t_expected(1.0, 1.5)))


def test_theorem1_gr_t_rises_with_learning_rate() -> None:
    for r in (0.2, 1.0, 4.0):
        # Eq. 19 holds while q = 1 - 2x/(1+r) >= 0 and x <= 1
        x = torch.linspace(1e-3, min(0.999, (1 + r) / 2 - 1e-3), 200, dtype=torch.float64)
        vals = gr_t_expected(r, x)
        assert bool(torch.isfinite(vals).all()) and bool((vals.diff() > 0).all())


def test_theorem1_in_simulation_gr_t_rises_with_learning_rate_and_with_time() -> None:
    """SGD on a noisy quadratic (Hessian lambda I, gradient noise of trace r |G_0|^2), measured with
    the library's estimator: at every step count GR_T is higher at a higher learning rate
    (Theorem 1, Eq. 20). At a fixed rate it also rises as training goes on, since the signal
    decays toward the noise floor while the noise does not: holding GR_T at a target lowers the
    learning rate over a run. 20000 coordinates make each GR_T a sum over many, so one run per
    setting is enough: the steps asserted on are ratios of 1.25 or more in a trial run."""
    d, lam = 20000, 1.0
    for r in (0.5, 1.0, 4.0):
        curves = []
        for x in (0.05, 0.1, 0.2, 0.3, 0.5):  # lambda * eta
            gen = torch.Generator().manual_seed(1)
            theta = torch.ones(d, dtype=torch.float64)
            grt, values = TemporalRedundancy(beta=0.9), []
            for _ in range(40):
                grad = lam * theta + math.sqrt(r) * lam * torch.randn(d, generator=gen, dtype=torch.float64)
                grt.update([grad])
                theta = theta - (x / lam) * grad
                values.append(float(grt.compute()))
            curves.append(values)
        for t in (9, 19, 39):
            at_t = [c[t] for c in curves]
            assert all(b > a for a, b in zip(at_t, at_t[1:])), (r, t, at_t)
        for c in curves:
            assert c[39] > c[19] > c[9], (r, c[9], c[19], c[39])


def test_frozen_model_steady_state_by_simulation() -> None:
    # lr = 0: every step's gradient is i.i.d. N(G, Sigma/B); GR_T converges to the closed form.
    truth = LinRegTruth(d=6, seed=4)
    gen = torch.Generator().manual_seed(3)
    B, steps, burn = 16, 4000, 200
    grt = TemporalRedundancy(beta=0.9)
    vals = []
    g = per_sample_grads(truth, B * steps, gen).view(steps, B, -1).mean(1).float()
    for t in range(steps):
        grt.update([g[t]])
        if t >= burn:
            v1, m2 = grt.components()
            vals.append((float(v1.sum()), float(m2.sum())))
    v1 = sum(v for v, _ in vals) / len(vals)
    m2 = sum(m for _, m in vals) / len(vals)
    expected = float(gr_t_frozen(truth.b_simple / B, 0.9))
    assert v1 / m2 == pytest.approx(expected, rel=0.03)
    assert float(grt.compute()) > 1.0


def test_frozen_model_gr_t_of_a_young_ema_by_simulation() -> None:
    # lr = 0, t steps into the EMAs: E|v_hat|_1 = |G|^2 (1 + r), E|m_hat|^2 = |G|^2 (1 + r / n_t),
    # n_t = 1 / sum_i w_i^2 of the bias-corrected weights. Many independent runs, one TemporalRedundancy
    # each, all advanced together as the columns of one tensor (elementwise EMAs keep them apart).
    truth = LinRegTruth(d=6, seed=4)
    gen = torch.Generator().manual_seed(5)
    B, runs = 4, 3000
    grt = TemporalRedundancy(beta=0.9)
    for t in range(1, 31):
        g = per_sample_grads(truth, B * runs, gen).view(runs, B, -1).mean(1)  # [runs, d]
        grt.update([g])
        if t in (1, 3, 10, 30):
            corr = 1.0 - 0.9**t
            v1 = float(grt.v[0].sum()) / corr / runs
            m2 = float(grt.m[0].square().sum()) / corr**2 / runs
            assert v1 / m2 == pytest.approx(float(gr_t_frozen(truth.b_simple / B, 0.9, steps=t)), rel=0.04), t
    assert float(gr_t_frozen(truth.b_simple / B, 0.9, steps=10_000)) == pytest.approx(float(gr_t_frozen(truth.b_simple / B, 0.9)))
    # brute force: n_t from the weights themselves
    w = torch.tensor([0.1 * 0.9 ** (10 - i) for i in range(1, 11)], dtype=torch.float64) / (1 - 0.9**10)
    assert ema_effective_steps(0.9, 10) == pytest.approx(float(1 / w.square().sum()), rel=1e-12)
    with pytest.raises(ValueError, match="steps=0"):
        ema_effective_steps(0.9, 0)


def test_gr_t_matches_transcription_and_skips_non_finite() -> None:
    torch.manual_seed(0)
    grads = [[torch.randn(3, 2), torch.randn(4)] for _ in range(6)]
    grt = TemporalRedundancy(beta=0.8)
    m = [torch.zeros(3, 2), torch.zeros(4)]
    v = [torch.zeros(3, 2), torch.zeros(4)]
    for t, gs in enumerate(grads, start=1):
        grt.update(gs)
        for i, g in enumerate(gs):
            m[i] = 0.8 * m[i] + 0.2 * g
            v[i] = 0.8 * v[i] + 0.2 * g * g
        c = 1 - 0.8**t
        want = sum(float((vi / c).sum()) for vi in v) / sum(float((mi / c).square().sum()) for mi in m)
        assert float(grt.compute()) == pytest.approx(want, rel=1e-5)
    before = grt.compute()
    assert not grt.update([torch.full((3, 2), float("nan")), torch.zeros(4)])
    assert float(grt.compute()) == float(before) and grt.rejected == 1
    other = TemporalRedundancy(0.5)
    other.load_state_dict(grt.state_dict())
    assert float(other.compute()) == float(before)
