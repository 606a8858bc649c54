"""Fault tolerance through the real command: kill -9 the driver and resume, Ctrl-C and resume,
a retried trial. Totals are compared with an uninterrupted run of the same spec."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli
from test_e2e import mlflow_client, only_sweep, sweep_runs

pytestmark = pytest.mark.slow


def fault_spec(base_spec, storage: Path) -> dict:
    base_spec["data"].update(max_images=200)
    base_spec["train"]["epochs"] = 3
    base_spec["search"].update(
        algorithm="optuna", num_samples=1, scheduler={"type": "fifo"},
        space={"strategy.unfreeze_last": {"grid": [0, 1, 2, 3]}, "train.lr": {"loguniform": [1e-3, 5e-3]}},
    )
    base_spec["storage"]["path"] = str(storage)
    return base_spec


def summary(storage: Path, name: str):
    """{(unfreeze_last, lr): (status, val/acc steps, val/acc values)} for a sweep's child runs."""
    meta = only_sweep(storage, name)
    client = mlflow_client(storage)
    parent, children = sweep_runs(client, meta)
    out = {}
    for c in children:
        hist = sorted(client.get_metric_history(c.info.run_id, "val/acc"), key=lambda m: m.step)
        key = (c.data.params["strategy.unfreeze_last"], c.data.params["train.lr"])
        assert key not in out, f"two child runs for one config: {key}"
        out[key] = (c.info.status, [m.step for m in hist], [m.value for m in hist])
    everything = client.search_runs([meta["experiment_id"]])
    return meta, parent, out, everything


def start(spec_file: Path, cwd: Path) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("tl-sweep")
    return subprocess.Popen([str(exe), "run", str(spec_file)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)


def wait_for(proc: subprocess.Popen, needle: str, timeout: float = 300) -> str:
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"{needle!r} never appeared:\n{''.join(seen)}")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    import copy

    from conftest import BASE_SPEC
    import yaml

    work = tmp_path_factory.mktemp("straight")
    spec = fault_spec(copy.deepcopy(BASE_SPEC), work / "sweeps")
    (work / "spec.yaml").write_text(yaml.safe_dump(spec))
    r = run_cli(["run", str(work / "spec.yaml")], cwd=work)
    assert r.returncode == 0, r.stdout + r.stderr
    return summary(work / "sweeps", "tiny")


def assert_same_totals(resumed, straight):
    meta, parent, runs, everything = resumed
    _, _, want, _ = straight
    assert meta["status"] == "finished" and parent.info.status == "FINISHED"
    assert set(runs) == set(want), "the Optuna study continued: the same configs as without the kill"
    for key, (status, steps, values) in runs.items():
        assert status == "FINISHED" and steps == [1, 2, 3], (key, status, steps)
        # checkpoints carry the RNG state: a trial continued after the kill retraces the uninterrupted one
        assert values == pytest.approx(want[key][2], abs=1e-6), key
    assert len(everything) == 1 + len(want), "one parent and one child per trial, no orphans"
    assert not [r for r in everything if r.info.status == "RUNNING"]


def test_kill_9_the_driver_then_resume(tmp_path, base_spec, write_spec, uninterrupted):
    storage = tmp_path / "sweeps"
    spec_file = write_spec(fault_spec(base_spec, storage))
    proc = start(spec_file, tmp_path)
    wait_for(proc, "epoch 2 val/acc")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    meta = only_sweep(storage, "tiny")
    assert meta["status"] == "running", "a killed driver had no chance to say anything"

    r = run_cli(["resume", meta["id"], "--storage", str(storage)], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resuming sweep {meta['id']}" in r.stdout
    assert_same_totals(summary(storage, "tiny"), uninterrupted)

    again = run_cli(["resume", meta["id"], "--storage", str(storage)], cwd=tmp_path, timeout=120)
    assert again.returncode == 2 and "has finished: nothing to resume" in again.stderr


def test_ctrl_c_stops_cleanly_then_resume(tmp_path, base_spec, write_spec, uninterrupted):
    storage = tmp_path / "sweeps"
    spec_file = write_spec(fault_spec(base_spec, storage))
    proc = start(spec_file, tmp_path)
    wait_for(proc, "epoch 1 val/acc")
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, rest
    meta = only_sweep(storage, "tiny")
    assert f"continue it with: tl-sweep resume {meta['id']}" in rest
    assert meta["status"] == "interrupted"
    _, parent, runs, everything = summary(storage, "tiny")
    assert parent.info.status == "KILLED"
    assert not [r for r in everything if r.info.status == "RUNNING"], "every MLflow run closed"

    r = run_cli(["resume", meta["id"], "--storage", str(storage)], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same_totals(summary(storage, "tiny"), uninterrupted)


def test_a_retried_trial_keeps_one_child_run(tmp_path, base_spec, write_spec):
    base_spec["train"].update(epochs=3, fail_at_epoch=2)
    base_spec["failure"] = {"max_retries": 1}
    base_spec["storage"]["path"] = str(tmp_path / "sweeps")
    r = run_cli(["run", str(write_spec(base_spec))], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr  # the trial reported epoch 1, so it ranks
    assert "(1 failed)" in r.stdout
    _, parent, runs, everything = summary(tmp_path / "sweeps", "tiny")
    [(status, steps, _)] = runs.values()
    assert status == "FAILED" and steps == [1], "epoch 1 once, though the retry re-ran from its checkpoint"
    [child] = [x for x in everything if x.info.run_id != parent.info.run_id]
    assert child.data.tags["tl_sweep.retries"] == "1"
    assert "train.fail_at_epoch=2" in child.data.tags["tl_sweep.error"]
