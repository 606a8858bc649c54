"""What the supervised loss sees: CutMix / MixUp soft targets, and class weights for imbalance."""
from __future__ import annotations

from typing import Optional, Tuple, get_args

import torch

from trainables.config import ClassWeighting


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
        raise ValueError(f"train.class_weighting must be one of {', '.join(get_args(ClassWeighting))}, got {kind!r}")
    return w * len(w) / w.sum()
