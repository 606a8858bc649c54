"""Training-time augmentation of single images (torchvision.transforms.v2, uint8 CHW tensors).

Per image, at ``image_size``, training split only: horizontal flip, small rotations and scale
jitter (one RandomAffine), random resized crop, TrivialAugment, random erasing. The weak and
strong views of semi-supervised learning are here too. Batch mixing (CutMix / MixUp) works on
whole batches: trainables/mixing.py.
"""
from __future__ import annotations

from typing import Callable, Optional

from trainables.config import AugmentConfig

Transform = Callable[["torch.Tensor"], "torch.Tensor"]  # noqa: F821


def train_transform(aug: AugmentConfig, size: int) -> Optional[Transform]:
    """The per-image transform the ``augment`` section asks for, or None when nothing is on."""
    from torchvision.transforms import v2

    steps = []
    if aug.crop_scale_min < 1.0:
        steps.append(v2.RandomResizedCrop(size, scale=(aug.crop_scale_min, 1.0), antialias=True))
    if aug.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if aug.rotation or aug.scale_jitter:
        jitter = aug.scale_jitter
        steps.append(v2.RandomAffine(degrees=aug.rotation, scale=(1.0 - jitter, 1.0 + jitter) if jitter else None))
    if aug.trivial_augment:
        steps.append(v2.TrivialAugmentWide())
    if aug.random_erasing > 0:
        steps.append(v2.RandomErasing(p=aug.random_erasing, value=0))
    return v2.Compose(steps) if steps else None


def weak_transform(size: int) -> Transform:
    """FixMatch's weak view: flip and translate by up to 12.5%."""
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomHorizontalFlip(), v2.RandomAffine(degrees=0, translate=(0.125, 0.125))])


def strong_transform(size: int) -> Transform:
    """FixMatch's strong view: the weak view, then TrivialAugment and a cut-out."""
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomHorizontalFlip(), v2.RandomAffine(degrees=0, translate=(0.125, 0.125)),
                       v2.TrivialAugmentWide(), v2.RandomErasing(p=1.0, scale=(0.02, 0.2), value=0)])
