"""Layer 2: moment capture from autograd hooks (plain PyTorch, usable without Lightning)."""

from lightning_gradnoise.capture._collector import GradientMomentCollector
from lightning_gradnoise.capture._tracker import STATISTICS, GradNoiseTracker, parse_statistics

__all__ = ["STATISTICS", "GradNoiseTracker", "GradientMomentCollector", "parse_statistics"]
