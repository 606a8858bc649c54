"""Fault tolerance through the real command: kill -9 the driver and resume (every searcher x
scheduler pair), Ctrl-C and resume, retries that fail and that succeed. Totals are compared
with an uninterrupted run of the same spec."""
from __future__ import annotations

import copy
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import BASE_SPEC, run_cli
from test_e2e import mlflow_client, only_sweep, sweep_runs

pytestmark = pytest.mark.slow


def fault_spec(base_spec, storage: Path) -> dict:
    base_spec["data"].update(max_images=200, num_workers=1)  # a DataLoader worker: resume must be exact with it too
    base_spec["augment"] = {"hflip": True}
    base_spec["train"]["epochs"] = 3
    base_spec["search"].update(
        algorithm="optuna", num_samples=1, scheduler={"type": "fifo"},
        space={"strategy.unfreeze_last": {"grid": [0, 1, 2, 3]}, "train.lr": {"loguniform": [1e-3, 5e-3]}},
    )
    base_spec["storage"]["path"] = str(storage)
    return base_spec


def summary(storage: Path, name: str, key=("strategy.unfreeze_last", "train.lr")):
    """{config key: (status, val/acc steps, val/acc values, run)} for a sweep's child runs."""
    meta = only_sweep(storage, name)
    client = mlflow_client(storage)
    parent, children = sweep_runs(client, meta)
    out = {}
    for c in children:
        hist = sorted(client.get_metric_history(c.info.run_id, "val/acc"), key=lambda m: m.step)
        k = tuple(c.data.params.get(x) for x in key)
        assert k not in out, f"two child runs for one config: {k}"
        out[k] = (c.info.status, [m.step for m in hist], [m.value for m in hist], c)
    everything = client.search_runs([meta["experiment_id"]])
    return meta, parent, out, everything


def start(spec_file: Path, cwd: Path, env=None) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("tl-sweep")
    return subprocess.Popen([str(exe), "run", str(spec_file)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, env=dict(os.environ, **(env or {})))


def wait_for(proc: subprocess.Popen, needle, timeout: float = 300) -> str:
    """Read the command's output until a line holds ``needle`` (or, if callable, satisfies it)."""
    seen, deadline = [], time.time() + timeout
    found = needle if callable(needle) else (lambda line: needle in line)
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if found(line):
            return "".join(seen)
    raise AssertionError(f"{needle!r} never appeared:\n{''.join(seen)}")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
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
    for key, (status, steps, values, _) in runs.items():
        assert status == "FINISHED" and steps == [1, 2, 3], (key, status, steps)
        # checkpoints carry every RNG state: a trial continued after the kill retraces the uninterrupted one
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
    [(status, steps, _, _)] = runs.values()
    assert status == "FAILED" and steps == [1], "epoch 1 once, though the retry re-ran from its checkpoint"
    [child] = [x for x in everything if x.info.run_id != parent.info.run_id]
    assert child.data.tags["tl_sweep.retries"] == "1"
    assert "train.fail_at_epoch=2" in child.data.tags["tl_sweep.error"]


def test_a_trial_that_fails_once_succeeds_on_retry_in_the_same_child_run(tmp_path, base_spec, write_spec):
    base_spec["train"]["epochs"] = 3
    base_spec["failure"] = {"max_retries": 1}
    base_spec["storage"]["path"] = str(tmp_path / "sweeps")
    markers = tmp_path / "fault"
    markers.mkdir()
    r = run_cli(["run", str(write_spec(base_spec))], cwd=tmp_path,
                env={"TL_SWEEP_TEST_FAIL_ONCE": f"2:{markers}"})  # a test-only fault: fail once, at epoch 2
    assert r.returncode == 0, r.stdout + r.stderr
    assert (markers / "failed-once").exists(), "the fault was injected"
    assert "1 finished" in r.stdout and "failed" not in r.stdout.split("finished (")[1].split(")")[0]
    _, parent, runs, everything = summary(tmp_path / "sweeps", "tiny")
    [(status, steps, values, child)] = runs.values()
    assert status == "FINISHED" and steps == [1, 2, 3], "the retry continued from epoch 1's checkpoint"
    assert child.data.tags["tl_sweep.retries"] == "1" and "tl_sweep.error" not in child.data.tags
    assert len(everything) == 2


# --------------------------------------------------------------------------- every searcher x scheduler


PAIRS = [(a, s) for a in ("optuna", "random", "grid") for s in ("asha", "fifo")]


def pair_spec(base_spec, storage: Path, algorithm: str, scheduler: str) -> dict:
    """Three configs x three epochs, one trial at a time: with one trial at a time ASHA's
    decisions depend only on the (seeded) metrics, so a resumed sweep must make the same ones."""
    base_spec["name"] = f"pair-{algorithm}-{scheduler}"
    base_spec["data"].update(max_images=80, image_size=24)
    base_spec["train"]["epochs"] = 3
    space = {"strategy.unfreeze_last": {"grid": [0, 1, 2]}}
    if algorithm != "grid":
        space["train.lr"] = {"loguniform": [5e-4, 1e-2]}
    base_spec["search"].update(algorithm=algorithm, num_samples=1, max_concurrent=1, space=space,
                               scheduler={"type": scheduler, "grace_period": 1, "reduction_factor": 2})
    base_spec["storage"]["path"] = str(storage)
    return base_spec


def study_of(meta: dict):
    """The sweep's Optuna study, as the searcher saved it into the sweep's store."""
    tune_dir = Path(meta["store"]) / "tune"
    [state] = sorted(tune_dir.glob("searcher-state-*.pkl"))[-1:]
    with open(state, "rb") as f:
        saved = pickle.load(f)  # written by the sweep's own driver
    return saved["_ot_study"]


def asha_replay(runs, max_t: int = 3):
    """What ASHA decides when the trials' per-epoch val/acc arrive in trial order (one trial at
    a time): {trial index: epochs it runs}. Ray's own ASHAScheduler, fed the recorded values."""
    from ray.tune.schedulers import ASHAScheduler

    asha = ASHAScheduler(time_attr="epoch", metric="val/acc", mode="max", max_t=max_t, grace_period=1,
                         reduction_factor=2)
    out = {}
    for key in sorted(runs, key=lambda k: int(k[0])):
        trial = type("T", (), {"trial_id": key[0]})()
        asha.on_trial_add(None, trial)
        values = runs[key][2]
        out[key[0]] = None  # "goes on": more epochs than it ran
        for epoch, value in enumerate(values, 1):
            if asha.on_trial_result(None, trial, {"epoch": epoch, "val/acc": value}) == "STOP" or epoch == max_t:
                out[key[0]] = epoch
                break
    return out


@pytest.mark.parametrize("algorithm, scheduler", PAIRS, ids=[f"{a}-{s}" for a, s in PAIRS])
def test_resume_after_kill_9_with_every_searcher_and_scheduler(tmp_path, base_spec, write_spec, algorithm, scheduler):
    storage = tmp_path / "sweeps"
    spec = pair_spec(base_spec, storage, algorithm, scheduler)
    proc = start(write_spec(spec), tmp_path)
    # the second trial has run an epoch: the first has finished (or was stopped), the second runs
    seen = wait_for(proc, nth("epoch 1 val/acc", 2))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    meta = only_sweep(storage, spec["name"])
    before = {c.data.tags["tl_sweep.trial_id"]: c.info.status for c in sweep_runs(mlflow_client(storage), meta)[1]}
    done_before = {t for t, s in before.items() if s in ("FINISHED", "KILLED")}
    assert done_before, f"a trial had ended before the kill:\n{seen}"

    r = run_cli(["resume", meta["id"], "--storage", str(storage)], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    meta, parent, runs, everything = summary(storage, spec["name"], key=("trial_index",))
    assert meta["status"] == "finished" and parent.info.status == "FINISHED"
    assert len(everything) == 1 + 3 == 1 + len(runs), "one parent and exactly one child per trial"
    assert not [x for x in everything if x.info.status == "RUNNING"]
    for key, (status, steps, _, child) in runs.items():
        assert steps == list(range(1, len(steps) + 1)), (key, steps)  # one value per epoch, none twice
        starts = int(child.data.tags["tl_sweep.starts"])
        if child.data.tags["tl_sweep.trial_id"] in done_before:
            assert starts == 1, f"trial {key} had finished before the kill, and ran again"
        if scheduler == "fifo":
            assert status == "FINISHED" and steps == [1, 2, 3], (key, status, steps)
    if scheduler == "asha":
        # ASHA's rungs carried on: its decisions are those it makes over the whole history
        assert {k[0]: len(steps) for k, (_, steps, _, _) in runs.items()} == asha_replay(runs)
        rungs = pickle.loads((Path(meta["store"]) / "scheduler.pkl").read_bytes())["_brackets"][0]._rungs
        recorded = {tid for milestone, values in rungs if milestone == 1 for tid in values}
        assert len(recorded) == 3, f"every trial recorded at the first rung, before and after the kill: {rungs}"

    study = study_of(meta)
    states = sorted((t.number, t.state.name) for t in study.trials)
    assert [n for n, _ in states] == [0, 1, 2], f"every trial once: {states}"
    for (n, state), (key, (status, steps, _, _)) in zip(states, sorted(runs.items(), key=lambda kv: int(kv[0][0]))):
        want = "COMPLETE" if steps == [1, 2, 3] else "PRUNED"
        assert state == want, (n, state, status, steps)


def nth(needle: str, n: int):
    """A line test that is true at the n-th line holding ``needle``."""
    count = [0]

    def test(line: str) -> bool:
        count[0] += needle in line
        return count[0] >= n

    return test


STATE_PROBE = r'''
import glob, json, os, sys, time
os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "1000"  # Tune's own timed saves out of the way
import ray
from ray import tune
from orchestrator import tuning

storage, with_saver = sys.argv[1], sys.argv[2] == "1"

def trial(config):
    import tempfile
    for i in range(6):
        with tempfile.TemporaryDirectory() as d:
            open(os.path.join(d, "x"), "w").write(str(i))
            tune.report({"epoch": i + 1, "val/acc": 0.1 * i}, checkpoint=tune.Checkpoint.from_directory(d))
        time.sleep(0.2)

class Probe(tune.Callback):
    """As each checkpoint lands (before Tune registers it and deletes the oldest kept one): the
    checkpoint that the experiment state on the storage names for this trial."""
    seen = []
    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        landing = int(os.path.basename(checkpoint.path).split("_")[-1])
        named = -1
        for f in sorted(glob.glob(os.path.join(storage, "exp", "experiment_state-*.json"))):
            for _, meta in json.load(open(f))["trial_data"]:
                name = (json.loads(meta).get("last_result") or {}).get("checkpoint_dir_name")
                if name:
                    named = max(named, int(name.split("_")[-1]))
        self.seen.append((landing, named))

ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
scheduler = tuning.SavingFIFO()
probe = Probe()
callbacks = [tuning.StateSaver(scheduler), probe] if with_saver else [probe]
tune.Tuner(trial, tune_config=tune.TuneConfig(metric="val/acc", mode="max", scheduler=scheduler, num_samples=1),
           run_config=tune.RunConfig(name="exp", storage_path=storage, callbacks=callbacks, verbose=0,
                                     checkpoint_config=tune.CheckpointConfig(num_to_keep=2))).fit()
print(json.dumps(probe.seen))
'''


@pytest.mark.parametrize("with_saver", [True, False], ids=["with-StateSaver", "Tune-alone"])
def test_the_saved_state_never_names_a_deleted_checkpoint(tmp_path, with_saver):
    """Tune deletes a trial's oldest kept checkpoint as a new one lands, but saves the state
    that names the checkpoint to resume from only now and then: a driver killed in between
    resumed the trial from a deleted checkpoint (seen in CI). With StateSaver the state on the
    storage always names the previous checkpoint or a newer one, which keep_checkpoints: 2
    keeps; Tune alone (the control) lags further behind."""
    r = subprocess.run([sys.executable, "-c", STATE_PROBE, str(tmp_path), "1" if with_saver else "0"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert r.returncode == 0, r.stdout + r.stderr
    seen = [tuple(x) for x in __import__("json").loads(r.stdout.strip().splitlines()[-1])]
    assert [landing for landing, _ in seen] == list(range(6))
    # checkpoint n lands, then n - 2 is deleted: the saved state must name n - 1 or later
    lagging = [(landing, named) for landing, named in seen if landing >= 2 and named < landing - 1]
    if with_saver:
        assert lagging == [], seen
    else:
        assert lagging, f"Tune alone kept its state current: the control shows nothing {seen}"
