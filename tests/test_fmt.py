"""What a person reads: numbers to their meaningful digits, run names from what a trial
varies, the parent run's params (effective values only), URIs shown without secrets and
otherwise untouched."""
from __future__ import annotations

import pytest

from orchestrator.fmt import metric, num, param
from orchestrator.secrets import redact
from orchestrator.spec import validate
from orchestrator.sweep import spec_params
from orchestrator.tracking import run_name


@pytest.mark.parametrize("value, text", [
    (0.00031622776601683794, "3.16e-4"), (0.002243750112826068, "2.24e-3"), (0.1, "0.1"), (0.3333333, "0.333"),
    (4, "4"), (0.0, "0"), (123456.0, "1.23e5"), (True, "True"), ("adamw", "adamw"), (None, "None"),
])
def test_numbers_are_shown_to_their_meaningful_digits(value, text):
    assert num(value) == text


def test_metrics_keep_four_digits_and_params_parse_what_mlflow_stored():
    assert metric(0.987654321) == "0.9877"
    assert param("0.00031622776601683794") == "3.16e-4"
    assert param("3") == "3" and param("adamw") == "adamw"
    assert param("[0.00031622776601683794, 2]") == "[3.16e-4, 2]"


def test_a_run_is_named_by_the_values_it_varies():
    config = {"strategy": {"unfreeze_last": 4}, "train": {"lr": 0.00031622776601683794}}
    assert run_name(config, ["strategy.unfreeze_last", "train.lr"], "ab12") == "l=4 lr=3.16e-4"
    assert run_name(config, [], "ab12") == "trial-ab12"


def test_the_parent_run_gets_effective_values_and_searched_keys_as_distributions(base_spec):
    base_spec["search"]["space"] = {"train.lr": {"loguniform": [1e-4, 3e-3]}, "strategy.unfreeze_last": {"grid": [1, 2]}}
    params = spec_params(validate(base_spec))
    assert params["spec.train.lr"] == "loguniform[0.0001, 0.003]"
    assert params["spec.strategy.unfreeze_last"] == "grid[1, 2]"
    assert params["spec.train.optimizer"] == "adamw" and "spec.train.momentum" not in params  # SGD's only
    assert "spec.search.space" not in params and not [v for v in params.values() if v is None or v in ([], {})]
    semi = {k: v for k, v in params.items() if k.startswith("spec.semi.")}
    assert semi == {}, "no semi-supervision (semi.method none): none of its fields apply"


@pytest.mark.parametrize("uri", ["sqlite:////tmp/sweeps/mlflow.db", "s3://bucket/sweeps?endpoint_override=127.0.0.1:9",
                                 "file:///srv/x", "http://127.0.0.1:5000/#/experiments/1/runs"])
def test_uris_without_secrets_are_shown_as_they_are(uri):
    assert redact(f"store: {uri}") == f"store: {uri}"


def test_uris_with_secrets_are_shown_without_them():
    assert redact("postgresql://mlflow:hunter2@db:5432/mlflow") == "postgresql://mlflow:***@db:5432/mlflow"
    assert "s3cr3t" not in redact("s3://b/p?secret_key=s3cr3t&region=x")
