"""lightning_gradnoise: is your batch size and learning rate right for the gradient noise of your problem?

Layers (each imports only those below it):

1. :mod:`lightning_gradnoise.stats`, :mod:`lightning_gradnoise.scaling`,
   :mod:`lightning_gradnoise.nqm`, :mod:`lightning_gradnoise.control`: pure math on tensors.
2. :mod:`lightning_gradnoise.capture`: gradient moments from autograd hooks (plain PyTorch).
3. :mod:`lightning_gradnoise.optim`: optimizers (torch only).
4. :mod:`lightning_gradnoise.callbacks`, :mod:`lightning_gradnoise.strategies`: Lightning glue.

Importing the package loads none of them: each public name loads its layer when first used, so
the ``gradnoise`` command and the math layers never pay for Lightning's import. The ``gnddp``
strategy names are registered in each Lightning namespace when that namespace is imported
(or at once, if it already is).
"""

from __future__ import annotations

from lightning_gradnoise._lazy import lazy_names
from lightning_gradnoise._registration import install as _install_registration

__version__ = "0.1.0"

_WHERE = {
    "BatchSizeAdapter": "callbacks",
    "GradNoiseMonitor": "callbacks",
    "LRAdapter": "callbacks",
    "MisconfigurationError": "callbacks",
    "VRMoments": "callbacks",
    "GradNoiseDDPStrategy": "strategies",
    "GradNoiseTracker": "capture",
    "GradientMomentCollector": "capture",
    "create_optimizer": "optim",
    "list_optimizers": "optim",
}

__all__ = sorted([*_WHERE, "__version__"])


__getattr__, __dir__ = lazy_names(__name__, _WHERE)


_install_registration()
