"""Layer 1: scaling laws of learning rate and steps against batch size (pure math, no Lightning).

Each name loads its module when first used, so importing this package is free until then.
"""

from lightning_gradnoise._lazy import lazy_names

_WHERE = {
    "eps_opt": "_laws",
    "eps_opt_adam": "_laws",
    "eps_opt_sgd": "_laws",
    "fit_b_noise": "_laws",
    "fit_eps_max": "_laws",
    "lr_scale_factor": "_laws",
    "plan_batch_sizes": "_plan",
    "RULES": "_laws",
    "sign_b_noise": "_sign",
    "sign_expectation": "_sign",
    "sign_loss_improvement": "_sign",
    "sign_optimal_lr": "_sign",
    "steps_for_examples": "_laws",
    "TradeoffFit": "_laws",
}

__all__ = sorted(_WHERE)

__getattr__, __dir__ = lazy_names(__name__, _WHERE)
