"""docker/: no Docker engine here, so check what can be checked without one. The entry commands
themselves run in tests/test_cluster.py (ray start, ray health-check, mlflow server)."""
from __future__ import annotations

import re

import yaml

from conftest import REPO

DOCKER = REPO / "docker"


def compose():
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_has_the_cluster_services_with_health_checks_and_volumes():
    c = compose()
    s = c["services"]
    assert {"postgres", "minio", "minio-init", "mlflow", "ray-head", "ray-worker"} <= set(s)
    for name in ("postgres", "minio", "mlflow", "ray-head"):
        assert s[name]["healthcheck"]["test"], name
    assert s["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert s["ray-worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    gpu = s["ray-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and gpu["count"] == 1
    assert {"pgdata", "minio", "sweeps"} <= set(c["volumes"])
    mlflow = s["mlflow"]["command"]
    assert mlflow[:2] == ["mlflow", "server"] and "--serve-artifacts" in mlflow
    assert mlflow[mlflow.index("--backend-store-uri") + 1].startswith("postgresql://")
    assert mlflow[mlflow.index("--artifacts-destination") + 1] == "s3://mlflow/"


def test_compose_publishes_ports_on_loopback_only_and_secures_ray():
    for name, svc in compose()["services"].items():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
    for name in ("ray-head", "ray-worker"):
        env = compose()["services"][name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" in env


def test_compose_references_only_files_that_exist():
    for name, svc in compose()["services"].items():
        build = svc.get("build")
        if build:
            context = (DOCKER / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), name
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


def test_kuberay_and_ray_up_examples_parse():
    job = yaml.safe_load((DOCKER / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["entrypoint"].startswith("tl-sweep run ")
    cluster = yaml.safe_load((DOCKER / "ray-cluster.yaml").read_text())
    assert cluster["provider"]["type"] == "local"
    assert any(c.startswith("ray start --head") for c in cluster["head_start_ray_commands"])
    for local in cluster["file_mounts"].values():
        assert (REPO / local).exists()
    assert (DOCKER / "README.md").is_file()
