"""Layer 4: the ``gnddp`` Lightning strategy (registered when ``lightning_gradnoise`` is imported)."""

from lightning_gradnoise.strategies._ddp import STRATEGY_NAMES, GradNoiseDDPStrategy, register_strategies, strategy_class

__all__ = ["STRATEGY_NAMES", "GradNoiseDDPStrategy", "register_strategies", "strategy_class"]

from lightning_gradnoise._registration import flush as _flush  # noqa: E402

_flush(__name__)
