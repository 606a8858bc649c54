"""A spec's search space: the grid points, the trial count, Optuna's define-by-run space, ASHA's
horizon. No Ray here (``tl-sweep validate`` uses it); orchestrator/tuning.py builds the Ray
Tune searcher and scheduler from it.

Every algorithm runs through one Optuna study (``tuning.TrialSearch``): ``optuna`` samples with TPE,
``random`` with Optuna's random sampler, ``grid`` enumerates. ``grid`` values (and, with
``algorithm: grid``, ``choice`` values too) are enqueued as fixed trials, each ``num_samples``
times; the sampler proposes the other values. One study for all three gives every trial an
index (its seed is ``train.seed`` plus it), the same resume path, and an Optuna study that holds
every trial with its true state (an early-stopped trial is PRUNED).
"""
from __future__ import annotations

import copy
import itertools
import json
from typing import Any, Dict, List

from orchestrator.spec import Distribution, Spec

SCALARS = (bool, int, float, str, type(None))


def _enumerated(spec: Spec) -> Dict[str, List[Any]]:
    """The searched keys every value of which is tried, with their values."""
    as_grid = spec.search.algorithm == "grid"
    return {k: list(d.args) for k, d in spec.search.space.items()
            if d.kind == "grid" or (as_grid and d.kind == "choice")}


def grid_points(spec: Spec) -> List[Dict[str, Any]]:
    """Every combination of the enumerated values, as {dotted key: value}."""
    grids = _enumerated(spec)
    keys = list(grids)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grids[k] for k in keys))]


def num_trials(spec: Spec) -> int:
    return spec.search.num_samples * len(grid_points(spec))


def encoded(d: Distribution) -> bool:
    """Optuna's categorical takes scalars only: other values (lists) go by their index."""
    return d.kind in ("grid", "choice") and not all(isinstance(v, SCALARS) for v in d.args)


def optuna_name(key: str) -> str:
    return key.replace(".", "/")  # Ray unflattens Optuna's params on "/"


def _suggest(trial, name: str, d: Distribution):
    a = d.args
    if encoded(d):
        return trial.suggest_categorical(name, list(range(len(a))))
    if d.kind in ("grid", "choice"):
        return trial.suggest_categorical(name, list(a))
    if d.kind == "uniform":
        return trial.suggest_float(name, a[0], a[1])
    if d.kind == "loguniform":
        return trial.suggest_float(name, a[0], a[1], log=True)
    if d.kind == "randint":
        return trial.suggest_int(name, a[0], a[1])
    return trial.suggest_float(name, a[0], a[1], step=a[2])


class DefineByRun:
    """Optuna's define-by-run space; a class, not a closure, so Tune can pickle the searcher."""

    def __init__(self, space: Dict[str, Distribution]):
        self.space = dict(space)

    def __call__(self, trial) -> None:
        for key, d in self.space.items():
            _suggest(trial, optuna_name(key), d)


def param_space(spec: Spec) -> Dict[str, Any]:
    """The Tuner's param space: the fixed trial config (the searcher supplies the rest).

    A section whose component is searched (``strategy.name``, ``data.name``) holds only the
    fields the spec sets: each trial's component fills in its own defaults (a field of the
    spec's default component would be unknown to another one)."""
    cfg = copy.deepcopy(spec.trial_config())
    for section in ("data", "strategy"):
        if f"{section}.name" in spec.search.space:
            cfg[section] = getattr(spec, section).model_dump(mode="json", exclude_unset=True)
    return cfg


def max_t(spec: Spec) -> int:
    """ASHA's horizon: search.scheduler.max_t, else the most epochs a trial can run."""
    if spec.search.scheduler.max_t:
        return spec.search.scheduler.max_t
    if spec.max_epochs is not None:
        return spec.max_epochs
    d = spec.search.space.get("train.epochs")
    top = d.largest if d is not None else None
    return int(top) if top is not None else spec.total_epochs


def describe(spec: Spec) -> str:
    """One line per searched key, for ``tl-sweep validate``."""
    return "\n".join(f"  {k}: {json.dumps(d.to_yaml())}" for k, d in spec.search.space.items())
