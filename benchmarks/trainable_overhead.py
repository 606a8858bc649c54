"""Images/s of the trainable's training epoch vs a bare PyTorch loop, same model and data.

The bare loop is the floor of what any wrapper can reach: the same backbone, the same trainable
parameters and optimizer, the same batches already in memory as one uint8 tensor, no data
loader, no metrics. The ratio says what tl-sweep's loop (data loader, per-item resize,
normalisation on the device, metrics) costs on top.

    python benchmarks/trainable_overhead.py                         # CPU, EfficientNet-Lite0, 64 px
    python benchmarks/trainable_overhead.py --device cuda --images 4096 --image-size 224 --batch-size 128
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from trainables.strategies.base import freeze_frozen_modules
from trainables.trainable import FineTuneTrial


def config(args) -> dict:
    return {
        "data": {"name": "digits", "image_size": args.image_size, "max_images": args.images,
                 "val_fraction": 0.05, "test_fraction": 0.05, "seed": 0, "num_workers": args.workers},
        "model": {"name": args.model, "weights": "imagenet" if args.model == "timm:tf_efficientnet_lite0" else "none"},
        "strategy": {"name": "unfreeze_last", "unfreeze_last": args.unfreeze_last, "lr_decay": 0.5},
        "train": {"epochs": args.epochs + 2, "batch_size": args.batch_size, "lr": 1e-3, "optimizer": "adamw",
                  "scheduler": "constant", "device": args.device, "amp": args.amp, "channels_last": args.channels_last},
        "resources": {"cpu": args.threads},
    }


def bare_loop(trial: FineTuneTrial):
    """Same model / params / optimizer settings; batches pre-stacked on the device.
    Returns a function that runs one epoch and returns its images/s."""
    model = copy.deepcopy(trial.model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    items = [trial.data.train[i] for i in range(len(trial.data.train))]
    x_all = torch.stack([x for x, _ in items]).to(trial.device)
    y_all = torch.tensor([y for _, y in items], device=trial.device)
    mean, std, bs = trial.mean, trial.std, trial.loaders["train"].batch_size
    mf = torch.channels_last if trial.channels_last else torch.contiguous_format

    def epoch() -> int:
        model.train()
        freeze_frozen_modules(model)  # the same computation: frozen groups run in eval mode
        seen = 0
        for i in range(0, len(y_all), bs):
            x = ((x_all[i:i + bs].float() / 255.0 - mean) / std).contiguous(memory_format=mf)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=trial.amp):
                loss = F.cross_entropy(model(x).float(), y_all[i:i + bs])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(x)
        return seen

    def timed() -> float:
        if trial.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        seen = epoch()
        if trial.device.type == "cuda":
            torch.cuda.synchronize()
        return seen / (time.perf_counter() - start)

    timed()  # warm-up (allocator, cudnn autotune)
    return timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="timm:tf_efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=5, help="timed epochs of each loop, interleaved (after a warm-up)")
    ap.add_argument("--unfreeze-last", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()

    trial = FineTuneTrial(config(args))
    trial.train_one_epoch()  # warm-up
    bare_epoch = bare_loop(trial)
    ours, bares = [], []
    for _ in range(args.epochs):  # interleaved, so drift in machine load hits both alike
        ours.append(trial.train_one_epoch()["images_per_s"])
        bares.append(bare_epoch())
    tl, bare = statistics.median(ours), statistics.median(bares)
    dev = torch.cuda.get_device_name() if trial.device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"model {args.model}, {args.image_size} px, batch {args.batch_size}, {len(trial.data.train)} images, "
          f"unfreeze_last {args.unfreeze_last}, device {dev}, amp {trial.amp}, channels_last {trial.channels_last}")
    print(f"{'loop':<24}{'images/s (median of ' + str(args.epochs) + ' epochs)':>34}")
    print(f"{'bare PyTorch':<24}{bare:>34.1f}")
    print(f"{'tl-sweep trainable':<24}{tl:>34.1f}")
    print(f"{'ratio (trainable/bare)':<24}{tl / bare:>34.3f}")


if __name__ == "__main__":
    main()
