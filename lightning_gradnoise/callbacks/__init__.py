"""Layer 4: Lightning callbacks (thin: the decisions live in plain methods)."""

from lightning_gradnoise.callbacks._adapt import BatchSizeAdapter, scale_learning_rate
from lightning_gradnoise.callbacks._lr import LRAdapter
from lightning_gradnoise.callbacks._monitor import GradNoiseMonitor, MisconfigurationError
from lightning_gradnoise.callbacks._vr_moments import VRMoments

__all__ = ["BatchSizeAdapter", "GradNoiseMonitor", "LRAdapter", "MisconfigurationError", "VRMoments", "scale_learning_rate"]

from lightning_gradnoise._registration import flush as _flush  # noqa: E402

_flush(__name__)
