"""Sweeps on disk and their results in MLflow: list, leaderboard, export of the best configs."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from orchestrator.sweep import SWEEP_FILE, InputError
from orchestrator.tracking import TAG_PRUNED, TAG_TRIAL, client_for


def list_sweeps(storage: str) -> List[Dict[str, Any]]:
    root = Path(storage).expanduser()
    if not root.is_dir():
        return []
    out = []
    for f in sorted(root.glob(f"*/{SWEEP_FILE}")):
        try:
            meta = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        meta["path"] = str(f.parent)
        out.append(meta)
    return sorted(out, key=lambda m: m.get("created", ""))


def find_sweep(ref: str, storage: str) -> Dict[str, Any]:
    """A sweep by folder path, id, or name (its latest sweep)."""
    p = Path(ref).expanduser()
    if (p / SWEEP_FILE).is_file():
        meta = json.loads((p / SWEEP_FILE).read_text())
        meta["path"] = str(p)
        return meta
    sweeps = list_sweeps(storage)
    exact = [m for m in sweeps if m["id"] == ref]
    named = [m for m in sweeps if m["name"] == ref or m["id"].startswith(ref)]
    hit = exact or named
    if not hit:
        known = ", ".join(m["id"] for m in sweeps[-5:]) or "none"
        raise InputError(f"no sweep {ref!r} under {Path(storage).resolve()} (latest: {known}); see tl-sweep ls")
    return hit[-1]


@dataclass
class Row:
    trial: str
    run_id: str
    values: Dict[str, str]
    best: Optional[float]
    epochs: int
    status: str
    test_acc: Optional[float]
    error: str = ""


def leaderboard(meta: Dict[str, Any]) -> List[Row]:
    """One row per trial's child run, best first (by the sweep's metric and mode)."""
    client = client_for(meta["tracking_uri"])
    runs = client.search_runs(
        [meta["experiment_id"]],
        filter_string=f"tags.`mlflow.parentRunId` = '{meta['parent_run_id']}'",
        max_results=10000,
    )
    metric, mode = meta["metric"], meta["mode"]
    rows = []
    for r in runs:
        hist = [m.value for m in client.get_metric_history(r.info.run_id, metric)]
        best = (max(hist) if mode == "max" else min(hist)) if hist else None
        status = r.info.status
        if r.data.tags.get(TAG_PRUNED) == "true":
            status = "PRUNED"
        rows.append(Row(
            trial=r.data.tags.get(TAG_TRIAL, r.info.run_id[:8]),
            run_id=r.info.run_id,
            values={k: r.data.params.get(k, "") for k in meta.get("varying", [])},
            best=best,
            epochs=int(r.data.metrics.get("epoch", 0)),
            status=status,
            test_acc=r.data.metrics.get("test/acc"),
            error=r.data.tags.get("tl_sweep.error", ""),
        ))
    sign = -1 if mode == "max" else 1
    rows.sort(key=lambda row: (row.best is None, sign * (row.best or 0.0)))
    return rows


def export_best(meta: Dict[str, Any], top: int) -> str:
    """The top-K trials' specs (search removed, values fixed) as YAML; K > 1 gives one
    document per trial, best first."""
    client = client_for(meta["tracking_uri"])
    rows = [r for r in leaderboard(meta) if r.best is not None][:top]
    if not rows:
        raise InputError(f"sweep {meta['id']} has no trial with a {meta['metric']} to rank by")
    docs = []
    for rank, row in enumerate(rows, 1):
        local = client.download_artifacts(row.run_id, "trial_spec.yaml")
        doc = yaml.safe_load(Path(local).read_text())
        if len(rows) > 1:
            doc["name"] = f"{doc['name']}-rank{rank}"
        doc["description"] = (
            f"Exported from sweep {meta['id']}, trial {row.trial} (rank {rank}): "
            f"best {meta['metric']}={row.best:.4f}. Re-run with: tl-sweep run <this file>"
        )
        docs.append(doc)
    return yaml.safe_dump_all(docs, sort_keys=False)
