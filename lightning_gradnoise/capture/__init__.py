"""Layer 2: moment capture from autograd hooks and the DDP comm hook (plain PyTorch, no Lightning)."""

from lightning_gradnoise.capture._collector import GradientMomentCollector, SharedCapture
from lightning_gradnoise.capture._comm import PACK_LIMIT, GradNoiseCommState, ReducedMoments, gradnoise_comm_hook
from lightning_gradnoise.capture._dist import destroy_process_group
from lightning_gradnoise.capture._per_example import SUPPORTED_MODULES, PerExampleCollector, uncovered_parameters
from lightning_gradnoise.capture._step_probe import StepProbe
from lightning_gradnoise.capture._tracker import STATISTICS, GradNoiseTracker, needs_groups, parse_statistics

__all__ = [
    "PACK_LIMIT",
    "STATISTICS",
    "GradNoiseCommState",
    "GradNoiseTracker",
    "GradientMomentCollector",
    "PerExampleCollector",
    "SharedCapture",
    "StepProbe",
    "SUPPORTED_MODULES",
    "ReducedMoments",
    "destroy_process_group",
    "gradnoise_comm_hook",
    "needs_groups",
    "parse_statistics",
    "uncovered_parameters",
]
