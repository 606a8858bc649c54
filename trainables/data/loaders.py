"""The DataLoaders of a trial, built so that a resumed trial sees exactly the batches an
uninterrupted one would, whatever the number of workers.

Each epoch a sampler draws, from a generator the trial checkpoints, the order of the images and
one seed per image; a worker runs an image's random transform under that image's seed. The
batches depend on the generator alone: not on which worker read an image, not on whether
workers persisted across epochs, not on a restart.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from trainables.config import TrialConfig

SEED_HIGH = 2**62


class EpochSampler(Sampler):
    """Yields ``(index, seed)``: a permutation of the data set, or, with ``weights``, draws
    with replacement in proportion to them (over-sampling); a fresh seed per draw."""

    def __init__(self, n: int, generator: torch.Generator, weights: Optional[torch.Tensor] = None):
        self.n, self.generator, self.weights = n, generator, weights

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        g = self.generator
        if self.weights is None:
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        seeds = torch.randint(0, SEED_HIGH, (self.n,), generator=g)
        return iter(zip(order.tolist(), seeds.tolist()))


class SeededView(Dataset):
    """A data set read with ``(index, seed)`` keys; ``transform`` (which may return several
    views) runs under that seed, and the caller's random state is left as it was. With
    ``with_seed`` an item is ``(image, target, seed)``: the seed goes with the batch to a
    BatchAugment in the training process."""

    def __init__(self, base: Dataset, transform: Optional[Callable[[torch.Tensor], Any]] = None,
                 with_seed: bool = False):
        self.base, self.transform, self.with_seed = base, transform, with_seed
        self.targets = getattr(base, "targets", None)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: Tuple[int, int]):
        i, seed = key
        x, y = self.base[i]
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(seed)
                if getattr(self.transform, "with_target", False):  # key points move with the pixels (tasks.py)
                    x, y = self.transform(x, y)
                else:
                    x = self.transform(x)
        return (x, y, seed) if self.with_seed else (x, y)


class FinishedHere:
    """A DataLoader whose batches the training process finishes (on the trial's device) before
    the loop gets them; the loader's sampler, dataset, workers and length show through."""

    def __init__(self, loader: DataLoader, device: torch.device, augment=None):
        self.loader, self.device, self.augment = loader, device, augment

    @property
    def sampler(self):
        return self.loader.sampler

    @property
    def dataset(self):
        return self.loader.dataset

    @property
    def num_workers(self) -> int:
        return self.loader.num_workers

    def __len__(self) -> int:
        return len(self.loader)


class DeviceAugmented(FinishedHere):
    """A training loader whose batches are augmented in the training process, on ``device``
    (a BatchAugment): the DataLoader (and its workers, if any) only reads uint8 images. On
    CUDA the pixels become float there, once, before the augmentation."""

    def __iter__(self):
        for x, y, seeds in self.loader:
            yield on_device(self.augment, x, seeds.tolist(), self.device), y


def on_device(augment, x: torch.Tensor, seeds, device: torch.device) -> torch.Tensor:
    """``augment`` of the uint8 batch ``x`` on ``device`` (float pixels on CUDA)."""
    x = x.to(device, non_blocking=True)
    if device.type == "cuda":
        x = x.float()
    return augment(x, seeds)


def workers(cfg: TrialConfig) -> int:
    """DataLoader workers of a trial: ``data.num_workers``, else one per CPU of the trial
    beyond the one that trains."""
    if cfg.data.num_workers is not None:
        return cfg.data.num_workers
    return max(0, int(cfg.resources.cpu) - 1)


def read_workers(data: Dataset, num_workers: int, per_image: bool = False) -> int:
    """Workers a loader of ``data`` needs: ``num_workers`` when they decode files or run a
    per-image transform; none when the images are in memory or in the decoded-image cache,
    where reading one is a copy and a worker would only add another (through shared memory)."""
    in_memory = getattr(data, "in_memory", False)
    return num_workers if per_image or not in_memory else 0


def seeded_loader(data: Dataset, transform, batch_size: int, generator: torch.Generator, num_workers: int,
                  pin_memory: bool, weights: Optional[torch.Tensor] = None, augment=None,
                  device: Optional[torch.device] = None, decode_size: Optional[int] = None):
    """A training loader: seeded order and transforms, persistent workers. With ``augment``
    (a BatchAugment) the batches are augmented on ``device`` instead of per image in workers;
    with ``decode_size`` the workers read JPEG bytes, decoded and resized on ``device``
    (trainables/data/decode.py)."""
    device = device or torch.device("cpu")
    sampler = EpochSampler(len(data), generator, weights)
    if decode_size:
        from trainables.data.decode import DeviceDecoded, EncodedView, collate_encoded

        loader = _loader(EncodedView(data, seeded=True), sampler, batch_size, num_workers, pin_memory, collate_encoded)
        return DeviceDecoded(loader, decode_size, device, augment)
    if augment is not None:
        loader = _loader(SeededView(data, None, with_seed=True), sampler, batch_size, num_workers, pin_memory)
        return DeviceAugmented(loader, device, augment)
    return _loader(SeededView(data, transform), sampler, batch_size, num_workers, pin_memory)


def _loader(view: Dataset, sampler: Sampler, batch_size: int, num_workers: int, pin_memory: bool, collate=None):
    return DataLoader(
        view, batch_size=batch_size, sampler=sampler, collate_fn=collate,
        num_workers=num_workers, persistent_workers=num_workers > 0, pin_memory=pin_memory,
        # the workers' own base seed is not used (every transform runs under its image's seed):
        # a generator of its own keeps the loader from drawing on the global RNG
        generator=torch.Generator().manual_seed(0),
    )


def eval_loader(data: Dataset, batch_size: int, num_workers: int, pin_memory: bool,
                device: Optional[torch.device] = None, decode_size: Optional[int] = None):
    """An evaluation loader, in order; with ``decode_size`` JPEGs decoded on ``device``."""
    # a generator of its own: an evaluation draws nothing from the trial's RNG
    if decode_size:
        from trainables.data.decode import DeviceDecoded, EncodedView, collate_encoded

        loader = DataLoader(EncodedView(data, seeded=False), batch_size=batch_size, shuffle=False,
                            num_workers=num_workers, pin_memory=pin_memory, collate_fn=collate_encoded,
                            generator=torch.Generator())
        return DeviceDecoded(loader, decode_size, device or torch.device("cpu"))
    return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
                      generator=torch.Generator())
