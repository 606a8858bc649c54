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
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from ray.tune import Callback

from orchestrator.secrets import SECRET_ENV, is_secret, redact, strip_credentials
from trainables import metrics as M
from trainables.config import applicable, done

TAG_SWEEP = "tl_sweep.sweep_id"
TAG_TRIAL = "tl_sweep.trial_id"  # the Ray Tune trial that ran (or last carried on) the child run
TAG_INDEX = "tl_sweep.trial_index"  # the trial's index in the sweep's study: what identifies a child run
TAG_LOST = "tl_sweep.lost"
TAG_PRUNED = "tl_sweep.pruned"
TAG_ERROR = "tl_sweep.error"
TAG_ROLE = "tl_sweep.role"
TAG_NODE = "tl_sweep.node_id"
TAG_RETRIES = "tl_sweep.retries"
TAG_BEST = "tl_sweep.best"
TAG_STARTS = "tl_sweep.starts"
TAG_STATUS = "tl_sweep.status"  # finished | pruned | failed | stopped
TAG_EPOCHS = "tl_sweep.epochs"  # epochs run (the metrics' step is the epoch: no epoch metric)


class DriverCallback(Callback):
    """A Tune callback with handles of the process it runs in (an MLflow client, a console).

    Tune pickles its callbacks: into the experiment (tuner.pkl) when a sweep starts, and, with
    Ray Client, to the head node that runs the sweep's loop. The handles are left out (each is
    made again where it is first needed); credentials are never in a callback's state. A
    resumed sweep hands Tune fresh callbacks (sweep.resume_sweep)."""

    driver_only: tuple = ()

    def __getstate__(self):
        return {k: (None if k in self.driver_only else v) for k, v in self.__dict__.items()}


def default_tracking_uri(storage_path: str) -> str:
    """A local sqlite store inside the sweeps folder (no server needed)."""
    return "sqlite:///" + str((Path(storage_path) / "mlflow.db").resolve())


def resolve_tracking_uri(cli_uri: Optional[str], spec_uri: Optional[str], storage_path: str) -> str:
    """The tracking URI without credentials: ``user:password@`` moves into MLflow's own
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD for this process, so the URI that is
    stored (sweep.json, Tune's experiment state) and printed holds no secret."""
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or spec_uri or default_tracking_uri(storage_path)
    return strip_credentials(uri, "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def terminate(client, run_id: str, status: str) -> None:
    """End a run; MLflow prints 'View run ... at' links to stdout for HTTP stores, which would
    break the live table, so that goes nowhere (the summary prints the UI command)."""
    with contextlib.redirect_stdout(io.StringIO()):
        client.set_terminated(run_id, status=status)


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(client, name: str, storage_path: str, local_store: bool) -> str:
    from orchestrator.sweepdir import InputError

    exp = client.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage == "deleted":
        raise InputError(f"tracking: the MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore "
                         f"--experiment-id {exp.experiment_id}) or name another with tracking.experiment")
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


def log_params(client, run_id: str, params: Dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, redact(str(v))[:6000]) for k, v in flatten(params).items() if not is_secret(k)]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[i : i + 100])


def metric_items(result: Dict[str, Any]) -> Dict[str, float]:
    """The trainable's own metrics (namespaced keys, images_per_s), not Ray's bookkeeping; not
    the epoch either: it is every metric's step."""
    return {k: float(v) for k, v in result.items()
            if M.is_trial_metric(k) and k != M.EPOCH and isinstance(v, (int, float)) and not isinstance(v, bool)}


def source_tags(kind: str) -> Dict[str, str]:
    """Who and what made a run, where the MLflow UI looks for them."""
    import getpass

    try:
        user = getpass.getuser()
    except Exception:  # no user name in a container without one
        user = "unknown"
    return {"mlflow.user": user, "mlflow.source.name": "tl-sweep", "mlflow.source.type": kind}


def run_name(config: Dict[str, Any], varying: List[str], trial_id: str) -> str:
    """A child run's name: the values it varies, short (``l=4 lr=3.2e-4``)."""
    from orchestrator.fmt import num, short
    from orchestrator.spec import get_path

    parts = [f"{short(k)}={num(get_path(config, k, ''))}" for k in varying]
    return " ".join(parts) if parts else f"trial-{trial_id}"


def on_ctrl_c(mark: Callable[[], None]) -> None:
    """For a callback's setup: Tune has just put in its Ctrl-C handler (stop the loop, save the
    experiment state, then stop every trial, each through on_trial_complete). Wrapped, so that
    the callback tells those stops from trials that ended: an interrupted trial stays
    resumable, not pruned. With Ray Client the loop runs on the head (not its main thread) and
    Ctrl-C reaches the driver as KeyboardInterrupt."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    tune_handler = signal.getsignal(signal.SIGINT)

    def interrupt(signum, frame):
        mark()
        if callable(tune_handler):
            tune_handler(signum, frame)
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)


def trial_outcome(trial, epochs_run: int) -> str:
    """'done' when the trial ran all its epochs, else 'pruned' (the scheduler stopped it)."""
    return "done" if done(trial.config, epochs_run) else "pruned"


class MlflowTracker(DriverCallback):
    """A Ray Tune callback on the driver that mirrors every trial into its MLflow child run."""

    driver_only = ("_client",)

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, sweep_id: str,
                 trial_spec: Callable[[Dict[str, Any]], str], broker: Optional[str] = None,
                 varying: Optional[List[str]] = None, source: str = "LOCAL",
                 datasets: Optional[Callable[[Dict[str, Any]], Any]] = None):
        self.uri, self.experiment_id = uri, experiment_id
        self.parent_run_id, self.sweep_id = parent_run_id, sweep_id
        self.trial_spec, self.broker = trial_spec, broker
        self.varying, self.source, self.datasets = list(varying or []), source, datasets
        self.runs: Dict[str, str] = {}
        self.closed: Dict[str, str] = {}
        self.logged_epoch: Dict[str, int] = {}
        self.nodes: Dict[str, str] = {}
        self.starts: Dict[str, int] = {}
        self.interrupted = False
        self._client = None

    def setup(self, **info):
        on_ctrl_c(lambda: setattr(self, "interrupted", True))

    @property
    def client(self):
        if self._client is None:
            mlflow_env = [k for k in SECRET_ENV if k.startswith("MLFLOW_")]
            if self.broker and not any(os.environ.get(k) for k in mlflow_env):
                # with Ray Client, this runs on the head: the driver's MLflow credentials are
                # in the sweep's broker, not in this process
                from trainables.secrets import apply

                apply(self.broker)
            self._client = client_for(self.uri)
        return self._client

    # --------------------------------------------------------------- child runs
    def run_for(self, trial) -> str:
        """The trial's one child run: cached, else found by its index in the sweep (a retry, a
        resume, or a trial that a resumed sweep starts again in the place of one its driver had
        started but not yet recorded when it died), else created."""
        tid = trial.trial_id
        if tid in self.runs:
            return self.runs[tid]
        index = str(trial.config.get("trial_index", tid))
        found = find_child_run(self.client, self.experiment_id, self.parent_run_id, index)
        if found:
            run_id = found[0].info.run_id
            self.logged_epoch[tid] = int(found[0].data.tags.get(TAG_EPOCHS, 0))
            self.starts[tid] = int(found[0].data.tags.get(TAG_STARTS, 0))
            if found[0].data.tags.get(TAG_TRIAL) != tid:
                self.client.set_tag(run_id, TAG_TRIAL, tid)
            if found[0].info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(
                self.experiment_id,
                run_name=run_name(trial.config, self.varying, tid),
                tags={"mlflow.parentRunId": self.parent_run_id, TAG_TRIAL: tid, TAG_INDEX: index,
                      TAG_SWEEP: self.sweep_id, TAG_ROLE: "trial", TAG_STATUS: "running", **source_tags(self.source)},
            )
            run_id = run.info.run_id
            log_params(self.client, run_id, applicable(trial.config, keep=self.varying))
            self.client.log_text(run_id, redact(self.trial_spec(trial.config)), "trial_spec.yaml")
            dataset = self.datasets(trial.config) if self.datasets else None
            if dataset is not None:
                self.client.log_inputs(run_id, datasets=[dataset])
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
        # how often the trial started: 1, plus one per resume or retry that went on with it
        run_id = self.run_for(trial)
        starts = self.starts.get(trial.trial_id, 0) + 1
        self.starts[trial.trial_id] = starts
        self.client.set_tag(run_id, TAG_STARTS, str(starts))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from mlflow.entities import Metric, RunTag

        step = int(result.get(M.EPOCH, result.get("training_iteration", 0)))
        run_id = self.run_for(trial)
        if step <= self.logged_epoch.get(trial.trial_id, 0):
            return  # an epoch re-run after a restart from an older checkpoint: keep one value per step
        self.logged_epoch[trial.trial_id] = step
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in metric_items(result).items()]
        self.client.log_batch(run_id, metrics=metrics, tags=[RunTag(TAG_EPOCHS, str(step))])
        for k, v in result.items():  # files a phase made (forgetting's accuracy matrix)
            if k.startswith(M.ARTIFACT_PREFIX) and isinstance(v, str):
                self.client.log_text(run_id, v, k[len(M.ARTIFACT_PREFIX):])
        node = result.get(M.NODE_ID)
        if node and self.nodes.get(trial.trial_id) != node:  # the node a (restarted) trial runs on
            self.nodes[trial.trial_id] = node
            self.client.set_tag(run_id, TAG_NODE, str(node))

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        epochs = max(int(last.get(M.EPOCH, 0)), self.logged_epoch.get(trial.trial_id, 0))
        stopped = trial_outcome(trial, epochs) == "pruned"
        if self.interrupted and stopped:
            return  # stopped by Ctrl-C, not by the scheduler: close_open_runs closes it as stopped
        self.run_for(trial)
        if stopped:
            self._close(trial, "KILLED", {TAG_PRUNED: "true", TAG_STATUS: "pruned"})
        else:
            self._close(trial, "FINISHED", {TAG_PRUNED: "false", TAG_STATUS: "finished"})

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial, "FAILED", {TAG_ERROR: redact(trial_error_text(trial))[-4000:], TAG_STATUS: "failed"})

    def on_trial_recover(self, iteration, trials, trial, **info):
        # The trial restarts from its last checkpoint (failure.max_retries): same child run.
        self.client.set_tag(self.run_for(trial), TAG_RETRIES, str(trial.num_failures))

    def close_open_runs(self, trials: List[Any], status: str = "KILLED") -> None:
        """After the sweep stops: close every child run still RUNNING (no orphans), also one
        whose trial a resumed sweep never took up again (tagged lost)."""
        for trial in trials:
            if trial.trial_id in self.runs and trial.trial_id not in self.closed:
                self._close(trial, status, {TAG_STATUS: "stopped"})
        indexes = {str(t.config.get("trial_index")) for t in trials}
        for run in self.client.search_runs([self.experiment_id], max_results=10000, filter_string=(
                f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' and attributes.status = 'RUNNING'")):
            if trials and run.data.tags.get(TAG_INDEX) not in indexes:
                self.client.set_tag(run.info.run_id, TAG_LOST, "true")
            self.client.set_tag(run.info.run_id, TAG_STATUS, "stopped")
            terminate(self.client, run.info.run_id, status)


def find_child_run(client, experiment_id: str, parent_run_id: str, trial_index: str):
    """A trial's child run, by its index in the sweep, as a one-element list (or empty)."""
    return client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_INDEX}` = '{trial_index}' and tags.`mlflow.parentRunId` = '{parent_run_id}'",
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
