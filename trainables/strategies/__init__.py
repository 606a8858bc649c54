"""Fine-tuning strategies, one module each, all driven by the backbone's layer groups.

A strategy is one module of this package: it registers itself with its config model
(``@STRATEGIES.register(name, config=...)``) and is imported by this package on its own.
"""
from trainables.registry import import_all
from trainables.strategies.base import STRATEGIES, Strategy

import_all(__name__, __path__)

__all__ = ["STRATEGIES", "Strategy"]
