"""The ``train`` phase: epochs of fine-tuning (a trial without ``phases`` is one of these)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict

from trainables import metrics as M
from trainables.phases.base import PHASES

if TYPE_CHECKING:
    from trainables.trainable import FineTuneTrial


@PHASES.register("train")
class TrainPhase:
    """Epochs of fine-tuning with the phase's data, strategy, optimizer and losses."""

    def __init__(self, trial: "FineTuneTrial", index: int):
        self.trial, self.index = trial, index

    def run_epoch(self) -> Dict[str, float]:
        """One epoch: train, then evaluate on the validation split."""
        metrics = self.trial.train_one_epoch()
        metrics.update(self.trial.evaluate(M.VAL))
        return metrics

    def finish(self) -> Dict[str, float]:
        """At the phase's last epoch: the test split."""
        return self.trial.evaluate(M.TEST)
