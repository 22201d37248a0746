"""``create_optimizer``: every optimizer of the package by name; the registry is data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Union

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_gradnoise._validate import check_bool, fail
from lightning_gradnoise.optim._checks import check_params
from lightning_gradnoise.optim._lamb_lars import LAMB, LARS
from lightning_gradnoise.optim._vr import vr_optimizer_class

__all__ = ["OptimizerSpec", "REGISTRY", "create_optimizer", "list_optimizers", "VRSGD", "VRMomentum", "VRAdam", "VRAdamW", "VRLAMB", "VRLARS"]


@dataclass(frozen=True)
class OptimizerSpec:
    """One registered optimizer: its class, its default arguments and a line about it."""

    cls: type
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        if not (isinstance(self.cls, type) and issubclass(self.cls, Optimizer)):
            fail("cls", self.cls, "a torch.optim.Optimizer subclass", TypeError)
        if not isinstance(self.defaults, dict):
            fail("defaults", self.defaults, "a dict of keyword arguments", TypeError)
        if not isinstance(self.description, str):
            fail("description", self.description, "a string", TypeError)


VRSGD = vr_optimizer_class(torch.optim.SGD, "VRSGD", beta3_default=None)
VRMomentum = vr_optimizer_class(torch.optim.SGD, "VRMomentum", beta3_default=0.9)
VRAdam = vr_optimizer_class(torch.optim.Adam, "VRAdam", beta3_default=0.9)
VRAdamW = vr_optimizer_class(torch.optim.AdamW, "VRAdamW", beta3_default=0.9)
VRLAMB = vr_optimizer_class(LAMB, "VRLAMB", beta3_default=0.9)
VRLARS = vr_optimizer_class(LARS, "VRLARS", beta3_default=0.9)

REGISTRY: dict[str, OptimizerSpec] = {
    "sgd": OptimizerSpec(torch.optim.SGD, {"lr": 0.1}, "plain SGD"),
    "momentum": OptimizerSpec(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, "SGD with heavy-ball momentum"),
    "adam": OptimizerSpec(torch.optim.Adam, {"lr": 1e-3, "betas": (0.9, 0.999)}, "Adam"),
    "adamw": OptimizerSpec(torch.optim.AdamW, {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.01}, "AdamW"),
    "lamb": OptimizerSpec(LAMB, {"lr": 1e-3, "betas": (0.9, 0.999)}, "LAMB (You et al. 2020)"),
    "lars": OptimizerSpec(LARS, {"lr": 1.0, "momentum": 0.9, "trust_coefficient": 0.001}, "LARS (You et al. 2017)"),
    "vr_sgd": OptimizerSpec(VRSGD, {"lr": 0.1, "gamma": 0.1, "beta3": None}, "VR-SGD (VRGD Alg. 1)"),
    "vr_momentum": OptimizerSpec(VRMomentum, {"lr": 0.1, "momentum": 0.9, "gamma": 0.1, "beta3": 0.9}, "VR-Momentum"),
    "vr_adam": OptimizerSpec(VRAdam, {"lr": 1e-3, "betas": (0.9, 0.999), "gamma": 0.1, "beta3": 0.9}, "VR-Adam (VRGD Alg. 3)"),
    "vr_adamw": OptimizerSpec(VRAdamW, {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.01, "gamma": 0.1, "beta3": 0.9}, "VR-AdamW"),
    "vr_lamb": OptimizerSpec(VRLAMB, {"lr": 1e-3, "betas": (0.9, 0.999), "gamma": 0.1, "beta3": 0.9}, "VR-LAMB (VRGD Alg. 5)"),
    "vr_lars": OptimizerSpec(VRLARS, {"lr": 1.0, "momentum": 0.9, "gamma": 0.1, "beta3": 0.9}, "VR-LARS"),
}


def list_optimizers() -> list[dict[str, Any]]:
    """Name, class, defaults and description of every registered optimizer."""
    return [{"name": n, "class": s.cls.__name__, "defaults": dict(s.defaults), "description": s.description} for n, s in REGISTRY.items()]


def create_optimizer(name: str, model_or_params: Union[nn.Module, Iterable], no_decay_on_bias_and_norm: bool = True, **kwargs: Any) -> Optimizer:
    """Build a registered optimizer with its defaults, overridden by ``kwargs``.

    Args:
        name: a key of :data:`REGISTRY` (case-insensitive, ``-`` or ``_``).
        model_or_params: a module, an iterable of parameters, or parameter groups (dicts).
        no_decay_on_bias_and_norm: given a module and a weight decay, put biases and
            normalization weights (tensors of one dimension) in a group with no weight decay.

    Examples:
        >>> opt = create_optimizer("vr_adam", torch.nn.Linear(4, 2), lr=3e-4)
        >>> type(opt).__name__, opt.defaults["lr"]
        ('VRAdam', 0.0003)
    """
    if not isinstance(name, str):
        fail("name", name, "an optimizer name, one of: " + ", ".join(REGISTRY), TypeError)
    key = name.lower().replace("-", "_")
    if key not in REGISTRY:
        fail("name", name, "an optimizer name, one of: " + ", ".join(REGISTRY))
    check_bool("no_decay_on_bias_and_norm", no_decay_on_bias_and_norm)
    if not isinstance(model_or_params, nn.Module):
        try:
            model_or_params = check_params(model_or_params)
        except (TypeError, ValueError) as e:
            raise type(e)(str(e).replace("params", "model_or_params", 1) + " or a module") from None
    spec = REGISTRY[key]
    options = {**spec.defaults, **kwargs}
    if isinstance(model_or_params, nn.Module):
        params = [p for p in model_or_params.parameters() if p.requires_grad]
        if no_decay_on_bias_and_norm and options.get("weight_decay"):
            decay = [p for p in params if p.dim() > 1]
            no_decay = [p for p in params if p.dim() <= 1]
            groups = [{"params": decay}] + ([{"params": no_decay, "weight_decay": 0.0}] if no_decay else [])
            return spec.cls(groups, **options)
        return spec.cls(params, **options)
    return spec.cls(model_or_params, **options)
