"""Layer 3: optimizers (torch only): LAMB, LARS, the GSNR transformation and the VR variants, a factory."""

from lightning_gradnoise.optim._factory import (
    REGISTRY,
    VRLAMB,
    VRLARS,
    VRSGD,
    OptimizerSpec,
    VRAdam,
    VRAdamW,
    VRMomentum,
    create_optimizer,
    list_optimizers,
)
from lightning_gradnoise.optim._lamb_lars import LAMB, LARS
from lightning_gradnoise.optim._vr import GSNRScaling, vr_optimizer_class

__all__ = [
    "GSNRScaling",
    "LAMB",
    "LARS",
    "OptimizerSpec",
    "REGISTRY",
    "VRAdam",
    "VRAdamW",
    "VRLAMB",
    "VRLARS",
    "VRMomentum",
    "VRSGD",
    "create_optimizer",
    "list_optimizers",
    "vr_optimizer_class",
]
