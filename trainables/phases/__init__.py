"""Phase kinds, one module each (see base.py), imported by this package on its own."""
from trainables.phases.base import PHASES
from trainables.registry import import_all

import_all(__name__, __path__)

__all__ = ["PHASES"]
