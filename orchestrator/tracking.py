"""MLflow tracking from the driver: one parent run per sweep, exactly one child run per trial.

All MLflow calls go through ``MlflowClient`` with explicit run ids, never the fluent
``mlflow.start_run`` state, and only the driver talks to MLflow. That avoids the known
Ray Tune + MLflow pitfalls (runs split between parent and child, duplicate runs after a
retry, workers writing to a store the driver cannot see: ray-project/ray 19978, 36257,
30649, 46569). A trial's child run is found again by its tags after a retry or a resume.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional
from urllib.parse import urlsplit, urlunsplit

from ray.tune import Callback

TAG_SWEEP = "tl_sweep.sweep_id"
TAG_TRIAL = "tl_sweep.trial_id"
TAG_PRUNED = "tl_sweep.pruned"
TAG_ERROR = "tl_sweep.error"
TAG_ROLE = "tl_sweep.role"
TAG_NODE = "tl_sweep.node_id"
SECRET_WORDS = ("token", "password", "secret", "access_key", "api_key")

# Callbacks that Tune unpickled while restoring an experiment (tl-sweep resume): the driver
# takes them from here, since Tune restores its callbacks from the pickled run config.
RESTORED: List["DriverCallback"] = []


class DriverCallback(Callback):
    """A Tune callback with driver-only handles (an MLflow client, a console).

    Tune pickles callbacks with the experiment; the handles are left out and rebuilt when a
    restored experiment unpickles them."""

    driver_only: tuple = ()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in self.driver_only}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.rebuild()
        RESTORED.append(self)

    def rebuild(self) -> None:
        raise NotImplementedError


def redact(text: str) -> str:
    """Drop credentials from URIs (user:password@host) and secret-looking query values."""
    def one(m: "re.Match[str]") -> str:
        parts = urlsplit(m.group(0))
        if parts.username or parts.password:
            host = parts.hostname or ""
            netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
            parts = parts._replace(netloc=netloc)
        return urlunsplit(parts)

    text = re.sub(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"]+", one, text)
    return re.sub(r"(?i)((?:token|password|secret|access_key|api_key)[^=&\s]*=)[^&\s'\"]+", r"\1***", text)


def default_tracking_uri(storage_path: str) -> str:
    """A local sqlite store inside the sweeps folder (no server needed)."""
    return "sqlite:///" + str((Path(storage_path) / "mlflow.db").resolve())


def resolve_tracking_uri(cli_uri: Optional[str], spec_uri: Optional[str], storage_path: str) -> str:
    """The tracking URI without credentials: ``user:password@`` moves into MLflow's own
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD for this process, so the URI that is
    stored (sweep.json, Tune's experiment state) and printed holds no secret."""
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or spec_uri or default_tracking_uri(storage_path)
    parts = urlsplit(uri)
    if parts.username or parts.password:
        os.environ["MLFLOW_TRACKING_USERNAME"] = parts.username or ""
        os.environ["MLFLOW_TRACKING_PASSWORD"] = parts.password or ""
        netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
        uri = urlunsplit(parts._replace(netloc=netloc))
    return uri


def terminate(client, run_id: str, status: str) -> None:
    """End a run; MLflow prints 'View run ... at' links to stdout for HTTP stores, which would
    break the live table, so that goes nowhere (the summary prints the UI command)."""
    with contextlib.redirect_stdout(io.StringIO()):
        client.set_terminated(run_id, status=status)


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(client, name: str, storage_path: str, local_store: bool) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = (Path(storage_path) / "mlartifacts").resolve().as_uri() if local_store else None
    return client.create_experiment(name, artifact_location=location)


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def is_secret(key: str) -> bool:
    k = key.lower()
    return any(w in k for w in SECRET_WORDS)


def log_params(client, run_id: str, params: Dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, redact(str(v))[:6000]) for k, v in flatten(params).items() if not is_secret(k)]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[i : i + 100])


def metric_items(result: Dict[str, Any]) -> Dict[str, float]:
    """The trainable's own metrics (namespaced keys, epoch, images_per_s), not Ray's bookkeeping."""
    out = {}
    for k, v in result.items():
        if ("/" in k or k in ("epoch", "images_per_s")) and isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out


class MlflowTracker(DriverCallback):
    """A Ray Tune callback on the driver that mirrors every trial into its MLflow child run."""

    driver_only = ("client",)

    def __init__(
        self,
        uri: str,
        experiment_id: str,
        parent_run_id: str,
        sweep_id: str,
        epochs_of: Callable[[Dict[str, Any]], int],
        trial_spec: Callable[[Dict[str, Any]], str],
    ):
        self.uri, self.experiment_id = uri, experiment_id
        self.parent_run_id, self.sweep_id = parent_run_id, sweep_id
        self.epochs_of, self.trial_spec = epochs_of, trial_spec
        self.runs: Dict[str, str] = {}
        self.closed: Dict[str, str] = {}
        self.rebuild()

    def rebuild(self) -> None:
        self.client = client_for(self.uri)
        # After a restart, trials re-run from their checkpoints: learn again what each has logged.
        self.runs, self.closed, self.logged_epoch, self.nodes = {}, {}, {}, {}

    # --------------------------------------------------------------- child runs
    def run_for(self, trial) -> str:
        """The trial's one child run: cached, else found by tag (retry / resume), else created."""
        tid = trial.trial_id
        if tid in self.runs:
            return self.runs[tid]
        found = find_child_run(self.client, self.experiment_id, self.parent_run_id, tid)
        if found:
            run_id = found[0].info.run_id
            self.logged_epoch[tid] = int(found[0].data.metrics.get("epoch", 0))
            if found[0].info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"trial-{tid}",
                tags={"mlflow.parentRunId": self.parent_run_id, TAG_TRIAL: tid, TAG_SWEEP: self.sweep_id, TAG_ROLE: "trial"},
            )
            run_id = run.info.run_id
            log_params(self.client, run_id, trial.config)
            self.client.log_text(run_id, redact(self.trial_spec(trial.config)), "trial_spec.yaml")
        self.runs[tid] = run_id
        return run_id

    def _close(self, trial, status: str, tags: Optional[Dict[str, str]] = None) -> None:
        run_id = self.run_for(trial)
        for k, v in (tags or {}).items():
            self.client.set_tag(run_id, k, v)
        terminate(self.client, run_id, status)
        self.closed[trial.trial_id] = status

    # --------------------------------------------------------------- Tune hooks
    def on_trial_start(self, iteration, trials, trial, **info):
        self.run_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from mlflow.entities import Metric

        step = int(result.get("epoch", result.get("training_iteration", 0)))
        run_id = self.run_for(trial)
        if step <= self.logged_epoch.get(trial.trial_id, 0):
            return  # an epoch re-run after a restart from an older checkpoint: keep one value per step
        self.logged_epoch[trial.trial_id] = step
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in metric_items(result).items()]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)
        node = result.get("node_id")
        if node and self.nodes.get(trial.trial_id) != node:  # the node a (restarted) trial runs on
            self.nodes[trial.trial_id] = node
            self.client.set_tag(run_id, TAG_NODE, str(node))

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        epochs = self.epochs_of(trial.config)
        self.run_for(trial)
        done = max(int(last.get("epoch", 0)), self.logged_epoch.get(trial.trial_id, 0))
        if done < epochs:
            self._close(trial, "KILLED", {TAG_PRUNED: "true"})
        else:
            self._close(trial, "FINISHED", {TAG_PRUNED: "false"})

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial, "FAILED", {TAG_ERROR: redact(trial_error_text(trial))[-4000:]})

    def on_trial_recover(self, iteration, trials, trial, **info):
        # The trial restarts from its last checkpoint (failure.max_retries): same child run.
        self.client.set_tag(self.run_for(trial), "tl_sweep.retries", str(trial.num_failures))

    def close_open_runs(self, trials: List[Any], status: str = "KILLED") -> None:
        """After an interrupt: close every child run still RUNNING (no orphans)."""
        for trial in trials:
            if trial.trial_id in self.runs and trial.trial_id not in self.closed:
                self._close(trial, status)


def find_child_run(client, experiment_id: str, parent_run_id: str, trial_id: str):
    """A trial's child run, by its tags, as a one-element list (or empty)."""
    return client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_TRIAL}` = '{trial_id}' and tags.`mlflow.parentRunId` = '{parent_run_id}'",
        max_results=1,
    )


def trial_error_text(trial) -> str:
    try:
        err = trial.get_error()
        if err is not None:
            return str(err).strip()
    except Exception:  # the error file may be missing on a remote store
        pass
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        return Path(path).read_text(errors="replace").strip()
    return "trial failed (no error text recorded)"


def short_error(text: str) -> str:
    """The last line that names an exception, for tables and summaries."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "Exception" in ln:
            return ln[:300]
    return (lines[-1] if lines else text)[:300]


def write_json(path: Path, data: Dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)
