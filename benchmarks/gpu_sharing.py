"""Several trials on one GPU against the same trials one after another, wall clock.

This is what ``resources.gpu: 0.5`` (or 0.25) buys under Ray Tune: Ray only places several
trial processes on the same GPU; each runs the ordinary trainable. Here each trial is one
process running ``FineTuneTrial`` (no Ray, so the figure is the GPU's, not the scheduler's) for
the same fixed work (its epochs). For N trials it measures the wall clock of

- the N trials started together (all on the one device), and
- the same N trials alone, one after another,

each from the first process's start to the last one's end, model building and the data set
included (what a sweep pays). The speed-up is sequential / together: 1.0 means sharing gains
nothing, N would be perfect; it cannot exceed N for the same work.

    python benchmarks/gpu_sharing.py --model resnet18 --image-size 128 --trials 1 2 4
    python benchmarks/gpu_sharing.py --device cpu --model resnet18 --image-size 32 --epochs 1 --trials 1 2
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import time


def one_trial(cfg: dict, out) -> None:
    import torch

    from trainables.trainable import FineTuneTrial

    trial = FineTuneTrial(cfg)
    images = 0
    for _ in range(cfg["train"]["epochs"]):
        images += len(trial.data.train)
        trial.train_one_epoch()
    mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    out.put((images, mem))


def wall(cfg: dict, n: int, together: bool):
    """Seconds for n trials (together, or one after another), the images they trained, peak GiB."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start = time.perf_counter()
    results = []
    if together:
        procs = [ctx.Process(target=one_trial, args=(cfg, out)) for _ in range(n)]
        for p in procs:
            p.start()
        results = [out.get() for _ in procs]
        for p in procs:
            p.join()
    else:
        for _ in range(n):
            p = ctx.Process(target=one_trial, args=(cfg, out))
            p.start()
            results.append(out.get())
            p.join()
    seconds = time.perf_counter() - start
    return seconds, sum(r for r, _ in results), max(m for _, m in results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--unfreeze-last", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3, help="the fixed work of one trial")
    ap.add_argument("--max-images", type=int, default=None)
    ap.add_argument("--trials", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()
    cfg = {
        "data": {"name": "digits", "image_size": args.image_size, "val_fraction": 0.05, "test_fraction": 0.05, "seed": 0,
                 "num_workers": 0, "max_images": args.max_images},
        "model": {"name": args.model, "weights": "none"},
        "strategy": {"name": "unfreeze_last", "unfreeze_last": args.unfreeze_last},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": 1e-3, "optimizer": "adamw",
                  "scheduler": "constant", "device": args.device, "amp": True, "channels_last": True},
        "resources": {"cpu": 1 if args.device == "cpu" else 2},
    }
    print(f"{args.device}: model {args.model}, {args.image_size} px, batch {args.batch_size}, unfreeze_last "
          f"{args.unfreeze_last}, {args.epochs} epoch(s) per trial; wall clock from the first start to the last end")
    print(f"{'trials':>6} {'together s':>11} {'in turn s':>10} {'speed-up':>9} {'img/s together':>15} "
          f"{'img/s in turn':>14} {'peak GiB/trial':>15}")
    for n in args.trials:
        t_together, images, mem = wall(cfg, n, together=True)
        t_turn, _, _ = wall(cfg, n, together=False)
        print(f"{n:>6} {t_together:>11.1f} {t_turn:>10.1f} {t_turn / t_together:>8.2f}x {images / t_together:>15.1f} "
              f"{images / t_turn:>14.1f} {mem:>15.2f}")


if __name__ == "__main__":
    main()
