"""End to end through the real ``tl-sweep`` command: local Ray, a real MLflow store."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import SEARCH_SPACES, run_cli, shrunk

pytestmark = pytest.mark.slow

QUICKSTART = {"train.epochs": 2, "search.space.strategy.unfreeze_last": {"grid": [0, 1]}}


def mlflow_client(storage: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{storage / 'mlflow.db'}")


def sweep_runs(client, sweep_meta):
    parent = client.get_run(sweep_meta["parent_run_id"])
    children = client.search_runs([sweep_meta["experiment_id"]],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return parent, children


def only_sweep(storage: Path, name: str):
    metas = [json.loads(p.read_text()) for p in storage.glob("*/sweep.json")]
    metas = [m for m in metas if m["name"] == name]
    assert len(metas) == 1, metas
    return metas[0]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The shipped quickstart, shrunk with --set: 2 trials x 2 epochs."""
    work = tmp_path_factory.mktemp("qs")
    storage = work / "sweeps"
    r = run_cli(["run", str(SEARCH_SPACES / "quickstart.yaml"), *shrunk(QUICKSTART), "--set", f"storage.path={storage}"],
                cwd=work)
    assert r.returncode == 0, r.stdout + r.stderr
    return work, storage, r


def test_sweep_leaves_one_parent_and_one_child_per_trial(quickstart):
    work, storage, r = quickstart
    meta = only_sweep(storage, "quickstart")
    assert meta["status"] == "finished" and meta["num_trials"] == 2
    client = mlflow_client(storage)
    parent, children = sweep_runs(client, meta)
    assert parent.info.status == "FINISHED" and parent.data.tags["tl_sweep.role"] == "sweep"
    assert "spec.yaml" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert len(children) == 2
    assert len({c.data.tags["tl_sweep.trial_id"] for c in children}) == 2
    # every run of the experiment is this sweep's parent or one of its children: no orphans
    everything = client.search_runs([meta["experiment_id"]])
    assert {x.info.run_id for x in everything} == {parent.info.run_id} | {c.info.run_id for c in children}
    for c in children:
        assert sorted(c.data.params["strategy.unfreeze_last"] for c in children) == ["0", "1"]
        assert c.data.params["model.name"] == "timm:tf_efficientnet_lite0" and "train.lr" in c.data.params
        hist = client.get_metric_history(c.info.run_id, "val/acc")
        epochs = int(c.data.tags["tl_sweep.epochs"])
        assert "epoch" not in c.data.metrics, "the epoch is every metric's step, not a metric of its own"
        assert [m.step for m in sorted(hist, key=lambda m: m.step)] == list(range(1, epochs + 1))
        if c.data.tags["tl_sweep.pruned"] == "true":
            assert c.info.status == "KILLED" and epochs < 2 and "test/acc" not in c.data.metrics
            assert c.data.tags["tl_sweep.status"] == "pruned"
        else:
            assert c.info.status == "FINISHED" and epochs == 2 and 0 <= c.data.metrics["test/acc"] <= 1
            assert c.data.tags["tl_sweep.status"] == "finished"
        # the run's name is what it varies; its params are the config it ran, no field that does not apply
        l_part, lr_part = c.info.run_name.split(" ")
        assert l_part == f"l={c.data.params['strategy.unfreeze_last']}" and len(lr_part) <= 10, c.info.run_name
        assert float(lr_part.removeprefix("lr=")) == pytest.approx(float(c.data.params["train.lr"]), rel=5e-3)
        assert "strategy.unfreeze_every" not in c.data.params and "semi.method" not in c.data.params
        assert "trial_spec.yaml" in [a.path for a in client.list_artifacts(c.info.run_id)]
    best = [c for c in children if c.data.tags.get("tl_sweep.best") == "true"]
    assert len(best) == 1 and [a.path for a in client.list_artifacts(best[0].info.run_id, "checkpoint")] == ["checkpoint/checkpoint.pt"]


def test_terminal_shows_trials_and_summary_not_ray_logs(quickstart):
    work, storage, r = quickstart
    meta = only_sweep(storage, "quickstart")
    assert "epoch 1 val/acc=" in r.stdout
    assert f"sweep {meta['id']} finished" in r.stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{storage / 'mlflow.db'}" in r.stdout
    assert f"tl-sweep export {meta['id']} --top 1 -o best.yaml" in r.stdout
    assert r.stderr.strip() == "", r.stderr
    assert (storage / meta["id"] / "ray.log").stat().st_size > 0


def test_show_and_export_then_rerun_reproduces_the_best_trial(quickstart):
    work, storage, _ = quickstart
    meta = only_sweep(storage, "quickstart")
    show = run_cli(["show", meta["id"], "--storage", str(storage)], cwd=work, timeout=120)
    assert show.returncode == 0 and "strategy.unfreeze_last" in show.stdout and "FINISHED" in show.stdout
    ls = run_cli(["ls", "--storage", str(storage)], cwd=work, timeout=120)
    assert meta["id"] in ls.stdout

    out = work / "best.yaml"
    ex = run_cli(["export", meta["id"], "--top", "1", "-o", str(out), "--storage", str(storage)], cwd=work, timeout=120)
    assert ex.returncode == 0, ex.stderr
    exported = yaml.safe_load(out.read_text())
    assert "space" not in exported["search"] and exported["search"]["scheduler"]["type"] == "fifo"

    client = mlflow_client(storage)
    _, children = sweep_runs(client, meta)
    ranked = sorted(children, key=lambda c: -max(m.value for m in client.get_metric_history(c.info.run_id, "val/acc")))
    best = ranked[0]
    assert str(exported["strategy"]["unfreeze_last"]) == best.data.params["strategy.unfreeze_last"]
    assert repr(exported["train"]["lr"]) == best.data.params["train.lr"]

    rerun = run_cli(["run", str(out)], cwd=work)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    metas = [json.loads(p.read_text()) for p in storage.glob("*/sweep.json")]
    new = [m for m in metas if m["id"] != meta["id"]]
    assert len(new) == 1 and new[0]["num_trials"] == 1
    _, [child] = sweep_runs(client, new[0])
    for key in ("strategy.unfreeze_last", "train.lr", "data.max_images", "data.image_size", "train.epochs"):
        assert child.data.params[key] == best.data.params[key], key
    # same config, same seeds, CPU: the re-run retraces the original trial's first epoch
    first = lambda run: [m.value for m in client.get_metric_history(run.info.run_id, "val/acc") if m.step == 1]
    assert first(child) == pytest.approx(first(best), abs=1e-6)


def test_a_failing_trial_is_failed_and_the_sweep_goes_on(tmp_path, base_spec, write_spec):
    base_spec["search"].update(algorithm="grid", space={"train.fail_at_epoch": {"grid": [None, 1]}})
    base_spec["train"]["epochs"] = 1
    base_spec["storage"]["path"] = str(tmp_path / "sweeps")
    r = run_cli(["run", str(write_spec(base_spec))], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAILED: " in r.stdout and "1 finished, 1 failed" in r.stdout
    meta = only_sweep(tmp_path / "sweeps", "tiny")
    client = mlflow_client(tmp_path / "sweeps")
    parent, children = sweep_runs(client, meta)
    by_status = {c.info.status: c for c in children}
    assert set(by_status) == {"FINISHED", "FAILED"} and parent.info.status == "FINISHED"
    assert "train.fail_at_epoch=1: this trial was asked to fail" in by_status["FAILED"].data.tags["tl_sweep.error"]


@pytest.mark.parametrize("override, needle", [
    (["--set", "data.name=pets", "--set", "data.root=/nonexistent/pets"], "/nonexistent/pets/oxford-iiit-pet"),
    (["--set", "search.space.strategy.unfreeze_last={grid: [1, 12]}"], "search.space.strategy.unfreeze_last"),
    (["--set", "model.weights=/nonexistent/w.pt"], "model.weights: no file at /nonexistent/w.pt"),
])
def test_bad_input_found_before_start_exits_2_and_leaves_nothing(tmp_path, base_spec, write_spec, override, needle):
    storage = tmp_path / "sweeps"
    base_spec["storage"]["path"] = str(storage)
    r = run_cli(["run", str(write_spec(base_spec)), *override], cwd=tmp_path, timeout=180)
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in r.stderr
    assert not storage.exists(), "no sweep folder and no MLflow store"


def test_a_rollback_removes_only_what_the_run_made(tmp_path):
    from orchestrator.sweep import _Created

    root = tmp_path / "sweeps"
    (root / "older-sweep").mkdir(parents=True)
    (root / "mlflow.db").write_bytes(b"a store of earlier sweeps")
    created = _Created()
    created.folder(root / "new-sweep")
    (root / "new-sweep" / "ray.log").write_text("log")
    created.rollback()
    assert sorted(p.name for p in root.iterdir()) == ["mlflow.db", "older-sweep"]

    fresh = tmp_path / "fresh" / "sweeps"
    created = _Created()
    created.folder(fresh / "s1")
    (fresh / "mlflow.db").write_bytes(b"made by the failed run's MLflow client")
    created.rollback()
    assert not (fresh / "s1").exists() and (fresh / "mlflow.db").exists(), "an MLflow store is never deleted"
    created = _Created()
    created.folder(tmp_path / "fresh2" / "sweeps" / "s1")
    created.rollback()
    assert not (tmp_path / "fresh2").exists(), "folders the run made, and only those, are gone"


def test_an_unreachable_tracking_server_exits_2_and_leaves_nothing(tmp_path, base_spec, write_spec):
    storage = tmp_path / "sweeps"
    base_spec["storage"]["path"] = str(storage)
    r = run_cli(["run", str(write_spec(base_spec)), "--tracking-uri", "http://127.0.0.1:9"], cwd=tmp_path, timeout=300,
                env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "tracking: the MLflow server at http://127.0.0.1:9 does not answer" in r.stderr
    assert not storage.exists()
