"""Scaling laws against their closed forms, the fit against known parameters, the surge."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_gradnoise.nqm import NQM
from lightning_gradnoise.scaling import (
    eps_opt_adam,
    eps_opt_sgd,
    fit_b_noise,
    fit_eps_max,
    lr_scale_factor,
    plan_batch_sizes,
    sign_b_noise,
    sign_optimal_lr,
    steps_for_examples,
)


def test_rules_against_closed_forms() -> None:
    b = torch.logspace(0, 6, 50, dtype=torch.float64)
    bn, emax = 1000.0, 0.3
    assert torch.allclose(eps_opt_sgd(b, bn, emax), emax * b / (b + bn))  # McCandlish Eq. 2.7
    adam = eps_opt_adam(b, bn, emax)  # Surge Eq. 2
    assert torch.allclose(adam, 2 * emax / ((bn / b).sqrt() + (b / bn).sqrt()))
    assert float(eps_opt_adam(bn, bn, emax)) == pytest.approx(emax)  # peak at B_noise
    assert bool((eps_opt_sgd(b, bn).diff() > 0).all())
    # Surge Eq. 4: sqrt scaling for B << B_noise; McCandlish: linear for B << B_noise
    assert float(lr_scale_factor("adam", 1, 4, 1e8)) == pytest.approx(2.0, rel=1e-3)
    assert float(lr_scale_factor("sgd", 1, 4, 1e8)) == pytest.approx(4.0, rel=1e-3)
    assert float(lr_scale_factor("adam", 1000, 4000, 1000)) < 1.0  # past the peak it falls
    with pytest.raises(ValueError, match="rule"):
        lr_scale_factor("lion", 1, 2, 3)


def test_fit_recovers_known_parameters_from_noisy_runs() -> None:
    # runs generated from S = S_min (1 + B_noise/B), E = S B, with 3% noise on the steps
    g = torch.Generator().manual_seed(0)
    s_min, b_noise = 2500.0, 640.0
    batch = torch.tensor([16.0, 32, 64, 128, 256, 512, 1024, 2048, 4096])
    steps = s_min * (1 + b_noise / batch) * (1 + 0.03 * torch.randn(batch.shape, generator=g, dtype=torch.float64))
    fit = fit_b_noise(steps, steps * batch)
    assert fit.b_noise == pytest.approx(b_noise, rel=0.1)
    assert fit.s_min == pytest.approx(s_min, rel=0.1)
    assert fit.b_crit == pytest.approx(fit.b_noise) and fit.r2 > 0.95
    # the trade-off curve (Eq. 2.11): (S/S_min - 1)(E/E_min - 1) = 1 on the fitted model
    e = fit.examples(batch)
    s = steps_for_examples(e, fit.s_min, fit.e_min)
    assert torch.allclose((s / fit.s_min - 1) * (e / fit.e_min - 1), torch.ones_like(s))
    # eps_max back from the optimal learning rates (Surge Eq. 23/24)
    for rule, fn in (("adam", eps_opt_adam), ("sgd", eps_opt_sgd)):
        lrs = fn(batch, b_noise, 0.07)
        assert fit_eps_max(rule, lrs, batch, b_noise) == pytest.approx(0.07)
    with pytest.raises(ValueError, match="trade-off"):
        fit_b_noise([100.0, 100.0, 100.0], [1.0, 2.0, 4.0])


def test_planner_from_b_simple() -> None:
    rows = plan_batch_sizes(100.0, [25, 100, 400], reference=(100, 2000), seconds_per_step=lambda b: 0.01 * (1 + b / 100))
    assert [round(r["steps"]) for r in rows] == [5000, 2000, 1250]  # S_min = 1000
    assert rows[1]["examples/E_min"] == pytest.approx(2.0) and rows[1]["steps/S_min"] == pytest.approx(2.0)
    assert rows[0]["time"] == pytest.approx(5000 * 0.0125)
    with pytest.raises(ValueError, match="b_noise"):
        plan_batch_sizes(0.0, [1])


def surge_problem(d: int = 50, snr: float = 0.01, diag: float = 0.05):
    mu = torch.full((d,), snr, dtype=torch.float64)
    sigma = torch.ones(d, dtype=torch.float64)
    h = diag * torch.eye(d, dtype=torch.float64) + torch.ones(d, d, dtype=torch.float64) / d
    return mu, sigma, h


def test_surge_optimal_lr_rises_peaks_at_b_noise_then_falls() -> None:
    # Surge Theorem 3 / Eq. 15, in the regime B << pi sigma^2 / (2 mu^2) (here about 15700)
    mu, sigma, h = surge_problem()
    bn = sign_b_noise(mu, sigma, h)
    assert bn < math.pi / (2 * 0.01**2) / 10
    b = torch.logspace(0, 5, 500, dtype=torch.float64)
    lr = sign_optimal_lr(b, mu, sigma, h)
    peak = float(b[lr.argmax()])
    assert peak == pytest.approx(bn, rel=0.1)
    assert bool((lr[b < bn / 2].diff() > 0).all()) and bool((lr[b > 2 * bn].diff() < 0).all())
    # Theorem 3's closed form, Eq. 13, agrees where it holds
    r = mu / sigma
    eq13 = 1 / (0.5 * ((bn / b).sqrt() + (b / bn).sqrt())) * math.sqrt(bn / (2 * math.pi)) * float((mu * r).sum()) / float(h.diagonal().sum())
    near = (b > bn / 10) & (b < 2 * bn)  # Eq. 13 needs B << pi sigma^2/(2 mu^2)
    assert torch.allclose(lr[near], eq13[near], rtol=0.1)


def test_no_surge_for_sgd_or_a_diagonal_hessian() -> None:
    b = torch.logspace(0, 5, 200, dtype=torch.float64)
    # SGD on the NQM: the best learning rate rises monotonically with the batch
    _, lr = NQM.paper(d=2000, bins=60).best_lr(2.0 ** torch.arange(0, 14, dtype=torch.float64), 0.01)
    assert bool((lr.diff() > -1e-3 * lr[1:]).all())
    # the sign model with no off-diagonal curvature saturates instead of peaking
    mu, sigma, _ = surge_problem()
    lr_diag = sign_optimal_lr(b, mu, sigma, 0.5 * torch.eye(50, dtype=torch.float64))
    assert bool((lr_diag.diff() >= 0).all()) and math.isinf(sign_b_noise(mu, sigma, torch.eye(50)))
