"""The kinds of phase a trial may run, one after the other (``phases:`` in a spec).

A trial without ``phases`` is one ``train`` phase. Each phase sees the trial's sections with its
own overrides on top (``TrialSections.phase_sections``), shares the trial's model, and, when it
ends, logs its val and test metrics once more under ``<phase name>/`` (``probe/val/acc``). A
kind that does something else than epochs of fine-tuning (compression, a second task) is one
module of this package that registers its class, and its config model, in ``PHASES``: the
trial calls ``run_epoch`` for each of the phase's epochs and ``finish`` after the last.

Optional, for a phase that changes the model: ``start()`` runs as the phase is entered, before
the strategy's ``prepare`` and the optimizer (swap in a new head, prune); a true ``new_head``
lets the phase's data set have another number of classes; ``state_dict()`` goes into the
trial's checkpoint and ``load_state_dict(state)`` runs on resume before the weights load (so a
pruned model gets its shapes back); a true ``complete_checkpoints`` saves every weight in the
phase's checkpoints (weights that no longer match their pretrained source). ``finish`` may
return text under ``artifact:<file name>`` keys: files of the trial's MLflow run.
"""
from __future__ import annotations

from trainables.config import PhaseConfig
from trainables.registry import Registry

PHASES: Registry[type] = Registry("phase kind", config_base=PhaseConfig)
