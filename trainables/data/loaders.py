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
    views) runs under that seed, and the caller's random state is left as it was."""

    def __init__(self, base: Dataset, transform: Optional[Callable[[torch.Tensor], Any]] = None):
        self.base, self.transform = base, transform
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
        return x, y


def workers(cfg: TrialConfig) -> int:
    """DataLoader workers of a trial: ``data.num_workers``, else one per CPU of the trial
    beyond the one that trains."""
    if cfg.data.num_workers is not None:
        return cfg.data.num_workers
    return max(0, int(cfg.resources.cpu) - 1)


def seeded_loader(data: Dataset, transform, batch_size: int, generator: torch.Generator, num_workers: int,
                  pin_memory: bool, weights: Optional[torch.Tensor] = None) -> DataLoader:
    """A training loader: seeded order and transforms, persistent workers."""
    return DataLoader(
        SeededView(data, transform), batch_size=batch_size,
        sampler=EpochSampler(len(data), generator, weights),
        num_workers=num_workers, persistent_workers=num_workers > 0, pin_memory=pin_memory,
        # the workers' own base seed is not used (every transform runs under its image's seed):
        # a generator of its own keeps the loader from drawing on the global RNG
        generator=torch.Generator().manual_seed(0),
    )


def eval_loader(data: Dataset, batch_size: int, num_workers: int, pin_memory: bool) -> DataLoader:
    # a generator of its own: an evaluation draws nothing from the trial's RNG
    return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
                      generator=torch.Generator())
