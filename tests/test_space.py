"""Search space -> Ray Tune: domains, grid expansion, Optuna with enqueued grid points."""
from __future__ import annotations

import math
from collections import Counter

from ray import tune
from ray.tune.search.sample import Float, Integer

from orchestrator import space as sp
from orchestrator.spec import validate


def spec_with(base_spec, space, algorithm="random", num_samples=1):
    base_spec["search"].update(space=space, algorithm=algorithm, num_samples=num_samples)
    return validate(base_spec)


def test_random_algorithm_places_tune_domains_at_their_paths(base_spec):
    s = spec_with(base_spec, {
        "train.lr": {"loguniform": [1e-4, 1e-2]}, "strategy.lr_decay": {"uniform": [0.3, 1.0]},
        "train.batch_size": {"choice": [8, 16]}, "strategy.unfreeze_last": {"grid": [0, 1, 2]},
        "train.epochs": {"randint": [1, 3]}, "train.weight_decay": {"quniform": [0.0, 0.1, 0.05]},
    }, num_samples=2)
    ps = sp.param_space(s)
    assert isinstance(ps["train"]["lr"], Float) and ps["train"]["lr"].lower == 1e-4
    assert isinstance(ps["train"]["epochs"], Integer) and ps["train"]["epochs"].upper == 4, "randint is inclusive"
    assert ps["strategy"]["unfreeze_last"] == {"grid_search": [0, 1, 2]}
    assert ps["data"]["name"] == "digits" and ps["metric"] == "val/acc"
    assert sp.num_trials(s) == 6 and sp.tuner_num_samples(s) == 2


def test_grid_algorithm_enumerates_choices_too(base_spec):
    s = spec_with(base_spec, {"train.batch_size": {"choice": [8, 16]}, "strategy.unfreeze_last": {"grid": [0, 1, 2]}},
                  algorithm="grid")
    assert sp.param_space(s)["train"]["batch_size"] == tune.grid_search([8, 16])
    assert sp.num_trials(s) == 6


def test_optuna_proposes_every_grid_point_num_samples_times(base_spec):
    s = spec_with(base_spec, {"strategy.unfreeze_last": {"grid": [0, 1, 2]}, "train.lr": {"loguniform": [1e-4, 1e-2]}},
                  algorithm="optuna", num_samples=2)
    assert sp.num_trials(s) == 6 and sp.tuner_num_samples(s) == 6
    assert "unfreeze_last" in sp.param_space(s)["strategy"] and not isinstance(sp.param_space(s)["train"]["lr"], Float)
    searcher = sp.search_algorithm(s)
    proposals = [searcher.suggest(f"t{i}") for i in range(6)]
    assert Counter(p["strategy"]["unfreeze_last"] for p in proposals) == {0: 2, 1: 2, 2: 2}
    lrs = [p["train"]["lr"] for p in proposals]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and len(set(lrs)) == 6
    # same seed, same proposals: a sweep is reproducible
    second = sp.search_algorithm(s)
    again = [second.suggest(f"t{i}") for i in range(6)]
    assert [p["train"]["lr"] for p in again] == lrs


def test_optuna_without_grid_samples_every_distribution(base_spec):
    s = spec_with(base_spec, {"train.lr": {"loguniform": [1e-4, 1e-2]}, "train.epochs": {"randint": [1, 3]},
                              "strategy.lr_decay": {"quniform": [0.5, 1.0, 0.25]}}, algorithm="optuna", num_samples=5)
    searcher = sp.search_algorithm(s)
    for i in range(5):
        p = searcher.suggest(f"t{i}")
        assert p["train"]["epochs"] in (1, 2, 3)
        assert any(math.isclose(p["strategy"]["lr_decay"], v) for v in (0.5, 0.75, 1.0))


def test_asha_counts_epochs_and_defaults_max_t(base_spec):
    base_spec["search"]["scheduler"] = {"type": "asha", "grace_period": 1, "reduction_factor": 3}
    base_spec["train"]["epochs"] = 9
    sched = sp.trial_scheduler(validate(base_spec))
    assert sched._time_attr == "epoch" and sched._max_t == 9
