"""Search space -> Ray Tune: param space, search algorithm, scheduler, trial count.

``grid`` means every listed value is tried; with ``num_samples`` N each grid point is tried N
times, the other distributions sampled anew each time. Ray's BasicVariantGenerator does that
natively; Optuna cannot enumerate a grid, so with ``algorithm: optuna`` the grid points are
enqueued as partial trials (Optuna fixes those values and its TPE sampler proposes the rest).
"""
from __future__ import annotations

import copy
import itertools
import os
import pickle
from typing import Any, Dict, List, Optional

from orchestrator.spec import Distribution, Spec, set_path


def grid_points(spec: Spec) -> List[Dict[str, Any]]:
    """Every combination of the ``grid`` values, as {dotted key: value}."""
    grids = {k: d.grid for k, d in spec.search.space.items() if d.kind == "grid"}
    keys = list(grids)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grids[k] for k in keys))]


def num_trials(spec: Spec) -> int:
    n = spec.search.num_samples * len(grid_points(spec))
    if spec.search.algorithm == "grid":  # choice values are enumerated too
        for d in spec.search.space.values():
            if d.kind == "choice":
                n *= len(d.choice)
    return n


def _tune_domain(d: Distribution, as_grid: bool):
    from ray import tune

    a = d.args
    if d.kind == "grid" or (as_grid and d.kind == "choice"):
        return tune.grid_search(list(a))
    return {
        "choice": lambda: tune.choice(list(a)),
        "uniform": lambda: tune.uniform(a[0], a[1]),
        "loguniform": lambda: tune.loguniform(a[0], a[1]),
        "randint": lambda: tune.randint(a[0], a[1] + 1),  # our randint is inclusive of high
        "quniform": lambda: tune.quniform(a[0], a[1], a[2]),
    }[d.kind]()


def _suggest(trial, name: str, d: Distribution):
    a = d.args
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
            _suggest(trial, _optuna_name(key), d)


def _optuna_name(key: str) -> str:
    return key.replace(".", "/")  # Ray unflattens Optuna's params on "/"


def param_space(spec: Spec) -> Dict[str, Any]:
    """The Tuner's param space: the fixed trial config, with Tune domains where BasicVariant
    generation samples them (for Optuna the searcher supplies those values instead)."""
    cfg = copy.deepcopy(spec.trial_config())
    if spec.search.algorithm != "optuna":
        for key, d in spec.search.space.items():
            set_path(cfg, key, _tune_domain(d, as_grid=spec.search.algorithm == "grid"))
    return cfg


def search_algorithm(spec: Spec):
    """OptunaSearch (TPE, seeded, grid points enqueued) or a seeded BasicVariantGenerator."""
    s = spec.search
    if s.algorithm == "optuna" and s.space:
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        points = [{_optuna_name(k): v for k, v in p.items()} for p in grid_points(spec)]
        points = [p for p in points if p] * s.num_samples
        return OptunaSearch(
            space=DefineByRun(s.space),
            metric=s.metric,
            mode=s.mode,
            sampler=optuna.samplers.TPESampler(seed=s.seed),
            points_to_evaluate=points or None,
        )
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=s.seed)


def tuner_num_samples(spec: Spec) -> int:
    """Tune's num_samples: BasicVariantGenerator multiplies grids itself, a searcher does not."""
    if spec.search.algorithm == "optuna" and spec.search.space:
        return num_trials(spec)
    return spec.search.num_samples


def trial_scheduler(spec: Spec, state_file: Optional[str] = None):
    """FIFO, or ASHA on epochs; with ``state_file`` ASHA's rungs survive a driver restart."""
    from ray.tune.schedulers import FIFOScheduler

    sch = spec.search.scheduler
    if sch.type == "fifo":
        return FIFOScheduler()
    return ResumableASHA(
        state_file=state_file,
        time_attr="epoch",
        max_t=sch.max_t or spec.train.epochs,
        grace_period=sch.grace_period,
        reduction_factor=sch.reduction_factor,
    )


def _asha_base():
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler


class ResumableASHA(_asha_base()):
    """ASHA whose rungs (every trial's metric at each milestone) are written to a file after
    each decision and read back when a restored experiment unpickles the scheduler: Tune
    restores the searcher's state but not the scheduler's, so without this a resumed sweep
    would judge its trials against empty rungs."""

    def __init__(self, state_file: Optional[str] = None, **kwargs):
        super().__init__(**kwargs)
        self._state_file = state_file

    def _persist(self) -> None:
        if not self._state_file:
            return
        tmp = self._state_file + ".tmp"
        with open(tmp, "wb") as f:
            pickle.dump({k: v for k, v in self.__dict__.items() if k != "_state_file"}, f)
        os.replace(tmp, self._state_file)

    def on_trial_result(self, tune_controller, trial, result):
        decision = super().on_trial_result(tune_controller, trial, result)
        self._persist()
        return decision

    def on_trial_complete(self, tune_controller, trial, result):
        super().on_trial_complete(tune_controller, trial, result)
        self._persist()

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self._state_file and os.path.exists(self._state_file):
            with open(self._state_file, "rb") as f:
                saved = pickle.load(f)  # written by this driver into its own sweep folder
            self.__dict__.update(saved)
