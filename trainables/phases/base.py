"""The kinds of phase a trial may run, one after the other (``phases:`` in a spec).

A trial without ``phases`` is one ``train`` phase. Each phase sees the trial's sections with its
own overrides on top (``TrialSections.phase_sections``), shares the trial's model, and, when it
ends, logs its val and test metrics once more under ``<phase name>/`` (``probe/val/acc``). A
kind that does something else than epochs of fine-tuning (compression, a second task) is one
module of this package that registers its class, and its config model, in ``PHASES``: the
trial calls ``run_epoch`` for each of the phase's epochs and ``finish`` after the last.
"""
from __future__ import annotations

from trainables.config import PhaseConfig
from trainables.registry import Registry

PHASES: Registry[type] = Registry("phase kind", config_base=PhaseConfig)
