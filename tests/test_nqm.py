"""The noisy quadratic model against simulation and against the paper's findings (Zhang et al. 2019)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_gradnoise.nqm import NQM
from lightning_gradnoise.scaling import fit_b_noise

TARGET = 0.01


@pytest.fixture(scope="module")
def paper() -> NQM:
    return NQM.paper(d=10_000, bins=200)


def simulate(model: NQM, lr: float, batch: float, steps: int, n: int, momentum=0.0, precond=0.0, ema=0.0, seed=0):
    """Monte-Carlo trajectories of the same quadratic: E[risk] at ``steps`` and its standard error."""
    g = torch.Generator().manual_seed(seed)
    h, c = model.h, model.c
    theta = torch.randn(n, h.numel(), generator=g, dtype=torch.float64) * model.theta0_var.sqrt()
    prev, avg = theta.clone(), theta.clone()
    pinv = h ** (-precond)
    for _ in range(steps):
        noise = torch.randn(n, h.numel(), generator=g, dtype=torch.float64) * (c / batch).sqrt()
        new = theta - lr * pinv * (h * theta + noise) + momentum * (theta - prev)
        prev, theta = theta, new
        avg = ema * avg + (1 - ema) * theta
    x = avg if ema else theta
    risk = (0.5 * h * model.weight * x**2).sum(-1)
    return float(risk.mean()), float(risk.std() / math.sqrt(n))


@pytest.mark.parametrize(
    "opt", [dict(), dict(momentum=0.9), dict(momentum=0.5, precond=0.5), dict(ema=0.8), dict(precond=1.0)]
)
def test_closed_form_matches_monte_carlo(opt) -> None:
    # a small model (8 dimensions) and 4000 sampled trajectories per setting
    model = NQM(h=torch.logspace(0, -2, 8), c=torch.logspace(0, -2, 8))
    lr, batch, steps = 0.3, 4.0, 40
    mc, se = simulate(model, lr, batch, steps, n=4000, **opt)
    exact = float(model.risk(lr, batch, steps, **opt))
    assert abs(mc - exact) < 4 * se, (mc, exact, se)
    # the steady state too
    mc_long, se_long = simulate(model, lr, batch, 1500, n=4000, seed=1, **opt)
    assert abs(mc_long - float(model.risk(lr, batch, math.inf, **opt))) < 4 * se_long


def test_steps_to_target_is_the_first_crossing(paper) -> None:
    lr, batch = torch.tensor([0.05, 0.3]), torch.tensor([32.0, 512.0])
    steps = paper.steps_to_target(lr, batch, TARGET)
    assert bool(torch.isfinite(steps).all())
    assert bool((paper.risk(lr, batch, steps) <= TARGET).all())
    assert bool((paper.risk(lr, batch, steps - 1) > TARGET).all())
    # a learning rate whose steady state is above the target never gets there
    assert math.isinf(float(paper.steps_to_target(1.9, 1.0, TARGET)))


def test_perfect_scaling_then_diminishing_returns_and_linear_lr(paper) -> None:
    # Sec. 3.7, Fig. 3 and 4: steps halve as B doubles below the critical batch size; the best
    # learning rate of plain SGD grows linearly there; above it, returns diminish.
    batch = 2.0 ** torch.arange(0, 16, dtype=torch.float64)
    steps, lr = paper.best_lr(batch, TARGET)
    small = steps[:6]
    assert torch.allclose(small[1:] / small[:-1], torch.full((5,), 0.5, dtype=torch.float64), atol=0.01)
    assert torch.allclose(lr[1:6] / lr[:5], torch.full((5,), 2.0, dtype=torch.float64), rtol=0.02)
    assert float(steps[-1] / steps[-2]) > 0.9  # no benefit left at the largest batches
    assert paper.lower_bound_steps(batch, TARGET).le(steps * (1 + 1e-9)).all()


def critical_batch(model: NQM, **opt) -> float:
    batch = 2.0 ** torch.arange(0, 18, dtype=torch.float64)
    steps, _ = model.best_lr(batch, TARGET, **opt)
    return fit_b_noise(steps, steps * batch).b_crit


def test_critical_batch_grows_with_preconditioning_and_momentum_and_ema_lowers_it(paper) -> None:
    # Fig. 3a: momentum and larger p raise the critical batch size; Sec. 3.4 / Fig. 5: EMA lowers it
    plain = critical_batch(paper)
    assert critical_batch(paper, momentum=0.9) > 1.5 * plain
    by_power = [critical_batch(paper, precond=p) for p in (0.0, 0.25, 0.5)]
    assert by_power[0] < by_power[1] < by_power[2]
    assert critical_batch(paper, ema=0.9) < plain


def test_bad_arguments() -> None:
    model = NQM.paper(d=100, bins=10)
    with pytest.raises(ValueError, match="momentum"):
        model.risk(0.1, 1, 10, momentum=1.0)
    with pytest.raises(ValueError, match="precond"):
        model.risk(0.1, 1, 10, precond=2.0)
    with pytest.raises(ValueError, match="together"):
        model.risk(0.1, 1, 10, momentum=0.5, ema=0.5)
    with pytest.raises(ValueError, match="one value per entry of h"):
        NQM(h=torch.ones(3), c=torch.ones(2))
