"""Semi-supervised use of the unlabelled training images (``semi.method``).

- ``pseudo_label`` (Lee 2013): the model's confident predictions on weakly augmented
  unlabelled images become their labels.
- ``fixmatch`` (Sohn et al. 2020): a confident prediction on a weak view is the label of a
  strongly augmented view of the same image.

Only predictions with confidence >= ``threshold`` count; the unlabelled loss is weighted by
``unlabeled_weight`` and ``unlabeled_ratio`` unlabelled images are drawn per labelled one.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from trainables.data import ImageSet

METHODS = ("none", "pseudo_label", "fixmatch")


def weak_transform(size: int):
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomHorizontalFlip(), v2.RandomAffine(degrees=0, translate=(0.125, 0.125))])


def strong_transform(size: int):
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomHorizontalFlip(), v2.RandomAffine(degrees=0, translate=(0.125, 0.125)),
                       v2.TrivialAugmentWide(), v2.RandomErasing(p=1.0, scale=(0.02, 0.2), value=0)])


class Views(ImageSet):
    """Unlabelled images as (weak view, strong view), or the weak view alone when no strong
    view is asked for; labels are dropped."""

    def __init__(self, base: ImageSet, size: int, strong: bool):
        self.base, self.targets = base, base.targets
        self.weak, self.strong = weak_transform(size), strong_transform(size) if strong else None

    def __getitem__(self, i: int):
        x, _ = self.base[i]
        if self.strong is None:
            return self.weak(x)
        return self.weak(x), self.strong(x)


def unlabeled_loss(model, weak: torch.Tensor, strong: Optional[torch.Tensor], method: str, threshold: float,
                   autocast) -> Tuple[torch.Tensor, torch.Tensor]:
    """The masked pseudo-label loss and the fraction of unlabelled images above the threshold
    (``strong`` is used by fixmatch only)."""
    if method == "fixmatch":
        with torch.no_grad(), autocast():
            probs = model(weak).float().softmax(1)
        with autocast():
            logits = model(strong).float()
    elif method == "pseudo_label":
        with autocast():
            logits = model(weak).float()
        probs = logits.detach().softmax(1)
    else:
        raise ValueError(f"semi.method must be one of {', '.join(METHODS)}, got {method!r}")
    conf, pseudo = probs.max(1)
    mask = (conf >= threshold).float()
    loss = (F.cross_entropy(logits, pseudo, reduction="none") * mask).mean()
    return loss, mask.mean()
