"""Layer 1: scaling laws of learning rate and steps against batch size (pure math, no Lightning)."""

from lightning_gradnoise.scaling._laws import (
    RULES,
    TradeoffFit,
    eps_opt,
    eps_opt_adam,
    eps_opt_sgd,
    fit_b_noise,
    fit_eps_max,
    lr_scale_factor,
    plan_batch_sizes,
    steps_for_examples,
)
from lightning_gradnoise.scaling._sign import sign_b_noise, sign_expectation, sign_loss_improvement, sign_optimal_lr

__all__ = [
    "RULES",
    "TradeoffFit",
    "eps_opt",
    "eps_opt_adam",
    "eps_opt_sgd",
    "fit_b_noise",
    "fit_eps_max",
    "lr_scale_factor",
    "plan_batch_sizes",
    "sign_b_noise",
    "sign_expectation",
    "sign_loss_improvement",
    "sign_optimal_lr",
    "steps_for_examples",
]
