"""A trial's training input, three ways, images/s side by side: what its train loader hands the
step (augmented, normalised batches on the device) when the images come

- from the node's decoded-image cache (read in the training process, augmented there a batch at
  a time: on the GPU when there is one),
- from the JPEGs, decoded with PIL in DataLoader workers (``data.decode: workers``),
- from the JPEGs, decoded in the training process on the device (``data.decode: device``:
  nvJPEG on CUDA, libjpeg-turbo on the CPU), then augmented there.

Random resized crop + flip; Pets-like photo-sized JPEGs (about 450 x 380) made here. Then, with
``--train``, the whole training step (ResNet-50 by default) fed from the cache.

    python benchmarks/input_pipeline.py --device cuda --workers 8 --images 2000 --train
    python benchmarks/input_pipeline.py --device cpu --workers 1 --images 200 --image-size 224
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def rate(trial, epochs: int, sync) -> float:
    loader = trial.loaders["train"]

    def epoch():
        n = 0
        for x, _ in loader:
            n += len(trial.inputs(x))
        sync()
        return n

    epoch()  # workers started, cache pages and kernels warm
    t = time.perf_counter()
    n = sum(epoch() for _ in range(epochs))
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train", action="store_true", help="also the whole training step, fed from the cache")
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--unfreeze-last", type=int, default=4, help="layer groups that train (resnet: 4 = all)")
    args = ap.parse_args()

    import torch

    from speed import jpeg_folder
    from trainables.trainable import FineTuneTrial

    work = Path(tempfile.mkdtemp(prefix="tl-sweep-input-"))
    os.environ["TL_SWEEP_CACHE"] = str(work / "cache")
    root = jpeg_folder(work / "jpegs", per_class=args.images // 4)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    data = {"name": "image_folder", "root": str(root), "image_size": args.image_size, "val_fraction": 0.05,
            "test_fraction": 0.05, "num_workers": args.workers}
    base = {"data": data, "model": {"name": "resnet18", "weights": "none"},
            "train": {"batch_size": args.batch_size, "device": args.device},
            "augment": {"hflip": True, "crop_scale_min": 0.35}, "resources": {"cpu": args.workers + 1}}
    out = {}
    for name, cache, decode in (("cache", "auto", "workers"), ("pil_workers", "off", "workers"),
                                ("decode_on_device", "off", "device")):
        cfg = json.loads(json.dumps(base))
        cfg["data"].update(cache=cache, decode=decode)
        trial = FineTuneTrial(cfg)
        out[name] = rate(trial, args.epochs, sync)
        print(f"{name:18} {out[name]:9.1f} img/s  (loader workers: {trial.loaders['train'].num_workers})", flush=True)
    if args.train:
        cfg = json.loads(json.dumps(base))
        cfg["model"] = {"name": args.model, "weights": "none"}
        cfg["strategy"] = {"name": "unfreeze_last", "unfreeze_last": args.unfreeze_last}
        cfg["train"].update(epochs=args.epochs + 1)
        trial = FineTuneTrial(cfg)
        trial.train_one_epoch()  # warm-up
        per_epoch = [trial.train_one_epoch()["images_per_s"] for _ in range(args.epochs)]
        out["train_step"] = max(per_epoch)
        print(f"{'train step':18} {out['train_step']:9.1f} img/s  ({args.model}, {args.image_size} px, "
              f"amp={trial.amp}, channels_last={trial.channels_last}, from the cache)", flush=True)
    print(json.dumps({k: round(v, 1) for k, v in out.items()}))


if __name__ == "__main__":
    main()
