"""Training-time augmentation (torchvision.transforms.v2) and batch mixing (CutMix / MixUp).

Per image, on the uint8 CHW tensor at ``image_size`` (training split only): horizontal flip,
small rotations and scale jitter (one RandomAffine), random resized crop, TrivialAugment,
random erasing. Per batch, after normalisation: CutMix and / or MixUp, which turn the labels
into soft targets (each row sums to 1) that the loss takes as class probabilities.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from trainables.data import ImageSet


def build_train_transform(cfg: dict) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """The per-image transform from the ``data`` config, or None when nothing is on."""
    from torchvision.transforms import v2

    size = int(cfg["image_size"])
    steps = []
    if float(cfg.get("crop_scale_min", 1.0)) < 1.0:
        steps.append(v2.RandomResizedCrop(size, scale=(float(cfg["crop_scale_min"]), 1.0), antialias=True))
    if cfg.get("hflip"):
        steps.append(v2.RandomHorizontalFlip())
    rot, jitter = float(cfg.get("rotation", 0.0)), float(cfg.get("scale_jitter", 0.0))
    if rot or jitter:
        steps.append(v2.RandomAffine(degrees=rot, scale=(1.0 - jitter, 1.0 + jitter) if jitter else None))
    if cfg.get("trivial_augment"):
        steps.append(v2.TrivialAugmentWide())
    if float(cfg.get("random_erasing", 0.0)) > 0:
        steps.append(v2.RandomErasing(p=float(cfg["random_erasing"]), value=0))
    return v2.Compose(steps) if steps else None


class Augmented(ImageSet):
    """A training split seen through a per-image transform."""

    def __init__(self, base: ImageSet, transform: Callable[[torch.Tensor], torch.Tensor]):
        self.base, self.transform, self.targets = base, transform, base.targets

    def __getitem__(self, i: int):
        x, y = self.base[i]
        return self.transform(x), y


class BatchMix:
    """CutMix and / or MixUp on a normalised batch, applied with probability ``prob``.

    Returns the mixed images and soft targets (N x classes, rows summing to 1)."""

    def __init__(self, num_classes: int, cutmix_alpha: float, mixup_alpha: float, prob: float):
        from torchvision.transforms import v2

        mixes = []
        if cutmix_alpha > 0:
            mixes.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        if mixup_alpha > 0:
            mixes.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        self.mix = v2.RandomChoice(mixes) if len(mixes) > 1 else (mixes[0] if mixes else None)
        self.num_classes, self.prob = num_classes, prob

    @property
    def active(self) -> bool:
        return self.mix is not None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.mix is None or torch.rand(()) >= self.prob:
            return x, torch.nn.functional.one_hot(y, self.num_classes).float()
        return self.mix(x, y)


def class_weights(counts: torch.Tensor, kind: str, beta: float = 0.999) -> Optional[torch.Tensor]:
    """Loss weights per class from training counts: ``inverse`` frequency (N / (C n_c)) or the
    ``effective`` number of samples (Cui et al. 2019: (1 - beta) / (1 - beta^n_c)), both scaled to
    average 1; None for ``none``."""
    counts = counts.float().clamp(min=1)
    if kind == "none":
        return None
    if kind == "inverse":
        w = counts.sum() / (len(counts) * counts)
    elif kind == "effective":
        w = (1.0 - beta) / (1.0 - beta ** counts)
    else:
        raise ValueError(f"train.class_weighting must be none, inverse or effective, got {kind!r}")
    return w * len(w) / w.sum()
