"""A two-node Ray cluster and a real MLflow server on 127.0.0.1, started with the very commands
docker/compose.yaml runs (ports and paths swapped for local ones), and a sweep across them."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_cli

pytestmark = pytest.mark.slow
COMPOSE = REPO / "docker" / "compose.yaml"
SECRET = "s3cretpass"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compose_command(service: str, values: dict, extra=()) -> list:
    """The service's command from compose.yaml with flag values replaced; every flag kept."""
    cmd = list(yaml.safe_load(COMPOSE.read_text())["services"][service]["command"])
    out, i, used = [], 0, set()
    while i < len(cmd):
        tok = cmd[i]
        flag = tok.split("=", 1)[0]
        if flag in values and "=" in tok:
            out.append(f"{flag}={values[flag]}")
            used.add(flag)
        elif flag in values and i + 1 < len(cmd):
            out += [flag, str(values[flag])]
            used.add(flag)
            i += 1
        else:
            out.append(tok)
        i += 1
    assert used == set(values), f"compose's {service} command lacks {set(values) - used}"
    return [*out, *extra]


def exe(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def wait(check, what: str, timeout: float = 120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    cmd = compose_command("mlflow", {"--host": "127.0.0.1", "--port": port,
                                     "--backend-store-uri": f"sqlite:///{root / 'mlflow.db'}",
                                     "--artifacts-destination": str(root / "artifacts"), "--workers": 1})
    assert cmd[:2] == ["mlflow", "server"]
    proc = subprocess.Popen([exe("mlflow"), *cmd[1:]], cwd=root, stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT)

    def healthy():
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
        except OSError:
            return False

    wait(healthy, "mlflow server /health")
    yield f"http://127.0.0.1:{port}", root
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def ray_env(tmp_path_factory):
    """A secured cluster, as compose runs it: token auth with a token of this test's own."""
    import secrets

    token = tmp_path_factory.mktemp("auth") / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # for the tl-sweep commands the tests run
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, ray_env):
    logs = tmp_path_factory.mktemp("ray")
    gcs, client_port = free_port(), free_port()
    small = ["--object-store-memory=150000000"]
    head = compose_command("ray-head", {"--port": gcs, "--ray-client-server-port": client_port,
                                        "--dashboard-host": "127.0.0.1"}, ["--node-ip-address=127.0.0.1", *small])
    worker = compose_command("ray-worker", {"--address": f"127.0.0.1:{gcs}"},
                             ["--node-ip-address=127.0.0.1", "--num-cpus=2", '--resources={"worker_node": 2}', *small])
    env = dict(os.environ, **ray_env)
    health = yaml.safe_load(COMPOSE.read_text())["services"]["ray-head"]["healthcheck"]["test"]
    health = [exe("ray") if t == "ray" else (f"127.0.0.1:{gcs}" if t == "127.0.0.1:6379" else t) for t in health[1:]]
    procs = []
    try:
        procs.append(subprocess.Popen([exe("ray"), *head[1:]], env=env, stdout=open(logs / "head.log", "w"), stderr=subprocess.STDOUT))
        wait(lambda: subprocess.run(health, capture_output=True, env=env).returncode == 0, "the head's health check")
        procs.append(subprocess.Popen([exe("ray"), *worker[1:]], env=env, stdout=open(logs / "worker.log", "w"), stderr=subprocess.STDOUT))
        yield from _nodes_up(gcs, env, client_port)
    finally:
        subprocess.run([exe("ray"), "stop", "--force"], capture_output=True, timeout=120, env=env)
        for p in procs:
            p.wait(timeout=60)


def _nodes_up(gcs: int, env: dict, client_port: int):

    def nodes():
        r = subprocess.run([sys.executable, "-c", (
            "import json, ray; ray.init(address='127.0.0.1:%d', logging_level='ERROR');"
            "print(json.dumps([(n['NodeID'], n['Resources']) for n in ray.nodes() if n['Alive']]))") % gcs],
            capture_output=True, text=True, env=env)
        return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else []

    wait(lambda: len(nodes()) == 2, "two live nodes")
    worker_id = next(nid for nid, res in nodes() if res.get("worker_node"))
    yield f"127.0.0.1:{gcs}", worker_id, f"ray://127.0.0.1:{client_port}"


def test_sweep_across_two_nodes_tracked_on_an_mlflow_server(tmp_path, base_spec, write_spec, mlflow_server, two_nodes):
    from mlflow.tracking import MlflowClient

    url, server_root = mlflow_server
    address, worker_id, _ = two_nodes
    base_spec["train"]["epochs"] = 1
    base_spec["search"].update(algorithm="grid", space={"strategy.unfreeze_last": {"grid": [0, 1]}})
    base_spec["resources"] = {"cpu": 1, "custom": {"worker_node": 1}}  # only the second node has it
    base_spec["storage"]["path"] = str(tmp_path / "sweeps")
    with_secret = url.replace("http://", f"http://alice:{SECRET}@")
    r = run_cli(["run", str(write_spec(base_spec)), "--address", address, "--tracking-uri", with_secret], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cluster: 2 node(s), 2 CPU, 0 GPU, 2 worker_node; a trial needs 1 CPU, 1 worker_node: 2 trial(s) at once" in r.stdout
    assert "shared file system" in r.stdout, "a local storage path on a multi-node cluster gets a warning"

    client = MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    [parent] = [x for x in runs if x.data.tags.get("tl_sweep.role") == "sweep"]
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and len(children) == 2
    for c in children:
        assert c.info.status == "FINISHED"
        assert c.data.tags["tl_sweep.node_id"] == worker_id, "the trial ran on the node with the custom resource"
        assert [m.step for m in client.get_metric_history(c.info.run_id, "val/acc")] == [1]
        assert "trial_spec.yaml" in [a.path for a in client.list_artifacts(c.info.run_id)]
    # artifacts went through the server into its artifact store, not to a local folder
    stored = {p.name for p in (server_root / "artifacts").rglob("*") if p.is_file()}
    assert {"trial_spec.yaml", "spec.yaml", "checkpoint.pt"} <= stored
    assert not (tmp_path / "sweeps" / "mlartifacts").exists()

    # the password is nowhere: output, sweep folder (incl. Tune's pickled state), MLflow
    assert SECRET not in r.stdout + r.stderr
    for f in (tmp_path / "sweeps").rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f
    assert SECRET.encode() not in (server_root / "mlflow.db").read_bytes()
    meta = json.loads(next((tmp_path / "sweeps").glob("*/sweep.json")).read_text())
    assert meta["tracking_uri"] == url

    out = tmp_path / "best.yaml"
    ex = run_cli(["export", meta["id"], "-o", str(out), "--storage", str(tmp_path / "sweeps")], cwd=tmp_path, timeout=120)
    assert ex.returncode == 0 and SECRET not in out.read_text()


def test_a_trial_that_fits_no_node_fails_before_anything_starts(tmp_path, base_spec, write_spec, two_nodes):
    address, _, _ = two_nodes
    base_spec["resources"] = {"cpu": 1, "gpu": 1}
    base_spec["storage"]["path"] = str(tmp_path / "sweeps")
    r = run_cli(["run", str(write_spec(base_spec)), "--address", address], cwd=tmp_path, timeout=180)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "resources: a trial needs 1 CPU, 1 GPU on one node, but no node of this cluster has that (2 node(s)" in r.stderr
    assert not (tmp_path / "sweeps").exists()


def test_ray_client_address_runs_the_sweep_on_the_cluster(tmp_path, base_spec, write_spec, mlflow_server, two_nodes):
    from mlflow.tracking import MlflowClient

    url, _ = mlflow_server
    _, worker_id, client_address = two_nodes
    base_spec["name"] = "viaclient"
    base_spec["train"]["epochs"] = 1
    base_spec["search"].update(algorithm="grid", space={"strategy.unfreeze_last": {"grid": [0, 1]}})
    base_spec["storage"]["path"] = str(tmp_path / "sweeps")
    r = run_cli(["run", str(write_spec(base_spec)), "--address", client_address, "--tracking-uri", url], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert "with Ray Client (ray://) Tune runs the sweep on the head node" in r.stdout, out
    assert "finished (2 finished)" in r.stdout and "View run" not in r.stdout, out
    client = MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name("viaclient")
    children = [x for x in client.search_runs([exp.experiment_id]) if x.data.tags.get("tl_sweep.role") == "trial"]
    assert sorted(c.info.status for c in children) == ["FINISHED", "FINISHED"], ([c.data.tags for c in children], out)
    assert [c for c in children if c.data.tags.get("tl_sweep.best") == "true"], ([c.data.tags for c in children], out)
