"""Chained sweeps: ``model.weights: sweep:<name or id>`` starts every trial from the best
checkpoint of an earlier sweep (self-supervised pre-training, then fine-tuning).

On the driver, before the checks and before anything of the new sweep exists, the source is
found under ``storage.path``: the sweep with that id, or the latest finished sweep of that name,
and its best child run (tagged best, with its logged ``checkpoint/checkpoint.pt``). A missing
sweep, or one without a logged best checkpoint, is the user's input: exit 2, nothing made.
Then the checkpoint's model weights are written as a plain state-dict file into the new sweep's
folder, ``model.weights`` becomes that file for every trial (and in the stored spec, so resume,
exports and the best model rebuild read a plain file), and ``model.weights_from``
(``<sweep id>/<run id>``) records the lineage: a param of the parent run and of every child,
and the parent's tag ``tl_sweep.weights_from``.

The trials read the file by path: the sweep's store must be a folder they see (``storage.path``,
or a ``storage.uri`` that is a shared folder); an object store is refused with a clear error.
"""
from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from orchestrator.secrets import redact
from orchestrator.sweepdir import InputError, Store, Sweep, list_sweeps, open_store

PREFIX = "sweep:"
WEIGHTS_FILE = "weights_from_sweep.pt"
TAG_WEIGHTS_FROM = "tl_sweep.weights_from"
CHECKPOINT_ARTIFACT = "checkpoint/checkpoint.pt"  # what sweep._log_best_checkpoint logs on the best child


@dataclass
class Source:
    sweep: Sweep
    run_id: str

    @property
    def lineage(self) -> str:
        return f"{self.sweep.id}/{self.run_id}"


def reference(spec: Any) -> Optional[str]:
    """The sweep ``model.weights`` names (``sweep:<ref>``), else None."""
    weights = spec.model.weights
    return weights[len(PREFIX):].strip() if weights.startswith(PREFIX) else None


def locate(spec: Any, store: Optional[Store] = None) -> Optional[Source]:
    """The source of ``model.weights: sweep:<ref>`` (None without one). Reads only: the sweeps
    under ``storage.path`` and their MLflow runs."""
    searched = spec.search.space.get("model.weights")
    if searched is not None and any(str(v).startswith(PREFIX) for v in searched.candidates()):
        raise InputError("search.space.model.weights: a sweep: reference is resolved once, before the sweep starts; "
                         "run one sweep per source instead of searching over them")
    ref = reference(spec)
    if ref is None:
        return None
    if store is not None and not store.local:
        raise InputError(f"model.weights: {PREFIX}{ref} writes the source's weights into the sweep's store for the "
                         f"trials to read as a file, and {store.display} is an object store: use a storage.uri every "
                         "node mounts as a folder, or download the checkpoint (tl-sweep export) and give its path")
    storage = spec.storage.path
    where = open_store(storage).display
    first = (f"run the sweep that makes them first, with the same storage.path (for ssl_finetune.yaml: the "
             f"'# Try offline:' or Launch line of ssl_pretrain.yaml), or set model.weights to a file")
    sweeps = list_sweeps(storage)
    exact = [s for s in sweeps if s.id == ref]
    named = [s for s in sweeps if s.meta.get("name") == ref]
    if not exact and not named:
        known = ", ".join(sorted({s.meta.get("name", "?") for s in sweeps})) or "none"
        raise InputError(f"model.weights: {PREFIX}{ref}: no sweep named {ref!r} (or with that id) under {where} "
                         f"(sweeps there: {known}); {first}")
    candidates = exact or [s for s in named if s.meta.get("status") == "finished"]
    if not candidates:
        latest = named[-1]
        raise InputError(f"model.weights: {PREFIX}{ref}: no finished sweep named {ref!r} under {where} (the latest, "
                         f"{latest.id}, is {latest.meta.get('status')}); resume it (tl-sweep resume {latest.id}) or "
                         f"run it again to the end")
    sweep = candidates[-1]
    from orchestrator.bestmodel import best_run_id

    try:
        run_id = best_run_id(sweep)
    except Exception as e:  # noqa: BLE001 (its MLflow store is gone or unreachable)
        raise InputError(f"model.weights: {PREFIX}{ref}: the MLflow runs of sweep {sweep.id} cannot be read "
                         f"({redact(str(e)).strip()[:200]})") from None
    if run_id is None:
        raise InputError(f"model.weights: {PREFIX}{ref}: sweep {sweep.id} logged no best checkpoint (no trial "
                         f"finished with a {sweep.meta.get('metric')}); {first}")
    from orchestrator.tracking import client_for

    theirs = client_for(sweep.meta["tracking_uri"]).get_run(run_id).data.params.get("model.name")
    if theirs and "model.name" not in spec.search.space and theirs != spec.model.name:
        raise InputError(f"model.weights: {PREFIX}{ref}: its best trial trained a {theirs}, this spec's model.name is "
                         f"{spec.model.name}; set model.name={theirs}")
    return Source(sweep, run_id)


def write_weights(source: Source, folder: Path) -> Path:
    """The source's best checkpoint, its model entries only, as ``folder/WEIGHTS_FILE``."""
    import torch

    from orchestrator.tracking import client_for

    client = client_for(source.sweep.meta["tracking_uri"])
    with tempfile.TemporaryDirectory(prefix="tl-sweep-lineage-") as tmp:
        try:
            local = client.download_artifacts(source.run_id, CHECKPOINT_ARTIFACT, dst_path=tmp)
        except Exception as e:  # noqa: BLE001 (the artifact was deleted, or the store is unreachable)
            raise InputError(f"model.weights: the best run {source.run_id} of sweep {source.sweep.id} has no "
                             f"{CHECKPOINT_ARTIFACT} to read ({redact(str(e)).strip()[:200]})") from None
        state = torch.load(local, map_location="cpu", weights_only=True)
    model = state["model"] if isinstance(state, dict) and isinstance(state.get("model"), dict) else state
    path = folder / WEIGHTS_FILE
    torch.save(model, path)
    return path


def pinned(raw: Dict[str, Any], path: Path, source: Source) -> Dict[str, Any]:
    """The raw spec with ``model.weights`` the written file and ``model.weights_from`` its source."""
    out = copy.deepcopy(raw)
    model = dict(out.get("model") or {})
    model.update(weights=str(path), weights_from=source.lineage)
    out["model"] = model
    return out
