"""Loss components summed into the training step (see base.py): one module each, imported by
this package on its own."""
from trainables.losses.base import LOSSES, SEMI, LossComponent
from trainables.registry import import_all

import_all(__name__, __path__)

__all__ = ["LOSSES", "SEMI", "LossComponent"]
