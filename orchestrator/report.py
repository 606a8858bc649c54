"""Reports a person would rather look at: ``tl-sweep report SWEEP [SWEEP...]``.

Figures are data first (as Optuna's visualization builds a plain info object, then draws it):
``collect`` reads a sweep from MLflow, each ``*_info`` function computes what one figure shows
(tests check these), and ``draw_*`` turns an info object into a matplotlib figure. ``write``
puts the figures (PNG) and one self-contained HTML page (the figures inlined, no script, no
request to anywhere) in a folder.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from orchestrator.fmt import metric as fmt_metric
from orchestrator.fmt import num, short
from orchestrator.sweepdir import SPEC_FILE, Sweep
from orchestrator.tracking import TAG_BEST, TAG_EPOCHS, TAG_ERROR, TAG_INDEX, TAG_STATUS, client_for

CURVES = ("train/loss", "val/loss", "train/acc", "val/acc")
# The keys a study is about, first the one its plot puts on the x axis.
STUDY_KEYS = ("strategy.fraction", "strategy.rank", "strategy.unfreeze_last", "data.label_fraction", "strategy.unfreeze_every", "strategy.bn",
              "model.name", "semi.method", "train.class_weighting", "train.sampler", "augment.trivial_augment",
              "augment.cutmix_alpha", "augment.mixup_alpha", "train.optimizer", "strategy.name", "strategy.method",
              "strategy.target_groups")


@dataclass
class Trial:
    run_id: str
    name: str
    index: int
    status: str  # finished | pruned | failed | stopped
    values: Dict[str, Any]  # the searched keys' values
    history: Dict[str, List[Tuple[int, float]]]
    metrics: Dict[str, float]
    epochs: int
    start: float  # seconds
    end: float
    error: str = ""
    marked: bool = False  # the sweep's best (its checkpoint and model are logged)

    def best(self, metric: str, mode: str) -> Optional[float]:
        hist = [v for _, v in self.history.get(metric, [])]
        return (max(hist) if mode == "max" else min(hist)) if hist else None

    def at(self, metric: str, epoch: int) -> Optional[float]:
        return next((v for s, v in self.history.get(metric, []) if s == epoch), None)


@dataclass
class SweepData:
    sweep: Sweep
    spec: Dict[str, Any]
    trials: List[Trial]
    space: Dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.sweep.id

    @property
    def metric(self) -> str:
        return self.sweep.meta["metric"]

    @property
    def mode(self) -> str:
        return self.sweep.meta["mode"]

    @property
    def varying(self) -> List[str]:
        return list(self.sweep.meta.get("varying", []))


def _value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def collect(sweep: Sweep) -> SweepData:
    """A sweep's trials as MLflow has them: values, per-epoch curves, status, times."""
    meta = sweep.meta
    client = client_for(meta["tracking_uri"])
    spec = yaml.safe_load(sweep.store.read_bytes(SPEC_FILE)) if sweep.store.exists(SPEC_FILE) else {}
    runs = client.search_runs([meta["experiment_id"]], max_results=10000,
                              filter_string=f"tags.`mlflow.parentRunId` = '{meta['parent_run_id']}'")
    wanted = sorted(set(CURVES) | {meta["metric"]})
    trials = []
    for r in runs:
        history = {m: sorted((h.step, h.value) for h in client.get_metric_history(r.info.run_id, m)) for m in wanted}
        tags = r.data.tags
        status = tags.get(TAG_STATUS) or {"FINISHED": "finished", "FAILED": "failed"}.get(r.info.status, "stopped")
        trials.append(Trial(
            run_id=r.info.run_id, name=r.info.run_name or r.info.run_id[:8], index=int(tags.get(TAG_INDEX, 0) or 0),
            status=status, values={k: _value(r.data.params[k]) for k in meta.get("varying", []) if k in r.data.params},
            history=history, metrics=dict(r.data.metrics), epochs=int(tags.get(TAG_EPOCHS, 0) or 0),
            start=r.info.start_time / 1000, end=(r.info.end_time or r.info.start_time) / 1000,
            error=tags.get(TAG_ERROR, ""), marked=tags.get(TAG_BEST) == "true"))
    trials.sort(key=lambda t: t.index)
    space = ((spec.get("search") or {}).get("space") or {})
    return SweepData(sweep, spec, trials, space)


# --------------------------------------------------------------------------- figure data


def leaderboard_info(data: SweepData) -> Dict[str, Any]:
    """Rows best first: the values that differ between trials only, metrics to 4 digits."""
    keys = [k for k in data.varying if len({json.dumps(t.values.get(k), default=str) for t in data.trials}) > 1]
    sign = -1 if data.mode == "max" else 1
    ranked = sorted(data.trials, key=lambda t: (t.best(data.metric, data.mode) is None,
                                                 sign * (t.best(data.metric, data.mode) or 0.0), not t.marked))
    rows = []
    for rank, t in enumerate(ranked, 1):
        best = t.best(data.metric, data.mode)
        rows.append({"rank": rank, "trial": t.name, **{short(k): num(t.values.get(k, "")) for k in keys},
                     f"best {data.metric}": "-" if best is None else fmt_metric(best),
                     "test/acc": fmt_metric(t.metrics["test/acc"]) if "test/acc" in t.metrics else "-",
                     "epochs": t.epochs, "status": t.status + (f": {t.error.strip().splitlines()[-1][:60]}" if t.error else "")})
    return {"columns": list(rows[0]) if rows else [], "rows": rows, "keys": keys}


def study_key(datas: Sequence[SweepData]) -> Tuple[Optional[str], Optional[str]]:
    """The study's x axis and, when another key varies by category, its hue."""
    varying = [k for d in datas for k in d.varying]
    ordered = [k for k in STUDY_KEYS if k in varying] + [k for k in varying if k not in STUDY_KEYS]
    if not ordered:
        return None, None
    x = ordered[0]
    hue = next((k for k in ordered[1:] if k in STUDY_KEYS), None)
    return x, hue


def study_info(datas: Sequence[SweepData]) -> Dict[str, Any]:
    """The study's own plot: test/acc (else the sweep's metric) against the key the study
    varies, one point per finished trial, mean and spread over replicates, a series per hue
    value (and per sweep when several are compared)."""
    x, hue = study_key(datas)
    # sweeps that do not all vary it (strategy 1 vs strategy 2): one column per sweep
    by_sweep = len(datas) > 1 and any(x not in d.varying for d in datas)
    if by_sweep:
        x, hue = "sweep", None
    y = datas[0].metric
    points, series = [], {}
    for d in datas:
        for t in d.trials:
            value = t.best(d.metric, d.mode)
            if value is None or (not by_sweep and x not in t.values):
                continue
            xv = d.id if by_sweep else t.values[x]
            parts = ([d.id] if len(datas) > 1 and not by_sweep else []) + ([f"{short(hue)}={t.values.get(hue)}"] if hue else [])
            label = " / ".join(parts)
            points.append({"x": xv, "y": value, "series": label, "trial": t.name, "sweep": d.id,
                           "status": t.status, "test/acc": t.metrics.get("test/acc")})
            series.setdefault(label, {}).setdefault(json.dumps(xv, default=str), []).append((t.status, value))
    summary = []
    for label, by_x in series.items():
        for xs, got in by_x.items():
            # trials that ran to the end, where there are: a trial ASHA stopped early saw fewer epochs
            ended = [v for st, v in got if st == "finished"]
            ys = ended or [v for _, v in got]
            summary.append({"series": label, "x": json.loads(xs), "mean": statistics.mean(ys),
                            "std": statistics.stdev(ys) if len(ys) > 1 else 0.0, "n": len(ys),
                            "stopped_early": not ended})
    numeric = all(isinstance(p["x"], (int, float)) and not isinstance(p["x"], bool) for p in points)
    log_x = numeric and bool(points) and x in {k for d in datas for k, v in d.space.items()
                                                  if isinstance(v, dict) and "loguniform" in v}
    return {"x": x, "hue": hue, "y": y, "points": points, "summary": summary, "numeric": numeric, "log_x": log_x}


def curves_info(data: SweepData) -> Dict[str, Any]:
    """Every trial's curves; a pruned trial's stop where ASHA cut it."""
    return {"trials": [{"name": t.name, "status": t.status, **{m: t.history.get(m, []) for m in CURVES}}
                       for t in data.trials]}


def parallel_info(data: SweepData) -> Dict[str, Any]:
    """Each searched key (and the metric) an axis scaled to [0, 1]; a line per trial."""
    axes = [k for k in data.varying]
    lines = []
    for t in data.trials:
        best = t.best(data.metric, data.mode)
        if best is None:
            continue
        lines.append({"trial": t.name, "values": [t.values.get(k) for k in axes] + [best], "status": t.status})
    cols = axes + [data.metric]
    scaled = []
    for i, key in enumerate(cols):
        column = [ln["values"][i] for ln in lines]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in column) and column:
            log = key in data.space and isinstance(data.space[key], dict) and "loguniform" in data.space[key]
            vals = [math.log10(v) if log and v > 0 else v for v in column]
            lo, hi = min(vals), max(vals)
            scaled.append({"key": key, "ticks": [num(min(column)), num(max(column))],
                           "pos": [(v - lo) / (hi - lo) if hi > lo else 0.5 for v in vals]})
        else:
            cats = sorted({json.dumps(v, default=str) for v in column})
            scaled.append({"key": key, "ticks": [json.loads(c) if c != "null" else "-" for c in cats],
                           "pos": [cats.index(json.dumps(v, default=str)) / max(len(cats) - 1, 1) for v in column]})
    return {"axes": scaled, "lines": lines}


def _distributions(space: Dict[str, Any]):
    import optuna.distributions as D

    out = {}
    for key, dist in space.items():
        kind, args = next(iter(dist.items()))
        if kind in ("grid", "choice"):
            out[key] = D.CategoricalDistribution([json.dumps(a) if not isinstance(a, (int, float, str, bool)) else a
                                                  for a in args])
        elif kind == "loguniform":
            out[key] = D.FloatDistribution(args[0], args[1], log=True)
        elif kind == "randint":
            out[key] = D.IntDistribution(args[0], args[1])
        elif kind == "quniform":
            out[key] = D.FloatDistribution(args[0], args[1], step=args[2])
        else:
            out[key] = D.FloatDistribution(args[0], args[1])
    return out


def importance_info(data: SweepData) -> Dict[str, Any]:
    """Parameter importance by Optuna's fANOVA and PED-ANOVA on a study rebuilt from the
    trials (each sums to 1 over the searched keys), and how far the two agree (Spearman's rank
    correlation). When most trials were pruned, the trials are compared at ASHA's first rung."""
    import optuna

    dists = _distributions(data.space)
    if not dists:
        return {"note": "nothing was searched"}
    pruned = sum(t.status == "pruned" for t in data.trials)
    finished = sum(t.status == "finished" for t in data.trials)
    rung = None
    if pruned > len(data.trials) / 2 or (pruned and finished < 3):
        grace = int(((data.spec.get("search") or {}).get("scheduler") or {}).get("grace_period", 1))
        rung = grace
    with _quiet():
        study = optuna.create_study(direction="maximize" if data.mode == "max" else "minimize")
    for t in data.trials:
        value = t.at(data.metric, rung) if rung else (t.best(data.metric, data.mode) if t.status == "finished" else None)
        if value is None or any(k not in t.values for k in dists):
            continue
        params = {k: (json.dumps(t.values[k]) if isinstance(dists[k], optuna.distributions.CategoricalDistribution)
                      and not isinstance(t.values[k], (int, float, str, bool)) else t.values[k]) for k in dists}
        try:
            study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=value))
        except ValueError:  # a value outside the distribution (a --set changed the space): left out
            continue
    n = len(study.trials)
    if n < 3:
        return {"note": f"{n} trial(s) with a value: too few to weigh parameters", "n": n, "rung": rung}
    out: Dict[str, Any] = {"n": n, "rung": rung}
    with _quiet():
        out["fanova"] = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), normalize=True)
        out["ped_anova"] = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(), normalize=True)
    keys = sorted(dists)
    if sum(out["ped_anova"].values()) == 0:  # PED-ANOVA found no difference at all
        out["ped_anova"] = {k: 1.0 / len(keys) for k in keys}
    out["agreement"] = _spearman([out["fanova"].get(k, 0.0) for k in keys], [out["ped_anova"].get(k, 0.0) for k in keys])
    return out


class _quiet:
    def __enter__(self):
        import logging
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")
        self._level = logging.getLogger("optuna").level
        logging.getLogger("optuna").setLevel(logging.ERROR)

    def __exit__(self, *exc):
        import logging

        logging.getLogger("optuna").setLevel(self._level)
        self._w.__exit__(*exc)


def _spearman(a: List[float], b: List[float]) -> Optional[float]:
    if len(a) < 2:
        return None

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for pos, i in enumerate(order):
            r[i] = pos
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    den = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / den if den else None


def resources_info(data: SweepData) -> Dict[str, Any]:
    """Trial-epochs run against the same sweep without early stopping; wall time; CPU / GPU hours."""
    spec = data.spec
    epochs = int(((spec.get("train") or {}).get("epochs")) or 10)
    res = spec.get("resources") or {}
    cpu, gpu = float(res.get("cpu", 1)), float(res.get("gpu", 0))
    run = sum(t.epochs for t in data.trials)
    full = sum(max(t.epochs, epochs) if t.status in ("finished", "pruned") else t.epochs for t in data.trials)
    busy = sum(max(0.0, t.end - t.start) for t in data.trials)
    wall = (max(t.end for t in data.trials) - min(t.start for t in data.trials)) if data.trials else 0.0
    return {"trials": len(data.trials), "trial_epochs": run, "without_early_stopping": full,
            "saved": 1 - run / full if full else 0.0, "wall_s": wall, "cpu_hours": busy * cpu / 3600,
            "gpu_hours": busy * gpu / 3600, "by_status": {s: sum(t.status == s for t in data.trials)
                                                          for s in ("finished", "pruned", "failed", "stopped")}}


# --------------------------------------------------------------------------- drawing


def _figure(w: float = 7, h: float = 4):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(w, h), dpi=100)


def draw_study(info: Dict[str, Any]):
    fig, ax = _figure()
    series = sorted({p["series"] for p in info["points"]})
    cats = None
    if not info["numeric"]:
        cats = sorted({json.dumps(p["x"], default=str) for p in info["points"]})
    pos = (lambda v: v) if cats is None else (lambda v: cats.index(json.dumps(v, default=str)))
    for i, label in enumerate(series or [""]):
        pts = [p for p in info["points"] if p["series"] == label]
        summ = sorted([s for s in info["summary"] if s["series"] == label], key=lambda s: pos(s["x"]))
        offset = (i - (len(series) - 1) / 2) * 0.08 if cats is not None else 0
        bar = ax.errorbar([pos(s["x"]) + offset for s in summ], [s["mean"] for s in summ], yerr=[s["std"] for s in summ],
                          marker="o", capsize=3, label=label or None)
        colour = bar.lines[0].get_color()
        early = [s for s in summ if s.get("stopped_early")]  # no trial there ran to the end
        ax.scatter([pos(s["x"]) + offset for s in early], [s["mean"] for s in early], s=70, marker="s",
                   facecolors="white", edgecolors=colour, zorder=3)
        done = [p for p in pts if p["status"] == "finished"]
        cut = [p for p in pts if p["status"] != "finished"]
        ax.scatter([pos(p["x"]) + offset for p in done], [p["y"] for p in done], alpha=0.5, s=18, color=colour)
        ax.scatter([pos(p["x"]) + offset for p in cut], [p["y"] for p in cut], s=18, facecolors="none",
                   edgecolors=colour, alpha=0.7)
    if cats is not None:
        ax.set_xticks(range(len(cats)), [json.loads(c) for c in cats])
    elif all(isinstance(p["x"], int) for p in info["points"]):
        ax.set_xticks(sorted({p["x"] for p in info["points"]}))
    if info["log_x"]:
        ax.set_xscale("log")
    ax.set_xlabel(info["x"] or "")
    ax.set_ylabel(info["y"])
    ax.set_title(f"best {info['y']} by {info['x']}" + (f" and {info['hue']}" if info["hue"] else "")
                 + "\nmean +- sd of the trials run to the end; small hollow: a trial stopped early"
                 + ("\nhollow square: no trial ran to the end (their mean)" if any(
                     s.get("stopped_early") for s in info["summary"]) else ""), fontsize=9)
    if series and series != [""]:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def draw_curves(info: Dict[str, Any]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, t in enumerate(info["trials"]):
        colour = colours[i % len(colours)]
        for ax, (train, val) in zip(axes, (("train/loss", "val/loss"), ("train/acc", "val/acc"))):
            for m, style in ((train, ":"), (val, "-")):
                pts = t[m]
                if not pts:
                    continue
                ax.plot([s for s, _ in pts], [v for _, v in pts], style, alpha=0.8, color=colour,
                        label=t["name"] if m == val else None)
                if t["status"] == "pruned" and m == val:  # cut at its rung
                    ax.plot(pts[-1][0], pts[-1][1], "x", color=colour, markersize=9)
    for ax in axes:
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax, title in zip(axes, ("loss (dotted: train, solid: val)", "accuracy (x: stopped by ASHA)")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    if len(info["trials"]) <= 12:
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def draw_parallel(info: Dict[str, Any], metric_best: float = None):
    fig, ax = _figure(9, 4)
    n = len(info["axes"])
    metric_pos = info["axes"][-1]["pos"] if info["axes"] else []
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    for i, line in enumerate(info["lines"]):
        ys = [a["pos"][i] for a in info["axes"]]
        ax.plot(range(n), ys, color=cmap(metric_pos[i] if metric_pos else 0.5), alpha=0.8,
                linestyle="--" if line["status"] == "pruned" else "-")
    ax.set_xticks(range(n), [a["key"] for a in info["axes"]], rotation=15, fontsize=8)
    for j, a in enumerate(info["axes"]):
        ax.axvline(j, color="grey", lw=0.5)
        ax.text(j, -0.08, str(a["ticks"][0]), ha="center", va="top", fontsize=7)
        ax.text(j, 1.05, str(a["ticks"][-1]), ha="center", va="bottom", fontsize=7)
    ax.set_ylim(-0.15, 1.15)
    ax.set_yticks([])
    ax.set_title("searched values against the metric (colour: the metric; dashed: stopped early)", fontsize=9)
    fig.tight_layout()
    return fig


def draw_importance(info: Dict[str, Any]):
    fig, ax = _figure(7, 3.2)
    keys = sorted(info["fanova"], key=lambda k: -info["fanova"][k])
    ys = range(len(keys))
    ax.barh([y + 0.2 for y in ys], [info["fanova"][k] for k in keys], height=0.4, label="fANOVA")
    ax.barh([y - 0.2 for y in ys], [info["ped_anova"].get(k, 0.0) for k in keys], height=0.4, label="PED-ANOVA")
    ax.set_yticks(list(ys), keys, fontsize=8)
    ax.invert_yaxis()
    agree = info.get("agreement")
    at = f" at epoch {info['rung']} (ASHA's first rung)" if info.get("rung") else ""
    ax.set_title(f"parameter importance{at}; rank agreement {'-' if agree is None else num(agree)}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def draw_confusion(info: Dict[str, Any]):
    import numpy as np

    fig, (ax, bx) = __import__("matplotlib.pyplot", fromlist=["subplots"]).subplots(1, 2, figsize=(11, 4.5), dpi=100)
    m = np.asarray(info["matrix"], dtype=float)
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    n = len(info["classes"])
    if n <= 40:
        ax.set_xticks(range(n), info["classes"], rotation=90, fontsize=6)
        ax.set_yticks(range(n), info["classes"], fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion on {info['split']} (rows sum to 1)", fontsize=9)
    order = sorted(range(n), key=lambda i: info["per_class"][i])
    bx.barh(range(n), [info["per_class"][i] for i in order])
    bx.set_yticks(range(n), [info["classes"][i] for i in order], fontsize=6)
    bx.set_xlim(0, 1)
    bx.set_title("accuracy per class", fontsize=9)
    fig.tight_layout()
    return fig


def draw_worst(info: Dict[str, Any]):
    import matplotlib.pyplot as plt

    items = info["worst"]
    cols = min(8, max(1, len(items)))
    rows = max(1, math.ceil(len(items) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, item in zip(axes.flat, items):
        ax.imshow(item["image"])
        ax.set_title(f"{item['true']} -> {item['pred']}", fontsize=6)
    fig.suptitle("the worst-classified test images (true -> predicted)", fontsize=9)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- the best trial's errors


def errors_info(data: SweepData, worst: int = 16, best=None) -> Optional[Dict[str, Any]]:
    """Confusion matrix, per-class accuracy and the worst-classified images of the best trial
    on its test split, from its logged checkpoint (None when it or the data is not here).
    ``best``: the trial's model already rebuilt (orchestrator.bestmodel.load_best)."""
    import numpy as np

    from orchestrator.bestmodel import load_best

    best = best or load_best(data.sweep)
    if best is None:
        return None
    import torch
    import torch.nn.functional as F

    trial, best_id = best.trial, best.run_id
    if getattr(trial, "tasks", None) is not None:  # several targets: no one confusion matrix (their metrics are logged)
        return None
    trial.model.eval()
    test = trial.data.test
    C = trial.data.num_classes
    matrix = np.zeros((C, C), dtype=int)
    losses, preds = [], []
    with torch.no_grad():
        for i in range(0, len(test), 64):
            batch = [test[j] for j in range(i, min(i + 64, len(test)))]
            x = torch.stack([b[0] for b in batch])
            y = torch.tensor([b[1] for b in batch])
            logits = trial.model(trial.inputs(x)).float()
            losses += F.cross_entropy(logits, y, reduction="none").tolist()
            preds += logits.argmax(1).tolist()
            for t, p in zip(y.tolist(), logits.argmax(1).tolist()):
                matrix[t, p] += 1
    per_class = (np.diag(matrix) / np.maximum(matrix.sum(1), 1)).tolist()
    order = sorted(range(len(test)), key=lambda i: -losses[i])[:worst]
    classes = list(trial.data.classes)
    items = [{"image": test[i][0].permute(1, 2, 0).numpy(), "true": classes[int(test.targets[i])],
              "pred": classes[preds[i]], "loss": losses[i]} for i in order if preds[i] != int(test.targets[i])]
    return {"matrix": matrix.tolist(), "classes": classes, "per_class": per_class, "split": "test",
            "accuracy": float(np.trace(matrix) / max(matrix.sum(), 1)), "worst": items, "run_id": best_id}


# --------------------------------------------------------------------------- the page


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _table(columns: List[str], rows: List[Dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr class='{}'>{}</tr>".format(
        html.escape(str(r.get("status", "")).split(":")[0]),
        "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in columns)) for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """body{font-family:sans-serif;margin:24px;max-width:1200px}table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}tr.pruned td{color:#888}
tr.failed td{color:#b00}img{max-width:100%;display:block;margin:8px 0 24px}h2{margin-top:32px}.note{color:#666}"""


def build(datas: Sequence[SweepData], errors: bool = True, best=None) -> Tuple[Dict[str, Any], Dict[str, bytes], str]:
    """Every figure's data, the PNGs, and the HTML page for one sweep or several side by side."""
    infos: Dict[str, Any] = {}
    pngs: Dict[str, bytes] = {}
    sections: List[str] = []
    title = " vs ".join(d.id for d in datas)
    study = study_info(datas)
    infos["study"] = study
    if study["points"]:
        pngs["study.png"] = _png(draw_study(study))
    for d in datas:
        prefix = f"{d.id}-" if len(datas) > 1 else ""
        board = leaderboard_info(d)
        res = resources_info(d)
        infos[f"{prefix}leaderboard"], infos[f"{prefix}resources"] = board, res
        curves = curves_info(d)
        infos[f"{prefix}curves"] = curves
        pngs[f"{prefix}curves.png"] = _png(draw_curves(curves))
        par = parallel_info(d)
        infos[f"{prefix}parallel"] = par
        if par["lines"] and par["axes"]:
            pngs[f"{prefix}parallel.png"] = _png(draw_parallel(par))
        imp = importance_info(d)
        infos[f"{prefix}importance"] = imp
        if "fanova" in imp:
            pngs[f"{prefix}importance.png"] = _png(draw_importance(imp))
        err = errors_info(d, best=best if best is not None and best.run_id in {t.run_id for t in d.trials} else None) \
            if errors else None
        if err is not None:
            infos[f"{prefix}errors"] = {k: v for k, v in err.items() if k != "worst"} | {"worst": len(err["worst"])}
            pngs[f"{prefix}confusion.png"] = _png(draw_confusion(err))
            if err["worst"]:
                pngs[f"{prefix}worst.png"] = _png(draw_worst(err))
        sections.append(_section(d, board, res, imp, prefix, pngs))
    study_html = ""
    if "study.png" in pngs:
        study_html = f"<h2>The study: {html.escape(study['y'])} by {html.escape(str(study['x']))}</h2>{_img(pngs, 'study.png')}"
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>tl-sweep report: {html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>tl-sweep report: {html.escape(title)}</h1>{study_html}"
            f"{''.join(sections)}</body></html>")
    return infos, pngs, page


def _img(pngs: Dict[str, bytes], name: str) -> str:
    return f"<img alt='{html.escape(name)}' src='data:image/png;base64,{base64.b64encode(pngs[name]).decode()}'>"


def _section(d: SweepData, board, res, imp, prefix: str, pngs: Dict[str, bytes]) -> str:
    meta = d.sweep.meta
    desc = html.escape(str(d.spec.get("description") or ""))
    counts = ", ".join(f"{v} {k}" for k, v in res["by_status"].items() if v)
    parts = [f"<h2>{html.escape(d.id)}</h2><p>{desc}</p>",
             f"<p>{len(d.trials)} trial(s): {counts}. Metric {html.escape(meta['metric'])} ({meta['mode']}).</p>",
             "<h3>Leaderboard</h3>", _table(board["columns"], board["rows"]),
             "<h3>Learning curves</h3>", _img(pngs, f"{prefix}curves.png")]
    if f"{prefix}parallel.png" in pngs:
        parts += ["<h3>Parallel coordinates</h3>", _img(pngs, f"{prefix}parallel.png")]
    if f"{prefix}importance.png" in pngs:
        parts += ["<h3>Parameter importance</h3>", _img(pngs, f"{prefix}importance.png")]
    elif "note" in imp:
        parts += ["<h3>Parameter importance</h3>", f"<p class='note'>{html.escape(imp['note'])}</p>"]
    if f"{prefix}confusion.png" in pngs:
        parts += ["<h3>The best trial on its test split</h3>", _img(pngs, f"{prefix}confusion.png")]
    if f"{prefix}worst.png" in pngs:
        parts += [_img(pngs, f"{prefix}worst.png")]
    parts += ["<h3>Resources</h3>", _table(["trial-epochs run", "without early stopping", "saved", "wall", "CPU hours",
                                            "GPU hours"],
                                           [{"trial-epochs run": res["trial_epochs"],
                                             "without early stopping": res["without_early_stopping"],
                                             "saved": f"{100 * res['saved']:.0f}%", "wall": f"{res['wall_s']:.0f} s",
                                             "CPU hours": num(res["cpu_hours"]), "GPU hours": num(res["gpu_hours"])}])]
    return "".join(parts)


def write(datas: Sequence[SweepData], out: Path, errors: bool = True, best=None) -> Dict[str, Any]:
    """The report in ``out``: report.html (self-contained), one PNG per figure, figures.json."""
    infos, pngs, page = build(datas, errors=errors, best=best)
    out.mkdir(parents=True, exist_ok=True)
    for name, blob in pngs.items():
        (out / name).write_bytes(blob)
    (out / "report.html").write_text(page)
    (out / "figures.json").write_text(json.dumps(infos, default=str, indent=1))
    return infos


def log_to_parent(client, sweep: Sweep, out: Path) -> None:
    client.log_artifacts(sweep.meta["parent_run_id"], str(out), artifact_path="report")
