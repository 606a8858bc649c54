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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from orchestrator import space as sp
from orchestrator.spec import Spec, set_path
from orchestrator.tracking import (
    TAG_ROLE, TAG_SWEEP, MlflowTracker, client_for, ensure_experiment, log_params,
    resolve_tracking_uri, write_json,
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
    trials: List[Dict[str, Any]] = field(default_factory=list)


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


def trial_spec_yaml(raw: Dict[str, Any], spec: Spec, trial_config: Dict[str, Any]) -> str:
    """The spec that re-runs exactly this trial: the search removed, its values fixed."""
    out = copy.deepcopy(raw)
    for key in spec.search.space:
        set_path(out, key, _get(trial_config, key))
    search = dict(out.get("search") or {})
    search.pop("space", None)
    search.update(algorithm="random", num_samples=1, scheduler={"type": "fifo"})
    out["search"] = search
    return yaml.safe_dump(out, sort_keys=False)


def _get(d: Dict[str, Any], dotted: str) -> Any:
    for p in dotted.split("."):
        d = d[p]
    return d


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


# --------------------------------------------------------------------------- run


def run_sweep(spec: Spec, raw: Dict[str, Any], *, address: Optional[str] = None,
              tracking_uri: Optional[str] = None, console=None) -> SweepOutcome:
    """Run ``spec`` to the end (or to Ctrl-C) and return its outcome."""
    from orchestrator.live import LiveTable, Printer

    printer = Printer(console)
    preflight(spec)

    storage = Path(spec.storage.path).expanduser().resolve()
    sweep_id = new_sweep_id(spec.name)
    sweep_dir = storage / sweep_id
    sweep_dir.mkdir(parents=True)
    log_file = sweep_dir / "ray.log"
    handler = _configure_logs(log_file)
    uri = resolve_tracking_uri(tracking_uri, spec.tracking.uri, str(storage))
    parent_run_id = None
    client = None
    try:
        resources = init_ray(address, log_file)
        printer.line(f"sweep {sweep_id}: {sp.num_trials(spec)} trial(s) on Ray with "
                     f"{resources.get('CPU', 0):g} CPU / {resources.get('GPU', 0):g} GPU; log: {log_file}")
        client = client_for(uri)
        exp_id = ensure_experiment(client, spec.tracking.experiment or spec.name, str(storage), uri.startswith("sqlite:"))
        parent = client.create_run(exp_id, run_name=sweep_id, tags={TAG_SWEEP: sweep_id, TAG_ROLE: "sweep",
                                                                    "tl_sweep.varying": ",".join(spec.search.space)})
        parent_run_id = parent.info.run_id
    except Exception:
        _rollback(sweep_dir, handler)
        raise
    (sweep_dir / "spec.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    meta = {
        "id": sweep_id, "name": spec.name, "created": dt.datetime.now().isoformat(timespec="seconds"),
        "status": "running", "tracking_uri": uri, "experiment_id": exp_id, "parent_run_id": parent_run_id,
        "metric": spec.search.metric, "mode": spec.search.mode, "varying": list(spec.search.space),
        "num_trials": sp.num_trials(spec), "epochs": spec.train.epochs,
    }
    write_json(sweep_dir / SWEEP_FILE, meta)
    log_params(client, parent_run_id, {"spec": spec.model_dump(mode="json")})
    client.log_artifact(parent_run_id, str(sweep_dir / "spec.yaml"))

    tracker = MlflowTracker(
        client, exp_id, parent_run_id, sweep_id,
        epochs_of=lambda cfg: int(cfg["train"]["epochs"]),
        trial_spec=lambda cfg: trial_spec_yaml(raw, spec, cfg),
    )
    live = LiveTable(printer, list(spec.search.space), spec.search.metric, spec.search.mode)
    status = "failed"
    grid = None
    try:
        grid = _fit(spec, sweep_dir, [tracker, live])
        status = "interrupted" if live.interrupted else "finished"
    except KeyboardInterrupt:
        status = "interrupted"
    finally:
        trials = live.trials()
        tracker.close_open_runs(trials, "KILLED")
        run_status = {"finished": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED")
        client.set_terminated(parent_run_id, status=run_status)
        meta["status"] = status
        write_json(sweep_dir / SWEEP_FILE, meta)
        live.stop()
    outcome = SweepOutcome(sweep_id, sweep_dir, uri, parent_run_id, status)
    if grid is not None:
        _log_best_checkpoint(client, tracker, grid, spec)
    _shutdown_logs(handler)
    return outcome


def _fit(spec: Spec, sweep_dir: Path, callbacks: list):
    from ray import tune
    from trainables.trainable import train_trial

    res = {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
    tuner = tune.Tuner(
        tune.with_resources(train_trial, res),
        param_space=sp.param_space(spec),
        tune_config=tune.TuneConfig(
            metric=spec.search.metric,
            mode=spec.search.mode,
            search_alg=sp.search_algorithm(spec),
            scheduler=sp.trial_scheduler(spec),
            num_samples=sp.tuner_num_samples(spec),
            max_concurrent_trials=spec.search.max_concurrent,
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=str(sweep_dir),
            callbacks=callbacks,
            verbose=0,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=spec.storage.keep_checkpoints),
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    return tuner.fit()


def _log_best_checkpoint(client, tracker: MlflowTracker, grid, spec: Spec) -> None:
    """The best finished trial's last checkpoint becomes an artifact of its child run."""
    try:
        best = grid.get_best_result(metric=spec.search.metric, mode=spec.search.mode, scope="all")
    except Exception:  # no trial reported the metric (all failed)
        return
    ckpt = best.checkpoint
    trial_id = (best.metrics or {}).get("trial_id")
    if ckpt is None or trial_id not in tracker.runs:
        return
    with ckpt.as_directory() as d:
        client.log_artifacts(tracker.runs[trial_id], d, artifact_path="checkpoint")
    client.set_tag(tracker.runs[trial_id], "tl_sweep.best", "true")


def _rollback(sweep_dir: Path, handler: logging.Handler) -> None:
    _shutdown_logs(handler)
    shutil.rmtree(sweep_dir, ignore_errors=True)


def _shutdown_logs(handler: logging.Handler) -> None:
    try:
        import ray

        ray.shutdown()
    except Exception:
        pass
    handler.close()
