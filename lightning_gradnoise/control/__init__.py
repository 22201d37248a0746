"""Layer 3: the auto-tuning decisions as plain objects (no Lightning import)."""

from lightning_gradnoise.control._controllers import (
    ADAM_STYLE,
    SGD_STYLE,
    BatchSizeController,
    Decision,
    LRController,
    gr_t_target,
    lr_rule_for,
)
from lightning_gradnoise.control._coupling import LINE_SEARCH_OPTIMIZERS, noise_coupling, step_growth
from lightning_gradnoise.control._step_size import StepSizeController

__all__ = [
    "ADAM_STYLE",
    "LINE_SEARCH_OPTIMIZERS",
    "SGD_STYLE",
    "BatchSizeController",
    "Decision",
    "LRController",
    "StepSizeController",
    "gr_t_target",
    "lr_rule_for",
    "noise_coupling",
    "step_growth",
]
