"""lightning_gradnoise: is your batch size and learning rate right for the gradient noise of your problem?

Layers (each imports only those below it):

1. :mod:`lightning_gradnoise.stats`, :mod:`lightning_gradnoise.nqm`: pure math on tensors.
2. :mod:`lightning_gradnoise.capture`: gradient moments from autograd hooks (plain PyTorch).
3. :mod:`lightning_gradnoise.optim`: optimizers (torch only).
4. :mod:`lightning_gradnoise.callbacks`: Lightning glue.
"""

from lightning_gradnoise.callbacks import BatchSizeAdapter, GradNoiseMonitor, LRAdapter, MisconfigurationError, VRMoments
from lightning_gradnoise.capture import GradientMomentCollector, GradNoiseTracker
from lightning_gradnoise.optim import create_optimizer, list_optimizers
from lightning_gradnoise.strategies import GradNoiseDDPStrategy, register_strategies

register_strategies()

__version__ = "0.1.0"

__all__ = [
    "BatchSizeAdapter",
    "GradNoiseDDPStrategy",
    "GradNoiseMonitor",
    "GradNoiseTracker",
    "GradientMomentCollector",
    "LRAdapter",
    "MisconfigurationError",
    "VRMoments",
    "__version__",
    "create_optimizer",
    "list_optimizers",
]
