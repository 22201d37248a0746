"""Layer 4: Lightning callbacks (thin: the decisions live in plain methods)."""

from lightning_gradnoise.callbacks._monitor import GradNoiseMonitor, MisconfigurationError

__all__ = ["GradNoiseMonitor", "MisconfigurationError"]
