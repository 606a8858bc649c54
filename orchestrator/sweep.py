"""Run one sweep: checks, sweep folder, MLflow parent run, Ray Tune, summary.

Nothing is written and no MLflow run is made until the spec has validated, the storage has been
written to and read back, and the checks that need the data or the model (``trainables.check``)
have passed on a node where trials run; an error there is the user's input (exit 2), not a
failed sweep. If anything fails after that and before the sweep starts, what this run created
is removed again (its folders, its MLflow run), and nothing else.
"""
from __future__ import annotations

import contextlib
import copy
import datetime as dt
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from orchestrator import lineage
from orchestrator import space as sp
from orchestrator import tuning
from orchestrator.secrets import forwarded, redact, without_credentials
from trainables.config import READING_FIELDS
from trainables.secrets import brokered
from orchestrator.spec import Spec, get_path, set_path, validate
from orchestrator.sweepdir import (
    LOG_FILE, POINTER_FILE, SPEC_FILE, TUNE_DIR, InputError, Store, Sweep, new_sweep_id,
)
from orchestrator.tracking import (
    TAG_BEST, TAG_ROLE, TAG_SWEEP, MlflowTracker, client_for, ensure_experiment, find_child_run, log_params,
    resolve_tracking_uri, source_tags, terminate,
)


@dataclass
class SweepOutcome:
    sweep: Sweep
    tracking_uri: str
    status: str
    report: Optional[Path] = None

    @property
    def sweep_id(self) -> str:
        return self.sweep.id


# --------------------------------------------------------------------------- checks where trials run


# Searched keys whose values change what a trial builds (its data, its model, its strategy).
BUILT = ("data.", "model.", "strategy.", "phases.")


def check_configs(spec: Spec) -> List[Tuple[str, Dict[str, Any]]]:
    """The configs to check, labelled: the fixed config, and one per value (or bound) of each
    searched key that changes what a trial builds."""
    base = sp.param_space(spec)  # a searched strategy.name: only the fields the spec sets
    out = [("", base)]
    for key, d in spec.search.space.items():
        if not key.startswith(BUILT):
            continue
        for value in d.candidates():
            cfg = copy.deepcopy(base)
            set_path(cfg, key, value)
            out.append((f"search.space.{key}={value!r}", cfg))
    return out


def _import_trial_modules() -> None:
    """Import the trial's modules (torch among them, ~3 s) in a thread, while a worker runs the
    checks: the Tuner needs them next (it sends the trial function), the best model after. A
    later import of them waits for this one; a failed check exits without it."""
    import threading

    def work():
        with contextlib.suppress(Exception):  # a real import error is raised where the module is used
            import trainables.trainable  # noqa: F401

    threading.Thread(target=work, name="tl-sweep-imports", daemon=True).start()


def run_checks(spec: Spec) -> None:
    """``trainables.check`` as a Ray task with a trial's resources (GPU aside), so it runs on a
    node where trials run: the data set and the weights must be there, not on this machine."""
    import ray

    from trainables.check import check_each

    task = ray.remote(check_each).options(num_cpus=spec.resources.cpu, resources=dict(spec.resources.custom) or None,
                                          max_retries=0)
    pending = task.remote(check_configs(spec))
    _import_trial_modules()
    result = ray.get(pending)
    problems = result["problems"]
    if problems:
        lines = []
        for p in problems:
            where = f"{p['label']}: " if p["label"] else ""
            lines.append(f"{where}{p['key']}: {p['message']}")
        raise InputError("\n".join(dict.fromkeys(lines)))
    return {json.dumps(f["data"]["source"], sort_keys=True): f["data"] for f in result["found"] if f.get("data")}


def dataset_input(info: Dict[str, Any]):
    """A data set as an MLflow run input: name, digest, the config it was read with, split sizes."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    profile = json.dumps({"splits": info["splits"], "classes": info["classes"]})
    return DatasetInput(Dataset(name=info["name"], digest=info["digest"], source_type="tl-sweep",
                                source=json.dumps(info["source"], sort_keys=True), profile=profile),
                        tags=[InputTag("mlflow.data.context", "training")])


def datasets_of(found: Dict[str, Dict[str, Any]]):
    """The MLflow input of a trial's data set, looked up by its data config."""

    def lookup(config: Dict[str, Any]):
        source = {k: v for k, v in config["data"].items() if k not in READING_FIELDS}
        info = found.get(json.dumps(source, sort_keys=True))
        return dataset_input(info) if info else None

    return lookup


# --------------------------------------------------------------------------- helpers


def trial_spec_yaml(raw: Dict[str, Any], searched: List[str], trial_config: Dict[str, Any]) -> str:
    """The spec that re-runs exactly this trial: the search removed, its values and its seed fixed."""
    from trainables.config import TrialConfig

    out = copy.deepcopy(raw)
    for key in searched:
        set_path(out, key, get_path(trial_config, key))
    set_path(out, "train.seed", TrialConfig.parse(trial_config).seed)
    search = dict(out.get("search") or {})
    search.pop("space", None)
    search.update(algorithm="random", num_samples=1, scheduler={"type": "fifo"})
    out["search"] = search
    return yaml.safe_dump(out, sort_keys=False)


def _configure_logs(log_file: Path) -> logging.Handler:
    """Ray's and Tune's own output goes to the sweep's log file, not the terminal."""
    import mlflow  # noqa: F401  (these install their own handlers on import: import first, then redirect)
    import optuna  # noqa: F401
    import ray  # noqa: F401

    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("ray", "ray.tune", "ray.train", "ray.data", "py.warnings", "mlflow", "alembic", "optuna"):
        lg = logging.getLogger(name)
        lg.handlers = [handler]
        lg.propagate = False
        lg.setLevel(logging.INFO)
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    return handler


@contextlib.contextmanager
def _stderr_to(log_file: Path):
    """Send file descriptor 2 to the log while Ray starts: its processes print notices there."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(log_file, "ab") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def init_ray(address: Optional[str], log_file: Path) -> Dict[str, float]:
    """Connect to ``address`` / $RAY_ADDRESS, else start a local Ray (no dashboard)."""
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # Tune's experiment state (the trials' progress, the searcher) is saved at least this often,
    # and as each trial ends (tuning.save_state_now): a driver that dies loses at most the last
    # second of progress, which the trials' checkpoints carry anyway
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    # saving as each trial ends is by design: no warning when trials end a few seconds apart
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    kwargs: Dict[str, Any] = dict(log_to_driver=False, configure_logging=False, ignore_reinit_error=True)
    addr = address or os.environ.get("RAY_ADDRESS")
    with _stderr_to(log_file):
        if addr and addr.startswith("ray://"):
            _connect_client(addr, kwargs)
        elif addr:
            ray.init(address=addr, **kwargs)
        else:
            ray.init(include_dashboard=False, **kwargs)
    _stop_on_sigterm()  # after ray.init, which sets its own SIGTERM handler
    return dict(ray.cluster_resources())


def _connect_client(address: str, kwargs: Dict[str, Any], attempts: int = 4) -> None:
    """Ray Client: the head's proxy starts a server process for each connection, and that
    start now and then fails ("Starting Ray client server failed", or the process is a zombie
    before the proxy reads it); a new attempt gets a new one. Other errors (a wrong address,
    a refused token) are raised at once."""
    import time

    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address, **kwargs)
            return
        except ConnectionAbortedError as e:
            # the server side failed to start its session (its process failed or died at once)
            if "Initialization failure from server" not in str(e) or attempt == attempts:
                raise
            logging.getLogger("ray").warning("Ray Client session did not start (attempt %d): %s", attempt, e)
            time.sleep(2 * attempt)


def _stop_on_sigterm() -> None:
    """SIGTERM (tl-sweep stop, a job Ray stops, a container stopped) stops the sweep as Ctrl-C
    does: trials stopped, MLflow runs closed as KILLED, the sweep resumable."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def keep_credentials_out_of_runtime_env() -> None:
    """Ray Tune copies AWS_* from the driver's environment into every trial actor's runtime
    environment (ray/tune/execution/class_cache.py), and Ray's runtime-env agent writes runtime
    environments, variables included, to its log on each node. tl-sweep hands credentials to
    its trials through the sweep's broker actor instead (trainables/secrets.py), so Tune must
    not copy them."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = frozenset(
        v for v in class_cache.ENV_VARS_TO_PROPAGATE if not v.startswith("AWS_"))


# The brokers of this driver's sweeps: a Ray actor lives while a handle to it does.
_BROKERS: Dict[str, Any] = {}


def start_broker(sweep_id: str) -> Optional[str]:
    """Hand this process's secret variables to the sweep's trials, in memory (a broker actor
    that lives as long as this driver). Returns its name, or None when there is nothing to hand."""
    keep_credentials_out_of_runtime_env()
    values = forwarded()
    if not values:
        return None
    import ray

    from trainables.secrets import SecretBroker

    name = f"tl_sweep_secrets_{sweep_id}"
    broker = ray.remote(num_cpus=0)(SecretBroker).options(name=name, get_if_exists=True).remote()
    ray.get(broker.put.remote(values))
    _BROKERS[name] = broker
    return name


# --------------------------------------------------------------------------- cluster checks


def trial_resources(spec: Spec) -> Dict[str, float]:
    need = {"CPU": spec.resources.cpu, "GPU": spec.resources.gpu, **spec.resources.custom}
    return {k: float(v) for k, v in need.items() if v}


def trials_that_fit(need: Dict[str, float], nodes: List[Dict[str, float]]) -> int:
    """How many trials fit at once: a trial's resources must all come from one node."""
    return sum(int(min(node.get(k, 0.0) / v for k, v in need.items()) + 1e-9) for node in nodes) if need else 0


def check_placement(spec: Spec, printer) -> int:
    """Print the cluster and how many trials fit at once; fail if a trial can never be placed.
    Returns the number of live nodes. Tune keeps as many trials ready as fit at once, so a slot
    that frees up starts the next trial at once (with a searcher, Tune readies one otherwise)."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    need = trial_resources(spec)
    fit = trials_that_fit(need, nodes)
    total: Dict[str, float] = {}
    for n in nodes:
        for k in ("CPU", "GPU", *spec.resources.custom):
            total[k] = total.get(k, 0.0) + n.get(k, 0.0)
    have = ", ".join(f"{v:g} {k}" for k, v in total.items())
    want = ", ".join(f"{v:g} {k}" for k, v in need.items())
    if fit == 0:
        raise InputError(
            f"resources: a trial needs {want} on one node, but no node of this cluster has that "
            f"({len(nodes)} node(s): {have}). Lower resources.cpu / resources.gpu, or add such a node."
        )
    limit = spec.search.max_concurrent
    at_once = min(fit, limit) if limit else fit
    printer.line(f"cluster: {len(nodes)} node(s), {have}; a trial needs {want}: {at_once} trial(s) at once")
    os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", str(max(1, at_once)))
    return len(nodes)


def storage_note(spec: Spec, nodes: int) -> Optional[str]:
    if spec.storage.uri is None and nodes > 1:
        return (f"note: trial checkpoints go to {Path(spec.storage.path).resolve()} on this machine; trials on "
                "other nodes can write there only if it is a shared file system mounted at the same path on "
                "every node. Otherwise set storage.uri to s3://bucket/prefix (or another shared location).")
    return None


# --------------------------------------------------------------------------- run


class _Created:
    """What a starting run has created, so that a failure before the sweep starts removes it
    (and nothing else: never a storage folder it did not make, never an MLflow store)."""

    def __init__(self) -> None:
        self.folders: List[Path] = []
        self.files: List[Path] = []
        self.store: Optional[Store] = None
        self.run: Optional[Tuple[Any, str]] = None

    def folder(self, path: Path) -> Path:
        missing = [p for p in [path, *path.parents] if not p.exists()]
        path.mkdir(parents=True, exist_ok=True)
        self.folders.extend(missing)  # innermost first
        return path

    def rollback(self) -> None:
        if self.run is not None:
            client, run_id = self.run
            with contextlib.suppress(Exception):
                client.delete_run(run_id)
        if self.store is not None and not self.store.local:
            with contextlib.suppress(Exception):
                self.store.remove()
        for f in self.files:
            f.unlink(missing_ok=True)
        for i, p in enumerate(self.folders):
            if i == 0:
                shutil.rmtree(p, ignore_errors=True)  # the sweep's own folder
            else:
                with contextlib.suppress(OSError):
                    p.rmdir()  # a parent this run made: only if nothing else (an mlflow.db) is in it now


def run_sweep(spec: Spec, raw: Dict[str, Any], *, address: Optional[str] = None,
              tracking_uri: Optional[str] = None, console=None, sweep_id: Optional[str] = None) -> SweepOutcome:
    """Run ``spec`` to the end (or to Ctrl-C) and return its outcome."""
    from orchestrator.live import LiveTable, Printer

    printer = Printer(console)
    # What is stored (sweep folder, MLflow, Tune's pickled state) holds no credentials.
    raw = yaml.safe_load(without_credentials(yaml.safe_dump(raw, sort_keys=False)))
    searched = list(spec.search.space)
    uri = resolve_tracking_uri(tracking_uri, spec.tracking.uri, spec.storage.path)
    root = Path(spec.storage.path).expanduser().resolve()
    sweep_id = sweep_id or new_sweep_id(spec.name)
    store = Store.at(spec.storage.uri).child(sweep_id) if spec.storage.uri else Store.at(str(root / sweep_id))
    if spec.storage.uri:  # before anything exists: storage that cannot be written is the user's input
        shared = Store.at(spec.storage.uri)
        if shared.local and not shared.exists():
            raise InputError(f"storage.uri: no folder at {shared.display}; give a folder every node mounts at the "
                             "same path, or s3://bucket/prefix")
        shared.probe()

    fd, tmp = tempfile.mkstemp(prefix=f"tl-sweep-{sweep_id}-", suffix=".log")
    os.close(fd)
    handler = _configure_logs(Path(tmp))
    created = _Created()
    try:
        # model.weights: sweep:<ref> becomes a file in the sweep's folder before the checks load it
        spec, raw, source = _weights_from_sweep(spec, raw, store, created, root / sweep_id, printer)
        init_ray(address, Path(tmp))
        import ray

        nodes = check_placement(spec, printer)
        if ray.util.client.ray.is_connected():
            printer.line("note: with Ray Client (ray://) Tune runs the sweep on the head node, so the live table "
                         "shows there; follow the trials in MLflow or with tl-sweep show. To run the driver on the "
                         "cluster and detach, use tl-sweep submit.")
        found = run_checks(spec)
        note = storage_note(spec, nodes)
        if note:
            printer.line(note)
        broker = start_broker(sweep_id)
        if not uri.startswith("sqlite:"):
            check_tracking(uri)

        local = created.folder(root / sweep_id)
        handler = _move_log(handler, Path(tmp), local / LOG_FILE)
        printer.line(f"sweep {sweep_id}: {sp.num_trials(spec)} trial(s); Ray log: {local / LOG_FILE}")
        created.store = store
        client = client_for(uri)
        exp_id = ensure_experiment(client, spec.tracking.experiment or spec.name, str(root), uri.startswith("sqlite:"))
        tags = {TAG_SWEEP: sweep_id, TAG_ROLE: "sweep", "tl_sweep.varying": ",".join(searched), **source_tags(_source())}
        if spec.description:
            tags["mlflow.note.content"] = spec.description
        if source is not None:
            tags[lineage.TAG_WEIGHTS_FROM] = source.lineage
        parent = client.create_run(exp_id, run_name=sweep_id, tags=tags)
        created.run = (client, parent.info.run_id)
        meta = {
            "id": sweep_id, "name": spec.name, "created": dt.datetime.now().isoformat(timespec="seconds"),
            "status": "running", "tracking_uri": uri, "experiment_id": exp_id, "parent_run_id": parent.info.run_id,
            "metric": spec.search.metric, "mode": spec.search.mode, "scope": spec.search.scope, "varying": searched,
            "num_trials": sp.num_trials(spec), "epochs": spec.max_epochs, "store": store.display,
            "tune_path": store.child(TUNE_DIR).display,
        }
        sweep = Sweep(store, meta, local)
        store.write_bytes(SPEC_FILE, yaml.safe_dump(raw, sort_keys=False).encode())
        sweep.save()
        if spec.storage.uri:
            (local / POINTER_FILE).write_text(_pointer(spec.storage.uri, sweep_id))
        log_params(client, parent.info.run_id, spec_params(spec))
        client.log_text(parent.info.run_id, yaml.safe_dump(raw, sort_keys=False), SPEC_FILE)
        base_data = datasets_of(found)(spec.trial_config())
        if base_data is not None:
            client.log_inputs(parent.info.run_id, datasets=[base_data])
        tracker = MlflowTracker(uri, exp_id, parent.info.run_id, sweep_id,
                                trial_spec=lambda cfg: trial_spec_yaml(raw, searched, cfg), broker=broker,
                                varying=searched, source=_source(), datasets=datasets_of(found))
        live = LiveTable(printer, searched, spec.search.metric, spec.search.mode)
        tuner = _tuner(spec, store, [tracker, live], broker)
    except BaseException:
        created.rollback()
        _shutdown(handler)
        Path(tmp).unlink(missing_ok=True)
        raise
    return _drive(tuner, tracker, live, sweep, client, spec, handler)


def _weights_from_sweep(spec: Spec, raw: Dict[str, Any], store: Store, created: "_Created", local: Path, printer):
    """``model.weights: sweep:<ref>``: the source's best weights written into the new sweep's
    folder, the spec pinned to that file (orchestrator/lineage.py). The source is located
    before anything is made: a bad reference leaves nothing behind."""
    source = lineage.locate(spec, store)
    if source is None:
        return spec, raw, None
    created.folder(local)
    folder = created.folder(Path(store.path))
    path = lineage.write_weights(source, folder)
    created.files.append(path)
    raw = lineage.pinned(raw, path, source)
    printer.line(f"model.weights: the best checkpoint of sweep {source.sweep.id} (run {source.run_id}), as {path}")
    return validate(raw, "spec"), raw, source


def check_tracking(uri: str) -> None:
    """The MLflow server answers, and takes this process's credentials (before anything exists)."""
    try:
        client_for(uri).search_experiments(max_results=1)
    except Exception as e:
        reason = redact(str(e)).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise InputError(
            f"tracking: the MLflow server at {uri} does not answer as it should ({reason}). Check the URI "
            "(--tracking-uri, MLFLOW_TRACKING_URI or tracking.uri) and, for a server with authentication, "
            "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD."
        ) from None


def _source() -> str:
    """JOB for a sweep whose driver runs as a Ray Job (tl-sweep submit), else LOCAL."""
    return "JOB" if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") else "LOCAL"


def spec_params(spec: Spec) -> Dict[str, Any]:
    """The spec as the parent run's params: its effective values only (no None, no empty
    section, no field that does not apply), each searched field as its distribution."""
    from trainables.config import applicable

    trial = applicable(spec.trial_config())
    trial.pop("seed", None)
    trial.pop("trial_index", None)
    for key, d in spec.search.space.items():
        trial[key] = f"{d.kind}{list(d.args)}"
    sweep = spec.model_dump(mode="json", include={"name", "description", "search", "resources", "failure", "tracking",
                                                  "storage"})
    sweep["search"].pop("space", None)
    flat: Dict[str, Any] = {}

    def walk(d: Dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif v is not None and v != [] and v != {}:
                flat[f"{prefix}{k}"] = v

    walk(sweep, "")
    return {f"spec.{k}": v for k, v in {**flat, **trial}.items()}


def _pointer(storage_uri: str, sweep_id: str) -> str:
    import json

    from orchestrator.secrets import split_storage_credentials

    clean, _ = split_storage_credentials(storage_uri)
    return json.dumps({"store": Store.at(clean).child(sweep_id).display}, indent=2)


def _move_log(handler: logging.Handler, tmp: Path, final: Path) -> logging.Handler:
    """The log began in a temporary file (nothing of the sweep existed yet): move it into the
    sweep folder and go on writing there."""
    handler.close()
    shutil.move(str(tmp), str(final))
    return _configure_logs(final)


def resume_sweep(sweep: Sweep, *, address: Optional[str] = None, storage_path: str = "sweeps",
                 console=None) -> SweepOutcome:
    """Continue a sweep whose driver died or was stopped: finished trials stay finished, the
    others continue from their last checkpoints, the Optuna study and ASHA's rungs carry on,
    and each trial keeps its one MLflow child run under the same parent run."""
    from ray import tune

    from orchestrator.live import LiveTable, Printer

    store, meta = sweep.store, dict(sweep.meta)
    raw = yaml.safe_load(store.read_bytes(SPEC_FILE))
    spec = validate(raw, f"{store.display}/{SPEC_FILE}")
    printer = Printer(console)
    local = sweep.local or Path(storage_path).expanduser().resolve() / sweep.id
    local.mkdir(parents=True, exist_ok=True)
    if not store.local and not (local / POINTER_FILE).exists():
        (local / POINTER_FILE).write_text(f'{{"store": "{store.display}"}}')
    handler = _configure_logs(local / LOG_FILE)
    try:
        init_ray(address, local / LOG_FILE)
        check_placement(spec, printer)
        broker = start_broker(sweep.id)
        client = client_for(meta["tracking_uri"])
        tuner = tune.Tuner.restore(f"{store.path}/{TUNE_DIR}", trainable=_trainable(spec, broker),
                                   storage_filesystem=brokered(store.fs, broker), resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    except BaseException:
        _shutdown(handler)
        raise
    searched = list(spec.search.space)
    tracker = MlflowTracker(meta["tracking_uri"], meta["experiment_id"], meta["parent_run_id"], sweep.id,
                            trial_spec=lambda cfg: trial_spec_yaml(raw, searched, cfg), broker=broker,
                            varying=searched, source=_source())
    live = LiveTable(printer, searched, spec.search.metric, spec.search.mode)
    internal = _restored(tuner)
    scheduler = internal._tune_config.scheduler
    internal.get_run_config().callbacks = [tracker, live, tuning.StateSaver(scheduler)]
    if isinstance(scheduler, tuning.ResumableASHA):
        scheduler._store = store
        scheduler.load_state()
    client.update_run(meta["parent_run_id"], status="RUNNING")
    meta.update(status="running", resumed=meta.get("resumed", 0) + 1)
    sweep = Sweep(store, meta, local)
    sweep.save()
    printer.line(f"resuming sweep {sweep.id} from {meta['tune_path']}")
    return _drive(tuner, tracker, live, sweep, client, spec, handler)


def _restored(tuner):
    """Tune's own tuner behind a restored ``Tuner``: a restored experiment takes its callbacks
    and scheduler from the pickle written when the sweep started (Tune has no argument to give
    new ones), so the driver's fresh callbacks and ASHA's saved rungs are put in here."""
    return tuner._local_tuner


def _trainable(spec: Spec, broker: Optional[str]):
    from ray import tune

    from trainables.trainable import train_trial

    fn = tune.with_parameters(train_trial, broker=broker)
    return tune.with_resources(fn, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu, **spec.resources.custom})


def _tuner(spec: Spec, store: Store, callbacks: list, broker: Optional[str]):
    from ray import tune

    path, fs = store.tune_location()
    fs = brokered(fs, broker)  # Tune sends it to every trial: the keys come from the broker, not the pickle
    scheduler = tuning.trial_scheduler(spec, store)
    return tune.Tuner(
        _trainable(spec, broker),
        param_space=sp.param_space(spec),
        tune_config=tune.TuneConfig(
            metric=spec.search.metric,
            mode=spec.search.mode,
            search_alg=tuning.search_algorithm(spec),
            scheduler=scheduler,
            num_samples=sp.num_trials(spec),
            max_concurrent_trials=spec.search.max_concurrent,
            reuse_actors=True,  # a trial process runs the next trial: no new process, imports done
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            storage_path=path,
            storage_filesystem=fs,
            callbacks=[*callbacks, tuning.StateSaver(scheduler)],
            verbose=0,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=spec.storage.keep_checkpoints),
            failure_config=tune.FailureConfig(max_failures=spec.failure.max_retries),
        ),
    )


def _drive(tuner, tracker: MlflowTracker, live, sweep: Sweep, client, spec: Spec,
           handler: logging.Handler) -> SweepOutcome:
    meta = sweep.meta
    status, grid = "failed", None
    try:
        grid = tuner.fit()
        # After Ctrl-C Tune returns normally, with trials unfinished or never created. The
        # result grid says so in every mode (with Ray Client the callbacks run on the head).
        # Tune stops every trial on Ctrl-C (they all count as terminated): the tracker saw it.
        ended = grid.num_terminated + grid.num_errors
        status = "interrupted" if tracker.interrupted or live.interrupted or ended < meta["num_trials"] else "finished"
    except KeyboardInterrupt:
        status = "interrupted"
    finally:
        tracker.close_open_runs(live.trials(), "KILLED")
        terminate(client, meta["parent_run_id"], {"finished": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED"))
        meta["status"] = status
        sweep.save()
        live.stop()
    if grid is not None and status == "finished":
        _log_best_checkpoint(client, meta, grid, spec)
    _shutdown(None)  # Ray's processes go; the log stays open for what follows
    summarize(client, sweep)
    report = None
    if status == "finished":
        best = _log_best_model(sweep)
        report = write_report(client, sweep, best)
    _shutdown(handler)
    return SweepOutcome(sweep, meta["tracking_uri"], status, report)


def _log_best_model(sweep: Sweep):
    """The best trial's model as an MLflow logged model (orchestrator/bestmodel.py); returns it
    rebuilt, for the report. A model that cannot be rebuilt here is noted, the sweep stands."""
    from orchestrator import bestmodel

    try:
        best = bestmodel.load_best(sweep)
        if best is not None:
            bestmodel.log_model(sweep, best)
        return best
    except Exception as e:  # noqa: BLE001
        logging.getLogger("ray").warning("the best trial's model was not logged: %s", redact(repr(e)))
        return None


def write_report(client, sweep: Sweep, best=None) -> Optional[Path]:
    """The sweep's report (orchestrator/report.py) in its local folder and its parent run; a
    report that cannot be made is noted in the log, the sweep stands."""
    from orchestrator import report as R

    out = (sweep.local or Path(tempfile.mkdtemp(prefix="tl-sweep-report-"))) / "report"
    try:
        R.write([R.collect(sweep)], out, best=best)
        R.log_to_parent(client, sweep, out)
        keep_study(sweep)
    except Exception as e:  # noqa: BLE001 (a figure must not fail the sweep it describes)
        logging.getLogger("ray").warning("the sweep's report was not made: %s", redact(repr(e)))
        return None
    return out / "report.html"


def keep_study(sweep: Sweep, url: Optional[str] = None) -> Optional[str]:
    """The sweep's Optuna study (every trial, its values, distributions and state), copied from
    the searcher's saved state into an Optuna storage, so that optuna-dashboard and Optuna's
    own API open it: ``url`` (an RDB URL), by default ``optuna.db`` beside the sweep's log
    (``optuna-dashboard sqlite:///<that file>``). A study of that name already there is
    replaced. Returns the URL, None when the sweep has no saved study."""
    import pickle

    import optuna
    import pyarrow.fs as pafs

    tune = sweep.store.child(TUNE_DIR)
    try:
        names = [i.base_name for i in tune.fs.get_file_info(pafs.FileSelector(tune.path)) if
                 i.base_name.startswith("searcher-state-")]
    except FileNotFoundError:
        names = []
    if not names or (url is None and sweep.local is None):
        return None
    state = pickle.loads(tune.read_bytes(sorted(names)[-1]))  # written by this sweep's own driver
    study = state["_ot_study"]
    if url is None:
        target = sweep.local / "optuna.db"
        target.unlink(missing_ok=True)
        url = f"sqlite:///{target}"
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        storage = optuna.storages.RDBStorage(url)
        if sweep.id in {s.study_name for s in storage.get_all_studies()}:
            optuna.delete_study(study_name=sweep.id, storage=storage)
        copy = optuna.create_study(storage=storage, study_name=sweep.id, directions=study.directions)
        copy.add_trials([_spec_keys(t) for t in study.trials])
        copy.set_user_attr("sweep", sweep.id)
        copy.set_user_attr("metric", sweep.meta["metric"])
    finally:
        optuna.logging.set_verbosity(level)
    return url


def _spec_keys(trial):
    """A searcher's trial with its params named as the spec names them (``train.lr``; Ray's
    searcher flattens the nested config as ``train/lr``)."""
    import copy

    renamed = copy.deepcopy(trial)
    renamed.params = {k.replace("/", "."): v for k, v in trial.params.items()}
    renamed.distributions = {k.replace("/", "."): v for k, v in trial.distributions.items()}
    return renamed


def summarize(client, sweep: Sweep) -> None:
    """What the experiment table shows of a sweep without opening it: on the parent run, the
    best value of the metric, the best trial and the values it chose, and best.yaml (the spec
    that re-runs it)."""
    from mlflow.entities import Metric, Param, RunTag

    from orchestrator.results import export_best, leaderboard, most_efficient

    meta = sweep.meta
    ranked = [r for r in leaderboard(sweep) if r.best is not None]
    if not ranked:
        return
    best = ranked[0]
    run = client.get_run(best.run_id)
    existing = client.get_run(meta["parent_run_id"]).data.params
    params = [Param(f"best.{k}", v) for k, v in best.values.items() if f"best.{k}" not in existing]
    import time

    now = int(time.time() * 1000)
    metrics = [Metric(f"best/{meta['metric']}", best.best, now, 0)]
    tags = [RunTag("tl_sweep.best_trial", run.info.run_name), RunTag("tl_sweep.best_run_id", best.run_id)]
    efficient = most_efficient(ranked, meta["mode"])
    if efficient is not None:  # which configuration kept the most of the metric per trainable weight
        values = ", ".join(f"{k}={v}" for k, v in efficient.values.items())
        tags += [RunTag("tl_sweep.most_efficient_run_id", efficient.run_id), RunTag("tl_sweep.most_efficient", (
            f"trial {efficient.trial}{' (' + values + ')' if values else ''}: {meta['metric']}={efficient.best:.4f} "
            f"with {int(efficient.trainable):,} trainable parameters"))]
        metrics.append(Metric(f"most_efficient/{meta['metric']}_per_mparam", efficient.best / efficient.trainable * 1e6,
                              now, 0))
    client.log_batch(meta["parent_run_id"], metrics=metrics, params=params, tags=tags)
    client.log_text(meta["parent_run_id"], export_best(sweep, 1), "best.yaml")


def _log_best_checkpoint(client, meta: Dict[str, Any], grid, spec: Spec) -> None:
    """The best finished trial's last checkpoint becomes an artifact of its child run."""
    try:
        best = grid.get_best_result(metric=spec.search.metric, mode=spec.search.mode, scope=spec.search.scope)
    except Exception:  # no trial reported the metric (all failed)
        return
    ckpt = best.checkpoint
    found = find_child_run(client, meta["experiment_id"], meta["parent_run_id"], str((best.config or {}).get("trial_index")))
    if ckpt is None or not found:
        return
    run_id = found[0].info.run_id
    client.set_tag(run_id, TAG_BEST, "true")
    try:
        with ckpt.as_directory() as d:
            client.log_artifacts(run_id, d, artifact_path="checkpoint")
    except (OSError, FileNotFoundError) as e:  # the sweep's results stand without it
        logging.getLogger("ray").warning("the best trial's checkpoint could not be logged: %s", redact(str(e)))


def _shutdown(handler: Optional[logging.Handler]) -> None:
    try:
        import ray

        ray.shutdown()
    except Exception:
        pass
    if handler is not None:
        handler.close()
