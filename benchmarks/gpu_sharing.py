"""Several trials on one GPU: aggregate training images/s for 1, 2, 4 ... concurrent trials.

This is what ``resources.gpu: 0.5`` (or 0.25) buys under Ray Tune: Ray only places several
trial processes on the same GPU; each runs the ordinary trainable. Here each trial is one
process running ``FineTuneTrial`` (no Ray, so the figure is the GPU's, not the scheduler's),
all started together; the aggregate is the sum of their median per-epoch images/s.

    python benchmarks/gpu_sharing.py --model resnet18 --image-size 128 --trials 1 2 4
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics


def one_trial(cfg: dict, epochs: int, barrier, out) -> None:
    import torch

    from trainables.trainable import FineTuneTrial

    trial = FineTuneTrial(cfg)
    trial.train_one_epoch()  # warm-up
    barrier.wait()
    rates = [trial.train_one_epoch()["images_per_s"] for _ in range(epochs)]
    out.put((statistics.median(rates), torch.cuda.max_memory_allocated() / 2**30))


def run(cfg: dict, n: int, epochs: int):
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=one_trial, args=(cfg, epochs, barrier, out)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(r for r, _ in results), max(m for _, m in results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--unfreeze-last", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--trials", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()
    cfg = {
        "data": {"name": "digits", "image_size": args.image_size, "val_fraction": 0.05, "test_fraction": 0.05, "seed": 0},
        "model": {"name": args.model, "weights": "none"},
        "strategy": {"name": "unfreeze_last", "unfreeze_last": args.unfreeze_last},
        "train": {"epochs": args.epochs + 2, "batch_size": args.batch_size, "lr": 1e-3, "optimizer": "adamw",
                  "scheduler": "constant", "device": "cuda", "amp": True, "channels_last": True},
        "resources": {"cpu": 2},
    }
    print(f"model {args.model}, {args.image_size} px, batch {args.batch_size}, unfreeze_last {args.unfreeze_last}, "
          f"bf16 autocast + channels_last; median of {args.epochs} epochs per trial")
    print(f"{'trials/GPU':>10} {'aggregate img/s':>16} {'per trial':>10} {'vs 1 trial':>11} {'peak GiB/trial':>15}")
    base = None
    for n in args.trials:
        total, mem = run(cfg, n, args.epochs)
        base = base or total
        print(f"{n:>10} {total:>16.1f} {total / n:>10.1f} {total / base:>10.2f}x {mem:>15.2f}")


if __name__ == "__main__":
    main()
