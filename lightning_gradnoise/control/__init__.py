"""Layer 1: the auto-tuning decisions as plain objects (no Lightning import)."""

from lightning_gradnoise.control._controllers import (
    ADAM_STYLE,
    SGD_STYLE,
    BatchSizeController,
    Decision,
    LRController,
    gr_t_target,
    lr_rule_for,
)

__all__ = ["ADAM_STYLE", "SGD_STYLE", "BatchSizeController", "Decision", "LRController", "gr_t_target", "lr_rule_for"]
