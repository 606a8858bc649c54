"""Fine-tuning strategies, one module each, all driven by the backbone's layer groups."""
from trainables.strategies.base import STRATEGIES, Strategy
from trainables.strategies import gradual_unfreeze, unfreeze_last  # noqa: F401  (they register themselves)

__all__ = ["STRATEGIES", "Strategy"]
