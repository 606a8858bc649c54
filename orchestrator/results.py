"""A sweep's results in MLflow: leaderboard, export of the best configs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import yaml

from orchestrator.sweepdir import InputError, Sweep
from orchestrator.tracking import TAG_BEST, TAG_EPOCHS, TAG_ERROR, TAG_PRUNED, TAG_TRIAL, client_for
from trainables import metrics as M


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
    trainable: Optional[float] = None  # model/params_trainable (the last logged)


def leaderboard(sweep: Sweep) -> List[Row]:
    """One row per trial's child run, best first (by the sweep's metric and mode)."""
    meta = sweep.meta
    client = client_for(meta["tracking_uri"])
    runs = client.search_runs(
        [meta["experiment_id"]],
        filter_string=f"tags.`mlflow.parentRunId` = '{meta['parent_run_id']}'",
        max_results=10000,
    )
    metric, mode = meta["metric"], meta["mode"]
    rows = []
    last = meta.get("scope", "all") == "last"  # a trial's last epoch counts, not its best
    for r in runs:
        hist = [m.value for m in sorted(client.get_metric_history(r.info.run_id, metric), key=lambda m: m.step)]
        best = (hist[-1] if last else max(hist) if mode == "max" else min(hist)) if hist else None
        status = r.info.status
        if r.data.tags.get(TAG_PRUNED) == "true":
            status = "PRUNED"
        rows.append(Row(
            trial=r.data.tags.get(TAG_TRIAL, r.info.run_id[:8]),
            run_id=r.info.run_id,
            values={k: r.data.params.get(k, "") for k in meta.get("varying", [])},
            best=best,
            epochs=int(r.data.tags.get(TAG_EPOCHS, 0)),
            status=status,
            test_acc=r.data.metrics.get(M.TEST_ACC),
            error=r.data.tags.get(TAG_ERROR, ""),
            trainable=r.data.metrics.get(M.PARAMS_TRAINABLE),
        ))
    sign = -1 if mode == "max" else 1
    # a tie goes to the trial the sweep marked best (its checkpoint and model are logged)
    marked = {r.info.run_id for r in runs if r.data.tags.get(TAG_BEST) == "true"}
    rows.sort(key=lambda row: (row.best is None, sign * (row.best or 0.0), row.run_id not in marked))
    return rows


def most_efficient(rows: List[Row], mode: str) -> Optional[Row]:
    """The trial that kept the most of the metric per trainable parameter (a metric that is
    maximised: accuracy, F1); None for a minimised metric or when no trial logged its count."""
    if mode != "max":
        return None
    scored = [r for r in rows if r.best is not None and r.trainable]
    return max(scored, key=lambda r: r.best / r.trainable, default=None)


def export_best(sweep: Sweep, top: int) -> str:
    """The top-K trials' specs (search removed, values fixed) as YAML; K > 1 gives one
    document per trial, best first."""
    meta = sweep.meta
    client = client_for(meta["tracking_uri"])
    rows = [r for r in leaderboard(sweep) if r.best is not None][:top]
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
