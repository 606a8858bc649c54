"""Reports from real shrunk sweeps (strategy 1 and strategy 2 on tiny Pets, through the real
command): the figures' data against MLflow, the parent run's summary and artifacts, the best
model logged and registered, the kept Optuna study opened by Optuna and optuna-dashboard, and
the HTML page in a real headless browser."""
from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import SEARCH_SPACES, make_pets, run_cli, shrunk
from test_e2e import mlflow_client, only_sweep, sweep_runs

pytestmark = pytest.mark.slow

FROM_SCRATCH = {"model.name": "resnet18", "model.weights": "none"}
S1 = {"train.epochs": 2, "search.space.strategy.unfreeze_last": {"grid": [1, 2, 3]},
      "search.scheduler.grace_period": 1, "search.scheduler.reduction_factor": 2,
      "description": "strategy 1 shrunk - the last l layer groups"}
S2 = {"train.epochs": 2, "search.space.strategy.unfreeze_every": {"grid": [1, 2]},
      "search.space.train.schedule_scope": {"choice": ["shared"]}, "search.scheduler.grace_period": 1}
LONG_FLOAT = re.compile(r"\d\.\d{6,}")  # 0.002243750112826068: what a person should not have to read


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    work = tmp_path_factory.mktemp("report")
    pets = make_pets(work / "pets")
    storage = work / "sweeps"
    out = {}
    for name, extra in (("strategy1", S1), ("strategy2", S2)):
        r = run_cli(["run", str(SEARCH_SPACES / f"{name}.yaml"), *shrunk({**FROM_SCRATCH, **extra}),
                     "--set", f"data.root={pets}", "--set", f"storage.path={storage}"], cwd=work)
        assert r.returncode == 0, r.stdout + r.stderr
        out[name] = (only_sweep(storage, name), r)
    return work, storage, out


def best_of(client, run_id: str, metric: str = "val/acc") -> float:
    return max(m.value for m in client.get_metric_history(run_id, metric))


def test_the_run_writes_the_report_and_the_parent_run_summarises_the_sweep(sweeps):
    work, storage, out = sweeps
    meta, r = out["strategy1"]
    client = mlflow_client(storage)
    parent, children = sweep_runs(client, meta)
    report = storage / meta["id"] / "report" / "report.html"
    assert f"report: {report}" in r.stdout and report.exists()
    assert f"#/experiments/{meta['experiment_id']}/runs" in r.stdout, "the summary opens the runs table"
    assert not LONG_FLOAT.search(r.stdout), r.stdout

    # the experiment table compares sweeps without opening them
    top = max(best_of(client, c.info.run_id) for c in children)
    [best] = [c for c in children if c.info.run_id == parent.data.tags["tl_sweep.best_run_id"]]
    assert best_of(client, best.info.run_id) == pytest.approx(top), "a tie goes to the trial with the checkpoint"
    assert best.data.tags["tl_sweep.best"] == "true"
    assert parent.data.metrics["best/val/acc"] == pytest.approx(top)
    assert parent.data.params["best.strategy.unfreeze_last"] == best.data.params["strategy.unfreeze_last"]
    assert parent.data.tags["tl_sweep.best_trial"] == best.info.run_name
    assert parent.data.tags["mlflow.note.content"] == S1["description"]
    assert parent.data.tags["mlflow.source.type"] == "LOCAL" and parent.data.tags["mlflow.user"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"spec.yaml", "best.yaml", "report"} <= artifacts
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/study.png", "report/curves.png", "report/figures.json"} <= logged
    exported = yaml.safe_load(Path(client.download_artifacts(parent.info.run_id, "best.yaml")).read_text())
    assert str(exported["strategy"]["unfreeze_last"]) == best.data.params["strategy.unfreeze_last"]

    # only the spec's effective values: searched keys as their distributions, no None, no empty slot
    params = parent.data.params
    assert params["spec.strategy.unfreeze_last"] == "grid[1, 2, 3]"
    assert params["spec.train.lr"].startswith("loguniform[")
    assert "None" not in params.values() and "[]" not in params.values() and "{}" not in params.values()
    assert not [k for k in params if k.startswith("spec.strategy.unfreeze_every")], "a strategy-2 field"

    # the data set as an MLflow dataset input, on the parent and on every child
    for run in [parent, *children]:
        [ds] = run.inputs.dataset_inputs
        profile = json.loads(ds.dataset.profile)
        assert ds.dataset.name.startswith("pets") and ds.dataset.digest and profile["splits"]["test"] == 12


def test_figures_show_the_trials_metrics(sweeps):
    work, storage, out = sweeps
    meta, _ = out["strategy1"]
    client = mlflow_client(storage)
    _, children = sweep_runs(client, meta)
    figures = json.loads((storage / meta["id"] / "report" / "figures.json").read_text())

    study = figures["study"]
    assert study["x"] == "strategy.unfreeze_last" and study["y"] == "val/acc"
    want = sorted((int(c.data.params["strategy.unfreeze_last"]), round(best_of(client, c.info.run_id), 6))
                  for c in children)
    assert sorted((p["x"], round(p["y"], 6)) for p in study["points"]) == want, "one point per trial, its best val/acc"

    curves = {t["name"]: t for t in figures["curves"]["trials"]}
    for c in children:
        steps = [s for s, _ in curves[c.info.run_name]["val/acc"]]
        assert steps == list(range(1, int(c.data.tags["tl_sweep.epochs"]) + 1)), "a pruned trial's curve ends at its rung"
        status = c.data.tags["tl_sweep.status"]
        assert curves[c.info.run_name]["status"] == status and status in ("finished", "pruned")

    imp = figures["importance"]
    for method in ("fanova", "ped_anova"):
        assert set(imp[method]) == {"strategy.unfreeze_last", "train.lr"}
        assert math.isclose(sum(imp[method].values()), 1.0, abs_tol=1e-6), imp
    assert imp["n"] == 3

    board = figures["leaderboard"]
    shown = [float(row["best val/acc"]) for row in board["rows"]]
    assert shown == sorted(shown, reverse=True), "best first"
    assert shown[0] == pytest.approx(max(best_of(client, c.info.run_id) for c in children), abs=1e-4)
    assert not LONG_FLOAT.search(json.dumps(board["rows"])), board["rows"]
    res = figures["resources"]
    epochs_run = sum(int(c.data.tags["tl_sweep.epochs"]) for c in children)
    assert res["trial_epochs"] == epochs_run and res["without_early_stopping"] == 3 * 2

    errors = figures["errors"]
    assert errors["classes"] and len(errors["matrix"]) == len(errors["classes"]) == 4
    assert sum(map(sum, errors["matrix"])) == 12, "every test image counted once"


def test_children_are_named_by_what_they_vary_and_carry_what_applies(sweeps):
    work, storage, out = sweeps
    meta, _ = out["strategy2"]
    client = mlflow_client(storage)
    _, children = sweep_runs(client, meta)
    for c in children:
        every = c.data.params["strategy.unfreeze_every"]
        assert c.info.run_name.startswith(f"every={every} scope=shared lr="), c.info.run_name
        assert "strategy.unfreeze_last" not in c.data.params, "a strategy-1 field on a strategy-2 trial"
        assert "train.momentum" not in c.data.params, "momentum with AdamW"
        assert "epoch" not in c.data.metrics and c.data.tags["tl_sweep.status"] in ("finished", "pruned")
        assert c.data.tags["mlflow.source.name"] == "tl-sweep"


def test_the_best_model_is_logged_and_registers(sweeps):
    import mlflow
    import numpy as np

    work, storage, out = sweeps
    meta, _ = out["strategy1"]
    client = mlflow_client(storage)
    parent = client.get_run(meta["parent_run_id"])
    best = client.get_run(parent.data.tags["tl_sweep.best_run_id"])
    assert best.info.status == "FINISHED", "logging the model left the run as it was"
    model_id = best.data.tags["tl_sweep.model_id"]
    logged = client.get_logged_model(model_id)
    assert logged.source_run_id == best.info.run_id

    for version in ("1", "2"):  # a second export adds a version
        r = run_cli(["export", meta["id"], "--storage", str(storage), "-o", str(work / "best.yaml"),
                     "--register", "pets-s1"], cwd=work, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"registered the best trial's model as pets-s1 version {version}" in r.stdout
    mlflow.set_tracking_uri(f"sqlite:///{storage / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/pets-s1/2")
    assert list(model.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 3, 32, 32]
    images = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    assert model.predict(images).shape == (3, 4)

    blank = run_cli(["export", meta["id"], "--storage", str(storage), "--register", " "], cwd=work, timeout=120)
    assert blank.returncode == 2 and "--register" in blank.stderr


def test_the_optuna_study_is_kept_and_opens_in_optuna_and_its_dashboard(sweeps, tmp_path):
    import optuna

    work, storage, out = sweeps
    meta, _ = out["strategy1"]
    url = f"sqlite:///{storage / meta['id'] / 'optuna.db'}"
    study = optuna.load_study(study_name=meta["id"], storage=url)
    assert len(study.trials) == 3 and {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED"}
    client = mlflow_client(storage)
    _, children = sweep_runs(client, meta)
    lrs = sorted(float(c.data.params["train.lr"]) for c in children)
    assert sorted(t.params["train.lr"] for t in study.trials) == pytest.approx(lrs)

    # into another RDB: a user's own study storage
    mine = f"sqlite:///{tmp_path / 'mine.db'}"
    r = run_cli(["study", meta["id"], "--storage", str(storage), "--to", mine], cwd=work, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"optuna-dashboard {mine}" in r.stdout
    assert len(optuna.load_study(study_name=meta["id"], storage=mine).trials) == 3

    exe = shutil.which("optuna-dashboard") or str(Path(sys.executable).with_name("optuna-dashboard"))
    port = free_port()
    dash = subprocess.Popen([exe, url, "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        studies = wait_json(f"http://127.0.0.1:{port}/api/studies")
        [summary] = studies["study_summaries"]
        assert summary["study_name"] == meta["id"]
        detail = wait_json(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}")
        assert len(detail["trials"]) == 3
        assert {p["name"] for t in detail["trials"] for p in t["params"]} == {"strategy.unfreeze_last", "train.lr"}
    finally:
        dash.terminate()
        dash.wait(timeout=30)


def test_show_prints_for_people_and_for_scripts(sweeps):
    work, storage, out = sweeps
    meta, _ = out["strategy1"]
    got = {}
    for form in ("table", "csv", "json", "markdown"):
        r = run_cli(["show", meta["id"], "--storage", str(storage), "--format", form], cwd=work, timeout=120)
        assert r.returncode == 0, r.stderr
        got[form] = r.stdout
    data = json.loads(got["json"])
    assert len(data["trials"]) == 3 and data["metric"] == "val/acc"
    rows = list(csv.DictReader(io.StringIO(got["csv"])))
    assert [row["trial"] for row in rows] == [t["trial"] for t in data["trials"]]
    for row, t in zip(rows, data["trials"]):  # people read rounded values; scripts get exact ones
        assert float(row["train.lr"]) == pytest.approx(float(t["train.lr"]), rel=5e-3)
    assert not LONG_FLOAT.search(got["table"]) and not LONG_FLOAT.search(got["csv"])
    assert got["markdown"].splitlines()[1].startswith("|---")


def test_two_sweeps_side_by_side(sweeps):
    work, storage, out = sweeps
    ids = [out[n][0]["id"] for n in ("strategy1", "strategy2")]
    target = work / "s1-vs-s2"
    r = run_cli(["report", *ids, "--storage", str(storage), "-o", str(target)], cwd=work, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    page = (target / "report.html").read_text()
    figures = json.loads((target / "figures.json").read_text())
    for sweep_id in ids:
        assert f"<h2>{sweep_id}</h2>" in page
        assert f"{sweep_id}-leaderboard" in figures and (target / f"{sweep_id}-curves.png").exists()
    study = figures["study"]
    assert study["x"] == "sweep", "strategy 1 and 2 vary different keys: one column per sweep"
    assert {p["sweep"] for p in study["points"]} == set(ids) and len(study["points"]) == 3 + 2

    missing = run_cli(["report", ids[0], "nosuch", "--storage", str(storage), "-o", str(work / "x")], cwd=work,
                      timeout=120)
    assert missing.returncode == 2 and "nosuch" in missing.stderr and not (work / "x").exists()


def test_the_report_renders_in_a_real_browser(sweeps):
    """Debian's chromium through Playwright: every figure decoded, no console error, and no
    request for anything but the page itself (the figures are inlined)."""
    from playwright.sync_api import sync_playwright

    work, storage, out = sweeps
    meta, _ = out["strategy1"]
    page_file = storage / meta["id"] / "report" / "report.html"
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "tests/install.sh installs Debian's chromium"
    errors, requests = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda req: requests.append(req.url))
            page.goto(page_file.as_uri())
            page.wait_for_load_state("load")
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => [e.alt, e.complete, e.naturalWidth, e.naturalHeight])")
            text = page.inner_text("body")
        finally:
            browser.close()
    assert errors == []
    assert {name for name, *_ in images} >= {"study.png", "curves.png", "parallel.png", "importance.png",
                                              "confusion.png"}
    assert all(done and w > 100 and h > 100 for _, done, w, h in images), images
    assert [u for u in requests if not u.startswith(("file://", "data:"))] == []
    assert "Leaderboard" in text and "Parameter importance" in text and meta["id"] in text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_json(url: str, timeout: float = 60):
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.loads(r.read())
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)
