"""Layer 1: the noisy quadratic model (pure math on tensors, no Lightning import)."""

from lightning_gradnoise.nqm._model import NQM

__all__ = ["NQM"]
