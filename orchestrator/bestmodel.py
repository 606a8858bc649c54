"""The best trial's model, rebuilt in the driver from its logged checkpoint: for the report's
error analysis, as an MLflow logged model (``mlflow.pytorch.log_model`` with an input example
and a signature) and, through ``tl-sweep export --register NAME``, in the Model Registry."""
from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from orchestrator.secrets import redact
from orchestrator.sweepdir import InputError, Sweep
from orchestrator.tracking import TAG_BEST, client_for

MODEL_NAME = "model"  # the logged model's name in its run
TAG_MODEL = "tl_sweep.model_id"  # on the best child run: its logged model


@dataclass
class BestTrial:
    run_id: str
    trial: Any  # trainables.trainable.FineTuneTrial with the checkpoint's weights, on the CPU, in eval mode
    config: dict


def best_run_id(sweep: Sweep) -> Optional[str]:
    """The child run the sweep marked best (its checkpoint is logged), else None."""
    meta = sweep.meta
    client = client_for(meta["tracking_uri"])
    runs = client.search_runs([meta["experiment_id"]], max_results=1, filter_string=(
        f"tags.`mlflow.parentRunId` = '{meta['parent_run_id']}' and tags.`{TAG_BEST}` = 'true'"))
    return runs[0].info.run_id if runs else None


def load_best(sweep: Sweep) -> Optional[BestTrial]:
    """The best trial's model with its logged weights and its data, on the CPU; None when the
    sweep logged no checkpoint (interrupted, every trial failed) or its data set is not on this
    machine."""
    run_id = best_run_id(sweep)
    if run_id is None:
        return None
    client = client_for(sweep.meta["tracking_uri"])
    try:
        ckpt = client.download_artifacts(run_id, "checkpoint")
        spec_file = client.download_artifacts(run_id, "trial_spec.yaml")
    except Exception:  # noqa: BLE001 (artifacts deleted by hand: nothing to load)
        return None
    import torch

    from orchestrator.spec import validate
    from trainables.trainable import FineTuneTrial

    config = validate(yaml.safe_load(Path(spec_file).read_text())).trial_config()
    config["train"]["device"] = "cpu"
    config["data"]["num_workers"] = 0
    config["strategy"]["feature_cache"] = "off"  # the whole model, from the image
    try:
        trial = FineTuneTrial(config)
        state = torch.load(Path(ckpt) / "checkpoint.pt", map_location="cpu", weights_only=True)
        if state.get("phase", 0) != trial.phase_index:  # the last phase's model (a pruned one: its shapes)
            trial.enter_phase(state["phase"])
        missing, _ = trial.model.load_state_dict(state["model"], strict=False)
    except Exception as e:  # noqa: BLE001 (the data set or the weights are not on this machine)
        logging.getLogger("ray").warning("the best trial's model was not rebuilt: %s", redact(repr(e)))
        return None
    if missing:  # a lean checkpoint of a trial that did not reach its last epoch
        logging.getLogger("ray").warning("the best trial's checkpoint lacks %d tensors: its model is not logged",
                                         len(missing))
        return None
    trial.model.eval()
    return BestTrial(run_id, trial, config)


def served(best: BestTrial):
    """The model as it is served: images as float32 in [0, 1], (N, 3, H, W), normalised inside."""
    from trainables.models import Normalized

    t = best.trial
    # plain modules: a strategy's additions are folded in (LoRA's adapters merged into the weights)
    return Normalized(t.strategy.export(t.model), t.mean.cpu(), t.std.cpu()).eval()


def log_model(sweep: Sweep, best: BestTrial) -> Optional[str]:
    """The best trial's model as an MLflow logged model of its child run, with one test image as
    input example and the signature inferred from it; returns the model id."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    model = served(best)
    test = best.trial.data.test
    # two test images: a batch of one would fix the batch size of the exported program
    images = [test[i][0] for i in range(min(2, len(test)))]
    example = torch.stack(images).float().div(255.0).numpy().astype(np.float32)
    with torch.no_grad():
        out = model(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, out)
    uri = sweep.meta["tracking_uri"]
    ended = client_for(uri).get_run(best.run_id).info
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with contextlib.redirect_stdout(io.StringIO()), _quiet_export(), mlflow.start_run(run_id=best.run_id):
            info = mlflow.pytorch.log_model(
                model, name=MODEL_NAME, signature=signature, input_example=example,
                # an exported program (torch.export): torch alone runs it, without this code
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
                metadata={"classes": list(best.trial.data.classes), "input": "float32 RGB in [0, 1], NCHW",
                          "image_size": best.config["data"]["image_size"], "sweep": sweep.id,
                          # several targets: which outputs are which task's (trainables/tasks.py)
                          **({"tasks": best.trial.tasks.describe()} if getattr(best.trial, "tasks", None) else {})},
            )
    finally:
        mlflow.set_tracking_uri(before)
    client = client_for(uri)
    # start_run reopened the closed child run: its status and end time as they were
    client.set_terminated(best.run_id, status=ended.status, end_time=ended.end_time)
    client.set_tag(best.run_id, TAG_MODEL, info.model_id)
    return info.model_id


@contextlib.contextmanager
def _quiet_export():
    """torch.export notes on the terminal (a specialised dimension): to the sweep's log level."""
    names = ("torch._export", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def logged_model_id(sweep: Sweep) -> Optional[str]:
    run_id = best_run_id(sweep)
    if run_id is None:
        return None
    return client_for(sweep.meta["tracking_uri"]).get_run(run_id).data.tags.get(TAG_MODEL)


def register(sweep: Sweep, name: str):
    """Put the sweep's best model in the Model Registry under ``name`` (a new version when the
    name exists); the model is logged first if the sweep did not log it."""
    import mlflow

    model_id = logged_model_id(sweep)
    if model_id is None:
        best = load_best(sweep)
        if best is None:
            raise InputError(f"sweep {sweep.id} has no best trial whose model can be rebuilt here (no logged "
                             f"checkpoint, or its data set is not on this machine): nothing to register")
        model_id = log_model(sweep, best)
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(sweep.meta["tracking_uri"])
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return mlflow.register_model(f"models:/{model_id}", name)
    finally:
        mlflow.set_tracking_uri(before)
