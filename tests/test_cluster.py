"""The cluster for real, on 127.0.0.1, with the servers and commands of docker/compose.yaml:
PostgreSQL as MLflow's store, an MLflow server with basic auth, SeaweedFS for storage.uri and
MLflow's artifacts, a two-node Ray cluster with token auth and its Jobs API. The laptop is a
folder no node shares; credentials live only in the URIs or the environment of the commands."""
from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from conftest import run_cli
from servers import start_cluster, start_mlflow, start_postgres, start_s3

pytestmark = pytest.mark.slow
S3_SECRET_NAME = "trials"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    started = []
    try:
        s3 = start_s3(root / "s3")
        started.append(s3.proc.stop)
        pg = start_postgres(root / "pg")
        started.append(pg.stop)
        mlflow = start_mlflow(root / "mlflow", pg, s3)
        started.append(mlflow.proc.stop)
        cluster = start_cluster(root / "ray")
        started.append(cluster.stop)
        alice = ("alice", mlflow.add_user("alice"))
        yield {"s3": s3, "pg": pg, "mlflow": mlflow, "cluster": cluster, "alice": alice, "root": root}
    finally:
        for stop in reversed(started):
            stop()


def laptop_env(stack, **extra):
    """The submitting user's environment: the cluster's token, nothing else of the stack."""
    env = dict(stack["cluster"].env)
    env.update(extra)
    return env


def tiny_cluster_spec(base_spec, name: str, epochs: int = 2) -> dict:
    base_spec["name"] = name
    base_spec["data"].update(max_images=100, image_size=24)
    base_spec["train"]["epochs"] = epochs
    base_spec["search"].update(algorithm="grid", space={"strategy.unfreeze_last": {"grid": [0, 1]}},
                               scheduler={"type": "fifo"})
    base_spec["resources"] = {"cpu": 1, "custom": {"worker_node": 1}}  # only the second node has it
    return base_spec


def wait_job(stack, sweep: str, laptop: Path, want=("SUCCEEDED",), timeout: float = 600) -> str:
    deadline, out = time.time() + timeout, ""
    while time.time() < deadline:
        r = run_cli(["status", sweep, "--address", stack["cluster"].dashboard], cwd=laptop, timeout=120,
                    env=laptop_env(stack))
        out = r.stdout
        if any(w in out for w in want):
            return out
        if "FAILED" in out:  # the job's own words, for the assertion that follows
            return out + run_cli(["logs", sweep, "--address", stack["cluster"].dashboard], cwd=laptop, timeout=120,
                                 env=laptop_env(stack)).stdout
        time.sleep(3)
    raise AssertionError(f"job of {sweep} not done:\n{out}")


def sweep_runs(stack, experiment: str):
    client = stack["mlflow"].client(stack["alice"])
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("tl_sweep.role") == "sweep"]
    return client, runs, parents


@pytest.fixture(scope="module")
def submitted(stack, tmp_path_factory, ):
    """A sweep submitted from a folder no node shares, credentials only in the two URIs."""
    import copy

    from conftest import BASE_SPEC
    import yaml

    laptop = tmp_path_factory.mktemp("laptop")
    s3, mlflow = stack["s3"], stack["mlflow"]
    spec = tiny_cluster_spec(copy.deepcopy(BASE_SPEC), "submitted")
    spec["storage"] = {"uri": s3.uri("ray/sweeps", identity=S3_SECRET_NAME)}
    (laptop / "spec.yaml").write_text(yaml.safe_dump(spec))
    user, password = stack["alice"]
    tracking = mlflow.url.replace("http://", f"http://{user}:{password}@")
    r = run_cli(["submit", "spec.yaml", "--address", stack["cluster"].dashboard, "--tracking-uri", tracking],
                cwd=laptop, env=laptop_env(stack))
    assert r.returncode == 0, r.stdout + r.stderr
    sweep = re.search(r"submitted sweep (\S+)", r.stdout).group(1)
    status = wait_job(stack, sweep, laptop)
    return {"laptop": laptop, "sweep": sweep, "submit": r, "status": status, "tracking": tracking}


def test_a_submitted_sweep_runs_its_driver_and_trials_on_the_cluster(stack, submitted):
    assert "SUCCEEDED" in submitted["status"], submitted["status"]
    assert f"sweep {submitted['sweep']}: 2 trial(s)" in submitted["submit"].stdout, "submit showed the sweep start"
    client, runs, [parent] = sweep_runs(stack, "submitted")
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(runs) == 3 and len(children) == 2
    for c in children:
        assert c.info.status == "FINISHED"
        assert c.data.tags["tl_sweep.node_id"] == stack["cluster"].worker_id, "trials ran where worker_node is"
        assert [m.step for m in client.get_metric_history(c.info.run_id, "val/acc")] == [1, 2]
    # the sweep's state and checkpoints in the object store, MLflow's artifacts in its bucket
    state = stack["s3"].objects("ray")
    assert f"sweeps/{submitted['sweep']}/sweep.json" in state and any("checkpoint" in k for k in state)
    meta = json.loads(state[f"sweeps/{submitted['sweep']}/sweep.json"])
    assert meta["status"] == "finished" and meta["tracking_uri"] == stack["mlflow"].url
    assert any(k.endswith("trial_spec.yaml") for k in stack["s3"].objects("mlflow"))
    # from the laptop: the logs, and the results read from the store
    logs = run_cli(["logs", submitted["sweep"], "--address", stack["cluster"].dashboard], cwd=submitted["laptop"],
                   env=laptop_env(stack), timeout=120)
    assert "finished (2 finished)" in logs.stdout, logs.stdout + logs.stderr
    show = run_cli(["show", submitted["sweep"], "--storage", stack["s3"].uri("ray/sweeps", identity=S3_SECRET_NAME)],
                   cwd=submitted["laptop"], timeout=120,
                   env=laptop_env(stack, MLFLOW_TRACKING_USERNAME=stack["alice"][0],
                                  MLFLOW_TRACKING_PASSWORD=stack["alice"][1]))
    assert show.returncode == 0 and show.stdout.count("FINISHED") == 2, show.stdout + show.stderr


def test_a_sweep_stopped_hard_resumes_from_its_storage_with_nothing_lost(stack, tmp_path, base_spec):
    import subprocess

    import yaml

    s3, cluster = stack["s3"], stack["cluster"]
    spec = tiny_cluster_spec(base_spec, "stopped", epochs=4)
    spec["storage"] = {"uri": s3.uri("ray/sweeps")}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    user, password = stack["alice"]
    # this time the credentials come from the environment
    env = laptop_env(stack, AWS_ACCESS_KEY_ID=s3.keys[S3_SECRET_NAME][0], AWS_SECRET_ACCESS_KEY=s3.keys[S3_SECRET_NAME][1],
                     MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password,
                     MLFLOW_TRACKING_URI=stack["mlflow"].url)
    r = run_cli(["submit", "spec.yaml", "--address", cluster.dashboard], cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    sweep = re.search(r"submitted sweep (\S+)", r.stdout).group(1)

    deadline, logs = time.time() + 300, ""
    while "epoch 2 val/acc" not in logs:  # two epochs in: stop the driver hard
        assert time.time() < deadline, logs
        logs = run_cli(["logs", sweep, "--address", cluster.dashboard], cwd=tmp_path, env=laptop_env(stack),
                       timeout=120).stdout
        time.sleep(1)
    # the cluster is this machine: the job's driver is the process that runs tl-sweep job-run
    pids = [int(p) for p in subprocess.run(["pgrep", "-f", f"job-run {sweep}"], capture_output=True,
                                           text=True).stdout.split()]
    assert pids
    for pid in pids:  # the driver (and the shell Ray started it with)
        os.kill(pid, signal.SIGKILL)
    wait_job(stack, sweep, tmp_path, want=("FAILED",))

    resumed = run_cli(["resume", sweep, "--storage", s3.uri("ray/sweeps"), "--address", cluster.dashboard],
                      cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming sweep {sweep}" in resumed.stdout
    status = wait_job(stack, f"{sweep}-resume", tmp_path)
    assert "SUCCEEDED" in status, status
    client, runs, [parent] = sweep_runs(stack, "stopped")
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(children) == 2 and len(runs) == 3
    for c in children:
        assert c.info.status == "FINISHED", c.data.tags
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "val/acc")]
        assert steps == [1, 2, 3, 4], "every epoch once, across the hard stop"


def test_secrets_never_land_in_a_file_a_log_mlflow_or_the_terminal(stack, submitted):
    user, password = stack["alice"]
    key, secret = stack["s3"].keys[S3_SECRET_NAME]
    secrets = {"mlflow password": password, "s3 secret": secret}
    # the terminal: every command the laptop ran for the submitted sweep
    said = submitted["submit"].stdout + submitted["submit"].stderr + submitted["status"]
    # every file the sweep wrote: the laptop's folder, both nodes' temp dirs (logs, the job's
    # working dir, Tune's staging), the object store, MLflow's database
    files = [p for d in [submitted["laptop"], *stack["cluster"].temp_dirs] for p in Path(d).rglob("*") if p.is_file()
             and p != submitted["laptop"] / "spec.yaml"]  # the user's own spec, which holds the secret: not uploaded
    blobs = {str(p): p.read_bytes() for p in files if p.stat().st_size < 50_000_000}
    blobs.update({f"s3://ray/{k}": v for k, v in stack["s3"].objects("ray").items()})
    blobs.update({f"s3://mlflow/{k}": v for k, v in stack["s3"].objects("mlflow").items()})
    blobs["postgres mlflow"] = stack["pg"].dump("mlflow")
    assert len(blobs) > 50
    for what, value in secrets.items():
        assert value not in said, f"the {what} was shown"
        leaked = [name for name, blob in blobs.items() if value.encode() in blob]
        assert not leaked, f"the {what} was written to {leaked}"
    client, runs, _ = sweep_runs(stack, "submitted")
    for r in runs:
        text = json.dumps([r.data.params, r.data.tags])
        assert password not in text and secret not in text


def test_a_trial_that_fits_no_node_fails_before_anything_starts(stack, tmp_path, base_spec, write_spec):
    base_spec["resources"] = {"cpu": 1, "gpu": 1}
    base_spec["storage"]["path"] = str(tmp_path / "sweeps")
    r = run_cli(["run", str(write_spec(base_spec)), "--address", stack["cluster"].address], cwd=tmp_path,
                timeout=180, env=laptop_env(stack))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "resources: a trial needs 1 CPU, 1 GPU on one node, but no node of this cluster has that (2 node(s)" in r.stderr
    assert not (tmp_path / "sweeps").exists()


def test_ray_client_address_runs_the_sweep_on_the_cluster(stack, tmp_path, base_spec, write_spec):
    base_spec = tiny_cluster_spec(base_spec, "viaclient", epochs=1)
    base_spec["storage"]["path"] = str(tmp_path / "sweeps")
    user, password = stack["alice"]
    r = run_cli(["run", str(write_spec(base_spec)), "--address", stack["cluster"].client,
                 "--tracking-uri", stack["mlflow"].url], cwd=tmp_path,
                env=laptop_env(stack, MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "with Ray Client (ray://) Tune runs the sweep on the head node" in r.stdout, out
    assert "finished (2 finished)" in r.stdout and "View run" not in r.stdout, out
    client, runs, [parent] = sweep_runs(stack, "viaclient")
    children = [x for x in runs if x.data.tags.get("tl_sweep.role") == "trial"]
    assert sorted(c.info.status for c in children) == ["FINISHED", "FINISHED"], ([c.data.tags for c in children], out)
    assert [c for c in children if c.data.tags.get("tl_sweep.best") == "true"], ([c.data.tags for c in children], out)


# --------------------------------------------------------------------------- storage URIs


def test_storage_uris_of_every_form(stack, tmp_path, base_spec, write_spec):
    """Query parameters kept (the sweep's path goes into the URI's path); credentials in the
    URI or in AWS_*; a store that cannot be written is found before anything starts."""
    s3 = stack["s3"]
    key, secret = s3.keys[S3_SECRET_NAME]
    base_spec["train"]["epochs"] = 1
    base_spec["data"].update(max_images=60, image_size=16)
    base_spec["storage"]["path"] = str(tmp_path / "sweeps")
    spec_file = write_spec(base_spec)
    cases = {
        "in the URI": ([f"storage.uri={s3.uri('ray/forms/a', identity=S3_SECRET_NAME)}"], {}),
        "in AWS_*": ([f"storage.uri={s3.uri('ray/forms/b')}"], {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}),
    }
    for case, (sets, env) in cases.items():
        r = run_cli(["run", str(spec_file), *sum((["--set", x] for x in sets), [])], cwd=tmp_path, env=env)
        assert r.returncode == 0, (case, r.stdout + r.stderr)
        assert secret not in r.stdout + r.stderr
    objects = s3.objects("ray")
    for prefix in ("forms/a/", "forms/b/"):
        names = [k for k in objects if k.startswith(prefix)]
        assert any(k.endswith("/sweep.json") for k in names) and any("/tune/" in k for k in names), (prefix, names)
    assert not any("region=" in k or "endpoint_override" in k for k in objects), "the query never went into a path"

    before = set(s3.objects("ray"))
    bad = {
        "a wrong secret": [f"storage.uri={s3.uri('ray/forms/c').replace('s3://', f's3://{key}:wrong@')}"],
        "a closed port": ["storage.uri=s3://ray/forms/d?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"],
        "a bucket that is not there": [f"storage.uri={s3.uri('nosuchbucket/x', identity=S3_SECRET_NAME)}"],
    }
    for case, sets in bad.items():
        storage = tmp_path / f"sweeps-{case.replace(' ', '-')}"
        r = run_cli(["run", str(spec_file), "--set", f"storage.path={storage}", *sum((["--set", x] for x in sets), [])],
                    cwd=tmp_path, timeout=300)
        assert r.returncode == 2, (case, r.stdout + r.stderr)
        assert "storage: cannot write to s3://" in r.stderr, (case, r.stderr)
        assert "wrong" not in r.stderr and secret not in r.stderr, "no credential is shown"
        assert not storage.exists(), f"{case}: nothing left behind"
    assert set(s3.objects("ray")) == before, "nothing written to the store"
