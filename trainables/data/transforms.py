"""Training-time augmentation of single images (torchvision.transforms.v2, uint8 CHW tensors).

Per image, at ``image_size``, training split only: horizontal flip, small rotations and scale
jitter (one RandomAffine), random resized crop, TrivialAugment, random erasing. The weak and
strong views of semi-supervised learning are here too. Batch mixing (CutMix / MixUp) works on
whole batches: trainables/mixing.py.

Where it runs: ``BatchAugment`` applies the same steps to a whole batch in the training process,
on the trial's device (its GPU when it has one), each image's parameters drawn by the step
itself under the image's seed, as a DataLoader worker would; so the DataLoader only reads
uint8 images. TrivialAugment (an op chosen inside the transform) and key points (moved with the
pixels) stay per image in the workers.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

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


# The steps BatchAugment applies: those whose random draws v2 exposes as ``make_params``.
BATCHED_STEPS = ("RandomResizedCrop", "RandomHorizontalFlip", "RandomAffine", "RandomErasing")


class BatchAugment:
    """``transform``'s steps applied to a batch on its device. Image k's parameters are drawn
    on the CPU, under ``seeds[k]`` and in the order the v2 Compose draws them (the random
    apply's coin, then the step's ``make_params``), so on the CPU a batch comes out exactly as
    the per-image transform would make it; on CUDA the same kernels run on float pixels."""

    def __init__(self, transform):
        self.steps = list(transform.transforms)

    @classmethod
    def of(cls, transform) -> Optional["BatchAugment"]:
        """A BatchAugment of ``transform`` when every step of it can run batched, else None."""
        from torchvision.transforms import v2

        if not isinstance(transform, v2.Compose):
            return None
        if not all(type(s).__name__ in BATCHED_STEPS for s in transform.transforms):
            return None
        return cls(transform)

    def plan(self, image, seed: int) -> List[tuple]:
        """The (step, params) an image of ``image``'s shape gets under ``seed`` (None: skipped)."""
        import torch
        from torchvision.transforms.v2._transform import _RandomApplyTransform

        out = []
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            for step in self.steps:
                if isinstance(step, _RandomApplyTransform) and torch.rand(1) >= step.p:
                    out.append((step, None))
                    continue
                out.append((step, step.make_params([image])))
        return out

    def __call__(self, x, seeds: Sequence[int]):
        """``x`` (B, C, H, W) on any device, uint8 or float in 0..255; one seed per image."""
        import torch

        probe = x[0].new_empty(x.shape[1:], device="meta")  # make_params reads the shape only
        out = []
        for image, seed in zip(x, seeds):
            for step, params in self.plan(probe, int(seed)):
                if params is None:
                    continue
                if torch.is_tensor(params.get("v")):  # random erasing's fill value
                    params = dict(params, v=params["v"].to(image.device))
                image = step.transform(image, params)
            out.append(image)
        return torch.stack(out)
