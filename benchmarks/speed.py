"""Fast trials, measured side by side on this machine (issue "Fast trials").

    python benchmarks/speed.py --quick        # about 4 minutes on 2 CPU cores
    python benchmarks/speed.py                # larger data, more seeds

Prints a table, then, last, one JSON line:

- decoded_cache_speedup: images/s of a trial's training input pipeline (its train loader with
  random resized crop + flip at 224 px, to normalised batches on the device), reading the node's
  decoded-image cache (no worker: the batch is augmented in the training process), over
  decoding and resizing the JPEGs with PIL every epoch in one DataLoader worker (the cache filled
  beforehand by a first trial; its time is shown). Mean over 3 epochs after a warm-up one.
- feature_cache_speedup: a 10-epoch linear probe (resnet18, 224 px), wall clock without the
  frozen-prefix feature cache over with it, its one-off pass over the images included.
- overhead_s_per_trial: seconds per trial through tl-sweep beyond raw Ray Tune + Optuna + ASHA
  running the same trial function on the same tiny config, 8 trials 2 at a time: each one's
  trials' span (first start to last end as its driver saw them: MLflow runs, a Tune callback)
  times 2 over 8.
- sweep_fixed_s: what a tl-sweep sweep costs beyond its trials: the whole command (start,
  checks, MLflow, Tune's start, the end: summary, best model, report, shutdown) less that span.
- slot_utilisation: busy trial-slot seconds over available ones in the same 8-trial sweep
  (from the trials' MLflow start and end times).
- checkpoint_ratio: bytes of a linear probe's per-epoch checkpoint over a full model's.
- asha_epoch_fraction, asha_acc_gap_pt: ASHA + TPE against FIFO + random search on the same
  space (digits, EfficientNet-Lite0 with its shipped ImageNet weights), several seeds: its
  trial-epochs over FIFO's, and how many points of val/acc its best is below FIFO's best (mean
  over seeds; negative: ASHA found better).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def jpeg_folder(root: Path, per_class: int, classes: int = 4) -> Path:
    """A Pets-like folder: photos-sized JPEGs (about 450 x 380), one subfolder per class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = 380 + int(rng.integers(-40, 40)), 450 + int(rng.integers(-50, 50))
            base = np.linspace(0, 255, w)[None, :, None] * np.array([0.3 + 0.2 * c, 0.8, 1.0 - 0.2 * c])
            img = np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i}.jpg", quality=90)
    return root


def time_it(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


# --------------------------------------------------------------------------- 1. decoded images


def bench_decoded(work: Path, per_class: int, epochs: int = 3) -> dict:
    from trainables.trainable import FineTuneTrial

    root = jpeg_folder(work / "jpegs", per_class)
    data = {"name": "image_folder", "root": str(root), "image_size": 224, "val_fraction": 0.1, "test_fraction": 0.1,
            "seed": 0, "num_workers": 1}
    cfg = {"data": data, "model": {"name": "resnet18", "weights": "none"}, "train": {"batch_size": 32},
           "augment": {"hflip": True, "crop_scale_min": 0.35}, "resources": {"cpu": 2}}
    fill, _ = time_it(lambda: FineTuneTrial(json.loads(json.dumps(cfg))))  # the first trial fills the cache
    out = {}
    for mode in ("off", "auto"):
        c = json.loads(json.dumps(cfg))
        c["data"]["cache"] = mode
        trial = FineTuneTrial(c)
        loader = trial.loaders["train"]

        def epoch():  # what the training loop gets: augmented, normalised batches on the device
            return sum(len(trial.inputs(x)) for x, _ in loader)

        epoch()  # workers started, pages warm
        t, n = time_it(lambda: sum(epoch() for _ in range(epochs)))
        out[mode] = n / t
        out[f"{mode}_workers"] = loader.num_workers
    return {"pil_img_s": out["off"], "cache_img_s": out["auto"], "fill_s": fill, "pil_workers": out["off_workers"],
            "cache_workers": out["auto_workers"], "decoded_cache_speedup": out["auto"] / out["off"],
            "images": per_class * 4}


# --------------------------------------------------------------------------- 2. frozen prefix


def bench_features(work: Path, per_class: int, epochs: int = 10) -> dict:
    from trainables.trainable import FineTuneTrial

    root = work / "jpegs"
    base = {
        "data": {"name": "image_folder", "root": str(root), "image_size": 224, "val_fraction": 0.1, "test_fraction": 0.1,
                 "num_workers": 1},
        "model": {"name": "resnet18", "weights": "none"},
        "strategy": {"name": "unfreeze_last", "unfreeze_last": 0},
        "train": {"epochs": epochs, "batch_size": 32, "lr": 1e-3, "scheduler": "constant"},
        "resources": {"cpu": 2},
    }
    out = {}
    for mode in ("off", "auto"):
        os.environ["TL_SWEEP_CACHE"] = str(work / "cache")  # the decoded images stay; the features start empty
        import shutil

        shutil.rmtree(work / "cache" / "features", ignore_errors=True)
        cfg = json.loads(json.dumps(base))
        cfg["strategy"]["feature_cache"] = mode
        t, _ = time_it(lambda: FineTuneTrial(cfg).fit(lambda m, d: None, checkpoint=False))
        out[mode] = t
    return {"probe_s_without": out["off"], "probe_s_with": out["auto"],
            "feature_cache_speedup": out["off"] / out["auto"], "epochs": epochs}


# --------------------------------------------------------------------------- 3. orchestration


TINY = {
    "data": {"name": "digits", "image_size": 16, "max_images": 40, "val_fraction": 0.25, "test_fraction": 0.25},
    "model": {"name": "resnet18", "weights": "none"},
    "strategy": {"name": "unfreeze_last", "unfreeze_last": 0},
    "train": {"epochs": 1, "batch_size": 16, "lr": 1e-3, "scheduler": "constant"},
    "resources": {"cpu": 1},
}


def run_tl_sweep(work: Path, n: int, name: str) -> tuple:
    import yaml

    spec = json.loads(json.dumps(TINY))
    spec.update(name=name, storage={"path": str(work / "sweeps")},
                search={"algorithm": "optuna", "space": {"train.lr": {"loguniform": [1e-4, 1e-2]}}, "num_samples": n,
                        "scheduler": {"type": "asha"}})
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    exe = Path(sys.executable).with_name("tl-sweep")
    t, r = time_it(lambda: subprocess.run([str(exe), "run", str(path)], cwd=work, capture_output=True, text=True))
    if r.returncode:
        raise RuntimeError(r.stdout + r.stderr)
    return t, work / "sweeps"


RAW = r'''
import sys, json, time
import ray
from ray import tune
from ray.tune.search.optuna import OptunaSearch
from ray.tune.schedulers import ASHAScheduler
import optuna
n, tiny = int(sys.argv[1]), json.loads(sys.argv[2])

def trial(config):
    from trainables.trainable import FineTuneTrial
    cfg = dict(tiny, train=dict(tiny["train"], lr=config["lr"]))
    FineTuneTrial(cfg).fit(lambda m, d: tune.report({"val/acc": m["val/acc"], "epoch": m["epoch"]}), checkpoint=False)

class Spans(tune.Callback):  # when each trial starts and ends, as the driver sees it (tl-sweep's MLflow runs do the same)
    starts, ends = {}, {}
    def on_trial_start(self, iteration, trials, trial, **info):
        self.starts[trial.trial_id] = time.time()
    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ends[trial.trial_id] = time.time()

ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
search = OptunaSearch({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}, metric="val/acc", mode="max",
                      sampler=optuna.samplers.TPESampler(seed=0))
tune.Tuner(tune.with_resources(trial, {"cpu": 1}), tune_config=tune.TuneConfig(search_alg=search,
           scheduler=ASHAScheduler(time_attr="epoch", metric="val/acc", mode="max", max_t=1), num_samples=n,
           reuse_actors=True), run_config=tune.RunConfig(storage_path=sys.argv[3], verbose=0, callbacks=[Spans()])).fit()
ray.shutdown()
print("SPANS", json.dumps([[Spans.starts[k], Spans.ends[k]] for k in Spans.ends]))
'''


def run_raw(work: Path, n: int) -> tuple:
    env = dict(os.environ, PYTHONPATH=str(REPO), TUNE_MAX_PENDING_TRIALS_PG="2", RAY_AIR_NEW_OUTPUT="0")
    t, r = time_it(lambda: subprocess.run([sys.executable, "-c", RAW, str(n), json.dumps(TINY), str(work / "raw")],
                                          capture_output=True, text=True, env=env))
    if r.returncode:
        raise RuntimeError(r.stdout + r.stderr)
    line = [x for x in r.stdout.splitlines() if x.startswith("SPANS ")][-1]
    return t, [tuple(s) for s in json.loads(line[6:])]


def trial_spans(storage: Path, name: str) -> list:
    """(start, end) in seconds of each trial of sweep ``name``: its MLflow run's."""
    from mlflow.tracking import MlflowClient

    metas = [json.loads(p.read_text()) for p in storage.glob("*/sweep.json")]
    meta = [m for m in metas if m["name"] == name][-1]
    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    runs = client.search_runs([meta["experiment_id"]], filter_string=f"tags.`mlflow.parentRunId` = '{meta['parent_run_id']}'")
    return [(r.info.start_time / 1000, r.info.end_time / 1000) for r in runs]


def utilisation(spans: list, slots: int = 2) -> float:
    busy = sum(e - s for s, e in spans)
    return busy / (slots * (max(e for _, e in spans) - min(s for s, _ in spans)))


def bench_orchestration(work: Path, n: int, slots: int = 2) -> dict:
    """One tl-sweep and one raw Ray Tune + Optuna + ASHA run of the same n trivial trials, 2 at
    a time. Per trial: the trials' span (first start to last end, as each driver saw them) times
    the slots over n; fixed: the whole command less that span."""
    tl_s, storage = run_tl_sweep(work, n, f"orch{n}")
    tl = trial_spans(storage, f"orch{n}")
    raw_s, raw = run_raw(work, n)
    span = {k: max(e for _, e in v) - min(s for s, _ in v) for k, v in (("tl", tl), ("raw", raw))}
    per = {k: span[k] * slots / n for k in span}
    return {"tl_sweep_s": tl_s, "raw_tune_s": raw_s, "tl_trials_span_s": span["tl"], "raw_trials_span_s": span["raw"],
            "per_trial_tl_s": per["tl"], "per_trial_raw_s": per["raw"],
            "overhead_s_per_trial": per["tl"] - per["raw"], "sweep_fixed_s": tl_s - span["tl"],
            "raw_fixed_s": raw_s - span["raw"], "slot_utilisation": utilisation(tl, slots)}


# --------------------------------------------------------------------------- 4. checkpoints


def bench_checkpoints(work: Path) -> dict:
    from trainables.trainable import FineTuneTrial

    cfg = {"data": {"name": "digits", "image_size": 32, "max_images": 60}, "model": {"name": "resnet18", "weights": "none"},
           "strategy": {"name": "unfreeze_last", "unfreeze_last": 0}, "train": {"epochs": 2}}
    sizes = {}
    for name, last in (("probe", 0), ("full", 5)):
        cfg["strategy"]["unfreeze_last"] = last
        trial = FineTuneTrial(cfg)
        trial.train_one_epoch()
        d = work / f"ckpt-{name}"
        d.mkdir()
        trial.save(str(d))
        sizes[name] = (d / "checkpoint.pt").stat().st_size
    return {"probe_bytes": sizes["probe"], "full_bytes": sizes["full"], "checkpoint_ratio": sizes["probe"] / sizes["full"]}


# --------------------------------------------------------------------------- 5. search efficiency


def bench_search(work: Path, seeds: int, trials: int, epochs: int) -> dict:
    import yaml
    from mlflow.tracking import MlflowClient

    results = {"fifo_random": [], "asha_tpe": []}
    for seed in range(seeds):
        for kind, search in (("fifo_random", {"algorithm": "random", "scheduler": {"type": "fifo"}}),
                             ("asha_tpe", {"algorithm": "optuna", "scheduler": {"type": "asha", "grace_period": 1,
                                                                                  "reduction_factor": 3}})):
            name = f"{kind}-{seed}"
            spec = {
                "name": name,
                "data": {"name": "digits", "image_size": 32, "seed": 0},
                "model": {"name": "timm:tf_efficientnet_lite0", "weights": "imagenet"},
                "strategy": {"name": "unfreeze_last", "unfreeze_last": 0},
                "train": {"epochs": epochs, "batch_size": 64, "scheduler": "constant"},
                "search": {**search, "seed": seed, "num_samples": trials, "metric": "val/acc",
                           "space": {"train.lr": {"loguniform": [1e-4, 1e-1]},
                                     "train.weight_decay": {"loguniform": [1e-6, 1e-1]},
                                     "train.optimizer": {"choice": ["adamw", "sgd"]}}},
                "storage": {"path": str(work / "search")},
            }
            path = work / f"{name}.yaml"
            path.write_text(yaml.safe_dump(spec))
            exe = Path(sys.executable).with_name("tl-sweep")
            r = subprocess.run([str(exe), "run", str(path)], cwd=work, capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(r.stdout + r.stderr)
            metas = [json.loads(p.read_text()) for p in (work / "search").glob("*/sweep.json")]
            meta = [m for m in metas if m["name"] == name][-1]
            client = MlflowClient(f"sqlite:///{work / 'search' / 'mlflow.db'}")
            runs = client.search_runs([meta["experiment_id"]],
                                      filter_string=f"tags.`mlflow.parentRunId` = '{meta['parent_run_id']}'")
            best = max(max(m.value for m in client.get_metric_history(x.info.run_id, "val/acc")) for x in runs)
            spent = sum(int(x.data.tags.get("tl_sweep.epochs", 0)) for x in runs)
            results[kind].append({"best": best, "trial_epochs": spent})
    fifo, asha = results["fifo_random"], results["asha_tpe"]
    return {
        "fifo_best": [x["best"] for x in fifo], "asha_best": [x["best"] for x in asha],
        "fifo_epochs": [x["trial_epochs"] for x in fifo], "asha_epochs": [x["trial_epochs"] for x in asha],
        "asha_epoch_fraction": sum(x["trial_epochs"] for x in asha) / sum(x["trial_epochs"] for x in fifo),
        "asha_acc_gap_pt": 100 * statistics.mean(f["best"] - a["best"] for f, a in zip(fifo, asha)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", default=None, help="decoded features orchestration checkpoints search")
    args = ap.parse_args()
    q = args.quick
    work = Path(tempfile.mkdtemp(prefix="tl-sweep-speed-"))
    os.environ["TL_SWEEP_CACHE"] = str(work / "cache")
    report = {}
    steps = {
        "decoded": lambda: bench_decoded(work, per_class=50 if q else 150),
        "features": lambda: bench_features(work, per_class=50 if q else 150),
        "orchestration": lambda: bench_orchestration(work, n=8 if q else 16),
        "checkpoints": lambda: bench_checkpoints(work),
        "search": lambda: bench_search(work, seeds=2 if q else 3, trials=12 if q else 16, epochs=9),
    }
    for name, step in steps.items():
        if args.only and name not in args.only:
            continue
        t, out = time_it(step)
        report[name] = out
        print(f"== {name} ({t:.0f} s)", flush=True)
        for k, v in out.items():
            print(f"  {k:24} {v if not isinstance(v, float) else round(v, 4)}", flush=True)
    keys = ["decoded_cache_speedup", "feature_cache_speedup", "overhead_s_per_trial", "sweep_fixed_s",
            "slot_utilisation", "checkpoint_ratio", "asha_epoch_fraction", "asha_acc_gap_pt"]
    flat = {k: round(v, 4) for part in report.values() for k, v in part.items() if k in keys}
    print(json.dumps(flat))


if __name__ == "__main__":
    main()
