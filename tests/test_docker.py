"""docker/: no Docker engine here, so check what can be checked without one. The services'
commands themselves run in tests/test_cluster.py (PostgreSQL, SeaweedFS, mlflow server with
basic auth, ray start, ray health-check), with every flag of compose.yaml."""
from __future__ import annotations

import re
import subprocess

import yaml

from conftest import REPO

DOCKER = REPO / "docker"


def compose():
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_has_the_cluster_services_with_health_checks_and_volumes():
    c = compose()
    s = c["services"]
    assert {"postgres", "s3", "mlflow", "ray-head", "ray-worker"} <= set(s)
    for name in ("postgres", "s3", "mlflow", "ray-head"):
        assert s[name]["healthcheck"]["test"], name
    assert s["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert s["ray-worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    gpu = s["ray-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and gpu["count"] == 1
    assert {"pgdata", "s3data"} <= set(c["volumes"])
    mlflow = s["mlflow"]["command"]
    assert mlflow[:2] == ["mlflow", "server"] and "--serve-artifacts" in mlflow
    assert mlflow[mlflow.index("--app-name") + 1] == "basic-auth", "MLflow requires a login"
    assert mlflow[mlflow.index("--artifacts-destination") + 1] == "s3://mlflow/"
    assert s["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://mlflow@postgres")


def test_compose_publishes_ports_on_loopback_only_and_secures_ray():
    for name, svc in compose()["services"].items():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
    for name in ("ray-head", "ray-worker"):
        env = compose()["services"][name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"].startswith("/run/secrets/")


def test_no_password_has_a_default_or_goes_on_a_command_line():
    text = (DOCKER / "compose.yaml").read_text()
    assert not re.search(r"\$\{[A-Z_]*(PASSWORD|SECRET|TOKEN|KEY)[A-Z_]*:-", text), "a secret with a default value"
    c = compose()
    for name, svc in c["services"].items():
        command = " ".join(map(str, svc.get("command", [])))
        assert not re.search(r"://[^/@\s]+:[^/@\s]+@", command), f"{name}: credentials on its command line"
        for key, value in (svc.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|TOKEN$", key) and not key.endswith(("_FILE", "_PATH")):
                raise AssertionError(f"{name}: {key} holds a secret in the environment file itself")
            assert not re.search(r"://[^/@\s]+:[^/@\s]+@", str(value)), f"{name}: {key} holds credentials"
    made = set(re.findall(r"^keep (\S+)", (DOCKER / "make-secrets.sh").read_text(), flags=re.M))
    for name, secret in c["secrets"].items():
        assert secret["file"].startswith("./secrets/"), name
        assert secret["file"].removeprefix("./secrets/") in made, f"make-secrets.sh does not make {secret['file']}"
    assert (DOCKER / "secrets" / ".gitignore").read_text().splitlines()[1:3] == ["*", "!.gitignore"]


def test_make_secrets_writes_private_files_and_prints_no_secret(tmp_path):
    (tmp_path / "secrets").mkdir()
    script = tmp_path / "make-secrets.sh"
    script.write_text((DOCKER / "make-secrets.sh").read_text())
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True)
    files = {p.name: p for p in (tmp_path / "secrets").iterdir()}
    assert {"postgres_password", "pgpass", "ray_token", "s3_config.json", "s3_trials"} <= set(files)
    for name, p in files.items():
        assert p.stat().st_mode & 0o077 == 0, f"{name} is readable by others"
        if name.endswith(("password", "token", "secret")):
            assert p.read_text().strip() not in r.stdout + r.stderr
    trials = yaml.safe_load((tmp_path / "secrets" / "s3_config.json").read_text())["identities"][2]
    assert trials["name"] == "trials" and all(a.endswith(":ray") for a in trials["actions"]), \
        "trials get a scoped object-store identity, not the admin one"
    again = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True)
    assert "made" not in again.stdout, "existing secrets are kept"


def test_compose_references_only_files_that_exist():
    for name, svc in compose()["services"].items():
        build = svc.get("build")
        if build:
            context = (DOCKER / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), name
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./"):
                assert (DOCKER / src).exists(), (name, src)
    text = (DOCKER / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (?:--chown=\S+ )?(.+?) \S+$", text, flags=re.M):
        for path in src.split():
            assert (REPO / path).exists(), f"Dockerfile copies {path}, which does not exist"


def test_dockerfile_pins_versions_and_runs_as_a_user():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^FROM \S+:\d+\.\d+\.\d+-cuda", text, flags=re.M), "a pinned CUDA PyTorch base image"
    for req in re.findall(r'"([A-Za-z0-9_.\[\],-]+)(==|>=|<=)?[^"]*"', text.split("RUN pip install", 1)[1].split("\n\n")[0]):
        assert req[1] == "==", f"{req[0]} is not pinned"
    assert re.search(r"^USER (?!root)\w+", text, flags=re.M)


def test_kuberay_and_ray_up_use_token_auth_and_a_reachable_dashboard():
    job = yaml.safe_load((DOCKER / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["entrypoint"].startswith("tl-sweep run ")
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0", "the submitter pod must reach the Jobs API"
    pods = [head["template"]["spec"]["containers"][0], job["spec"]["submitterPodTemplate"]["spec"]["containers"][0],
            *[g["template"]["spec"]["containers"][0] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]]]
    for pod in pods:
        env = {e["name"]: e.get("value") for e in pod["env"]}
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"], pod["name"]
    cluster = yaml.safe_load((DOCKER / "ray-cluster.yaml").read_text())
    assert cluster["provider"]["type"] == "local"
    assert "-e RAY_AUTH_MODE=token" in cluster["docker"]["run_options"]
    assert any(c.startswith("ray start --head") for c in cluster["head_start_ray_commands"])
    for target, local in cluster["file_mounts"].items():
        assert (REPO / local).exists() or local.startswith("./docker/secrets/"), local
    assert (DOCKER / "README.md").is_file()
