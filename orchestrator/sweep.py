"""Run one sweep: preflight, sweep folder, MLflow parent run, Ray Tune, summary.

Nothing is written and no MLflow run is made until the spec has validated and a preflight on
the driver has built the data set, the backbone and the strategy for every value the search
can take that changes them; an error there is the user's input (exit 2), not a failed sweep.
"""
from __future__ import annotations

import contextlib
import copy
import datetime as dt
import logging
import os
import secrets
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from orchestrator import space as sp
from orchestrator.spec import Spec, get_path, set_path
from orchestrator.tracking import (
    RESTORED, TAG_ROLE, TAG_SWEEP, MlflowTracker, client_for, ensure_experiment, find_child_run, log_params,
    redact, resolve_tracking_uri, terminate, write_json,
)

SWEEP_FILE = "sweep.json"


class InputError(RuntimeError):
    """A problem with the user's input found before anything started (exit code 2)."""


@dataclass
class SweepOutcome:
    sweep_id: str
    sweep_dir: Path
    tracking_uri: str
    parent_run_id: str
    status: str


# --------------------------------------------------------------------------- preflight


def _candidates(spec: Spec, key: str) -> List[Any]:
    d = spec.search.space.get(key)
    return d.candidates() if d is not None and d.kind in ("grid", "choice") else []


def preflight(spec: Spec) -> None:
    """Build the data set, backbone and strategy on the driver, as a trial would, so that a
    missing data set, unloadable weights or an impossible unfreeze depth fail before any trial."""
    from trainables.data import DataError, build_data
    from trainables.models import WeightsError, build_backbone
    from trainables.strategies import STRATEGIES

    base = spec.trial_config()
    data_cfgs = [base["data"]] + [dict(base["data"], **{k.split(".", 1)[1]: v})
                                  for k in spec.search.space if k in ("data.name", "data.root", "data.target")
                                  for v in _candidates(spec, k)]
    num_classes = None
    for cfg in data_cfgs:
        try:
            num_classes = build_data(cfg).num_classes
        except DataError as e:
            raise InputError(f"data: {e}") from None
    model_cfgs = [base["model"]] + [dict(base["model"], **{k.split(".", 1)[1]: v})
                                    for k in spec.search.space if k in ("model.name", "model.weights")
                                    for v in _candidates(spec, k)]
    depths = [base["strategy"]] + [dict(base["strategy"], unfreeze_last=v) for v in _candidates(spec, "strategy.unfreeze_last")]
    if "strategy.unfreeze_last" in spec.search.space and spec.search.space["strategy.unfreeze_last"].kind == "randint":
        hi = spec.search.space["strategy.unfreeze_last"].args[1]
        depths.append(dict(base["strategy"], unfreeze_last=hi))
    for mcfg in model_cfgs:
        try:
            backbone = build_backbone(mcfg, num_classes or 2)
        except (WeightsError, ValueError) as e:
            raise InputError(f"model: {e}") from None
        for scfg in depths:
            try:
                STRATEGIES.get(scfg["name"])(backbone, scfg, spec.train.lr)
            except ValueError as e:
                where = "search.space.strategy.unfreeze_last" if "strategy.unfreeze_last" in spec.search.space else "strategy.unfreeze_last"
                raise InputError(f"{where} with model {mcfg['name']}: {e}") from None


# --------------------------------------------------------------------------- helpers


def new_sweep_id(name: str) -> str:
    return f"{name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def trial_spec_yaml(raw: Dict[str, Any], searched: List[str], trial_config: Dict[str, Any]) -> str:
    """The spec that re-runs exactly this trial: the search removed, its values fixed."""
    out = copy.deepcopy(raw)
    for key in searched:
        set_path(out, key, get_path(trial_config, key))
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
    kwargs: Dict[str, Any] = dict(log_to_driver=False, configure_logging=False, ignore_reinit_error=True)
    addr = address or os.environ.get("RAY_ADDRESS")
    with _stderr_to(log_file):
        if addr:
            ray.init(address=addr, **kwargs)
        else:
            ray.init(include_dashboard=False, **kwargs)
    return dict(ray.cluster_resources())


# --------------------------------------------------------------------------- cluster checks


def trial_resources(spec: Spec) -> Dict[str, float]:
    need = {"CPU": spec.resources.cpu, "GPU": spec.resources.gpu, **spec.resources.custom}
    return {k: float(v) for k, v in need.items() if v}


def trials_that_fit(need: Dict[str, float], nodes: List[Dict[str, float]]) -> int:
    """How many trials fit at once: a trial's resources must all come from one node."""
    return sum(int(min(node.get(k, 0.0) / v for k, v in need.items()) + 1e-9) for node in nodes) if need else 0


def check_placement(spec: Spec, printer) -> None:
    """Print the cluster and how many trials fit at once; fail if a trial can never be placed."""
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


def storage_note(spec: Spec, address: Optional[str], nodes: int) -> Optional[str]:
    if spec.storage.uri is None and (address or os.environ.get("RAY_ADDRESS")) and nodes > 1:
        return (f"note: trial checkpoints go to {Path(spec.storage.path).resolve()} on this machine; trials on "
                "other nodes can write there only if it is a shared file system mounted at the same path on "
                "every node. Otherwise set storage.uri to s3://bucket/prefix (or another shared location).")
    return None


# --------------------------------------------------------------------------- run


def run_sweep(spec: Spec, raw: Dict[str, Any], *, address: Optional[str] = None,
              tracking_uri: Optional[str] = None, console=None) -> SweepOutcome:
    """Run ``spec`` to the end (or to Ctrl-C) and return its outcome."""
    from orchestrator.live import LiveTable, Printer

    printer = Printer(console)
    preflight(spec)
    # What is stored (sweep folder, MLflow, Tune's pickled state) holds no credentials.
    raw = yaml.safe_load(redact(yaml.safe_dump(raw, sort_keys=False)))
    searched = list(spec.search.space)

    storage = Path(spec.storage.path).expanduser().resolve()
    sweep_id = new_sweep_id(spec.name)
    sweep_dir = storage / sweep_id
    created = storage if not storage.exists() else sweep_dir  # what a rollback removes
    sweep_dir.mkdir(parents=True)
    log_file = sweep_dir / "ray.log"
    handler = _configure_logs(log_file)
    uri = resolve_tracking_uri(tracking_uri, spec.tracking.uri, str(storage))
    tune_root = f"{spec.storage.uri.rstrip('/')}/{sweep_id}" if spec.storage.uri else str(sweep_dir)
    try:
        init_ray(address, log_file)
        printer.line(f"sweep {sweep_id}: {sp.num_trials(spec)} trial(s); Ray log: {log_file}")
        check_placement(spec, printer)
        import ray

        if ray.util.client.ray.is_connected():
            printer.line("note: with Ray Client (ray://) Tune runs the sweep on the head node, so the live table "
                         "shows there; follow the trials in MLflow or with tl-sweep show. For the table here, "
                         "run tl-sweep on the head with --address auto.")
        note = storage_note(spec, address, len([n for n in ray.nodes() if n.get("Alive")]))
        if note:
            printer.line(note)
        client = client_for(uri)
        exp_id = ensure_experiment(client, spec.tracking.experiment or spec.name, str(storage), uri.startswith("sqlite:"))
        parent = client.create_run(exp_id, run_name=sweep_id, tags={TAG_SWEEP: sweep_id, TAG_ROLE: "sweep",
                                                                    "tl_sweep.varying": ",".join(spec.search.space)})
    except BaseException:
        _rollback(created, handler)
        raise
    (sweep_dir / "spec.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    meta = {
        "id": sweep_id, "name": spec.name, "created": dt.datetime.now().isoformat(timespec="seconds"),
        "status": "running", "tracking_uri": uri, "experiment_id": exp_id, "parent_run_id": parent.info.run_id,
        "metric": spec.search.metric, "mode": spec.search.mode, "varying": list(spec.search.space),
        "num_trials": sp.num_trials(spec), "epochs": spec.train.epochs, "tune_path": f"{tune_root}/tune",
    }
    write_json(sweep_dir / SWEEP_FILE, meta)
    log_params(client, parent.info.run_id, {"spec": spec.model_dump(mode="json")})
    client.log_text(parent.info.run_id, yaml.safe_dump(raw, sort_keys=False), "spec.yaml")

    tracker = MlflowTracker(
        uri, exp_id, parent.info.run_id, sweep_id,
        epochs_of=lambda cfg: int(cfg["train"]["epochs"]),
        trial_spec=lambda cfg: trial_spec_yaml(raw, searched, cfg),
    )
    live = LiveTable(printer, list(spec.search.space), spec.search.metric, spec.search.mode)
    tuner = _tuner(spec, sweep_dir, tune_root, [tracker, live])
    return _drive(tuner, tracker, live, meta, sweep_dir, client, spec, handler)


def resume_sweep(meta: Dict[str, Any], *, address: Optional[str] = None, console=None) -> SweepOutcome:
    """Continue a sweep whose driver died or was stopped: finished trials stay finished, the
    others continue from their last checkpoints, the Optuna study and ASHA's rungs carry on,
    and each trial keeps its one MLflow child run under the same parent run."""
    from ray import tune

    from orchestrator.live import LiveTable, Printer
    from orchestrator.spec import validate

    sweep_dir = Path(meta["path"]).resolve()
    raw = yaml.safe_load((sweep_dir / "spec.yaml").read_text())
    spec = validate(raw, str(sweep_dir / "spec.yaml"))
    printer = Printer(console)
    handler = _configure_logs(sweep_dir / "ray.log")
    try:
        init_ray(address, sweep_dir / "ray.log")
        check_placement(spec, printer)
        client = client_for(meta["tracking_uri"])
        RESTORED.clear()
        tuner = tune.Tuner.restore(meta["tune_path"], trainable=_trainable(spec), resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    except BaseException:
        _shutdown_logs(handler)
        raise
    tracker = next(cb for cb in RESTORED if isinstance(cb, MlflowTracker))
    live = next(cb for cb in RESTORED if isinstance(cb, LiveTable))
    live.printer = printer
    client.update_run(meta["parent_run_id"], status="RUNNING")
    meta = {k: v for k, v in meta.items() if k != "path"}
    meta.update(status="running", resumed=meta.get("resumed", 0) + 1)
    write_json(sweep_dir / SWEEP_FILE, meta)
    printer.line(f"resuming sweep {meta['id']} from {meta['tune_path']}")
    return _drive(tuner, tracker, live, meta, sweep_dir, client, spec, handler)


def _trainable(spec: Spec):
    from ray import tune
    from trainables.trainable import train_trial

    return tune.with_resources(train_trial, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu,
                                             **spec.resources.custom})


def _tuner(spec: Spec, sweep_dir: Path, tune_root: str, callbacks: list):
    from ray import tune

    return tune.Tuner(
        _trainable(spec),
        param_space=sp.param_space(spec),
        tune_config=tune.TuneConfig(
            metric=spec.search.metric,
            mode=spec.search.mode,
            search_alg=sp.search_algorithm(spec),
            scheduler=sp.trial_scheduler(spec, str(sweep_dir / "scheduler.pkl")),
            num_samples=sp.tuner_num_samples(spec),
            max_concurrent_trials=spec.search.max_concurrent,
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=tune_root,
            callbacks=callbacks,
            verbose=0,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=spec.storage.keep_checkpoints),
            failure_config=tune.FailureConfig(max_failures=spec.failure.max_retries),
        ),
    )


def _drive(tuner, tracker: MlflowTracker, live, meta: Dict[str, Any], sweep_dir: Path, client,
           spec: Spec, handler: logging.Handler) -> SweepOutcome:
    status, grid = "failed", None
    try:
        grid = tuner.fit()
        # After Ctrl-C Tune returns normally, with trials unfinished or never created. The
        # result grid says so in every mode (with Ray Client the callbacks run on the head).
        status = "interrupted" if grid.num_terminated + grid.num_errors < meta["num_trials"] else "finished"
    except KeyboardInterrupt:
        status = "interrupted"
    finally:
        tracker.close_open_runs(live.trials(), "KILLED")
        terminate(client, meta["parent_run_id"], {"finished": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED"))
        meta["status"] = status
        write_json(sweep_dir / SWEEP_FILE, meta)
        live.stop()
    if grid is not None and status == "finished":
        _log_best_checkpoint(client, meta, grid, spec)
    _shutdown_logs(handler)
    return SweepOutcome(meta["id"], sweep_dir, meta["tracking_uri"], meta["parent_run_id"], status)
def _log_best_checkpoint(client, meta: Dict[str, Any], grid, spec: Spec) -> None:
    """The best finished trial's last checkpoint becomes an artifact of its child run."""
    try:
        best = grid.get_best_result(metric=spec.search.metric, mode=spec.search.mode, scope="all")
    except Exception:  # no trial reported the metric (all failed)
        return
    ckpt = best.checkpoint
    found = find_child_run(client, meta["experiment_id"], meta["parent_run_id"], (best.metrics or {}).get("trial_id", ""))
    if ckpt is None or not found:
        return
    run_id = found[0].info.run_id
    with ckpt.as_directory() as d:
        client.log_artifacts(run_id, d, artifact_path="checkpoint")
    client.set_tag(run_id, "tl_sweep.best", "true")


def _rollback(folder: Path, handler: logging.Handler) -> None:
    """Nothing half-written: remove what this run created before the sweep could start."""
    _shutdown_logs(handler)
    shutil.rmtree(folder, ignore_errors=True)


def _shutdown_logs(handler: logging.Handler) -> None:
    try:
        import ray

        ray.shutdown()
    except Exception:
        pass
    handler.close()
