"""Search space -> Ray Tune: domains, grid expansion, Optuna with enqueued grid points."""
from __future__ import annotations

import math
from collections import Counter

from ray.tune.search.sample import Float

from orchestrator import space as sp
from orchestrator import tuning
from orchestrator.spec import validate


def spec_with(base_spec, space, algorithm="random", num_samples=1):
    base_spec["search"].update(space=space, algorithm=algorithm, num_samples=num_samples)
    return validate(base_spec)


def proposals(spec, n=None):
    searcher = tuning.search_algorithm(spec)
    return [searcher.suggest(f"t{i}") for i in range(n or sp.num_trials(spec))]


def test_random_algorithm_samples_every_distribution_within_its_bounds(base_spec):
    sampled = {
        "train.lr": {"loguniform": [1e-4, 1e-2]}, "strategy.lr_decay": {"uniform": [0.3, 1.0]},
        "train.batch_size": {"choice": [8, 16]}, "train.epochs": {"randint": [1, 3]},
        "train.weight_decay": {"quniform": [0.0, 0.1, 0.05]},
    }
    s = spec_with(base_spec, {**sampled, "strategy.unfreeze_last": {"grid": [0, 1, 2]}}, num_samples=2)
    assert sp.num_trials(s) == 6
    assert Counter(p["strategy"]["unfreeze_last"] for p in proposals(s)) == {0: 2, 1: 2, 2: 2}
    drawn = proposals(spec_with(base_spec, sampled, num_samples=200))
    assert all(1e-4 <= p["train"]["lr"] <= 1e-2 and 0.3 <= p["strategy"]["lr_decay"] <= 1.0 for p in drawn)
    assert {p["train"]["batch_size"] for p in drawn} == {8, 16}
    assert {p["train"]["epochs"] for p in drawn} == {1, 2, 3}, "randint is inclusive"
    assert all(any(math.isclose(p["train"]["weight_decay"], v) for v in (0.0, 0.05, 0.1)) for p in drawn)
    assert sp.param_space(s)["data"]["name"] == "digits" and sp.param_space(s)["metric"] == "val/acc"


def test_grid_algorithm_enumerates_choices_too(base_spec):
    s = spec_with(base_spec, {"train.batch_size": {"choice": [8, 16]}, "strategy.unfreeze_last": {"grid": [0, 1, 2]}},
                  algorithm="grid")
    assert sp.num_trials(s) == 6
    combos = {(p["train"]["batch_size"], p["strategy"]["unfreeze_last"]) for p in proposals(s)}
    assert combos == {(b, u) for b in (8, 16) for u in (0, 1, 2)}


def test_each_trial_gets_its_index(base_spec):
    s = spec_with(base_spec, {"strategy.unfreeze_last": {"grid": [0, 1]}}, algorithm="grid", num_samples=2)
    got = proposals(s)
    assert [p["trial_index"] for p in got] == [0, 1, 2, 3]
    assert Counter(p["strategy"]["unfreeze_last"] for p in got) == {0: 2, 1: 2}, "replicates share a config, not an index"


def test_optuna_proposes_every_grid_point_num_samples_times(base_spec):
    s = spec_with(base_spec, {"strategy.unfreeze_last": {"grid": [0, 1, 2]}, "train.lr": {"loguniform": [1e-4, 1e-2]}},
                  algorithm="optuna", num_samples=2)
    assert sp.num_trials(s) == 6
    assert not isinstance(sp.param_space(s)["train"]["lr"], Float), "the searcher supplies the searched values"
    searcher = tuning.search_algorithm(s)
    proposals = [searcher.suggest(f"t{i}") for i in range(6)]
    assert Counter(p["strategy"]["unfreeze_last"] for p in proposals) == {0: 2, 1: 2, 2: 2}
    lrs = [p["train"]["lr"] for p in proposals]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and len(set(lrs)) == 6
    # same seed, same proposals: a sweep is reproducible
    second = tuning.search_algorithm(s)
    again = [second.suggest(f"t{i}") for i in range(6)]
    assert [p["train"]["lr"] for p in again] == lrs


def test_optuna_without_grid_samples_every_distribution(base_spec):
    s = spec_with(base_spec, {"train.lr": {"loguniform": [1e-4, 1e-2]}, "train.epochs": {"randint": [1, 3]},
                              "strategy.lr_decay": {"quniform": [0.5, 1.0, 0.25]}}, algorithm="optuna", num_samples=5)
    searcher = tuning.search_algorithm(s)
    for i in range(5):
        p = searcher.suggest(f"t{i}")
        assert p["train"]["epochs"] in (1, 2, 3)
        assert any(math.isclose(p["strategy"]["lr_decay"], v) for v in (0.5, 0.75, 1.0))


def test_asha_counts_epochs_and_defaults_max_t(base_spec):
    base_spec["search"]["scheduler"] = {"type": "asha", "grace_period": 1, "reduction_factor": 3}
    base_spec["train"]["epochs"] = 9
    sched = tuning.trial_scheduler(validate(base_spec))
    assert sched._time_attr == "epoch" and sched._max_t == 9
    base_spec["search"]["space"] = {"train.epochs": {"randint": [2, 12]}}
    assert tuning.trial_scheduler(validate(base_spec))._max_t == 12, "a searched epoch count: its largest value"


def test_a_searched_strategy_name_gives_each_trial_its_own_strategy_defaults(base_spec):
    """Each proposal, merged into the param space as Tune merges it, parses as a trial config
    of its own strategy (the default strategy's fields would be unknown keys to another)."""
    from trainables.config import TrialConfig, merge

    base_spec["strategy"] = {"name": "unfreeze_last", "lr_decay": 0.5}
    s = spec_with(base_spec, {"strategy.name": {"grid": ["unfreeze_last", "gradual_unfreeze", "masked"]}},
                  algorithm="grid")
    fixed = sp.param_space(s)
    assert fixed["strategy"] == {"name": "unfreeze_last", "lr_decay": 0.5}, "only what the spec sets"
    parsed = [TrialConfig.parse(merge(fixed, p)) for p in proposals(s)]
    assert sorted(type(c.strategy).__name__ for c in parsed) == ["GradualUnfreezeConfig", "MaskedConfig",
                                                                 "UnfreezeLastConfig"]
    assert all(c.strategy.lr_decay == 0.5 for c in parsed)
    assert "strategy" in sp.param_space(spec_with(base_spec, {"train.lr": {"choice": [1e-3]}}))
    assert "unfreeze_last" in sp.param_space(spec_with(base_spec, {"train.lr": {"choice": [1e-3]}}))["strategy"]
