"""JPEG decoding in the training process, a batch at a time, on the trial's device.

Without the decoded-image cache every epoch decodes every file. On a GPU the DataLoader's
workers then only read the files' bytes; the batch is decoded by nvJPEG
(``torchvision.io.decode_jpeg(..., device="cuda")``), resized there to the input size (shorter
side, centre crop, as trainables/data/images.py does with PIL) and augmented there
(transforms.BatchAugment). ``data.decode: device`` does the same on the CPU (libjpeg-turbo, in
the training process): how the path is tested without a GPU.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List

import torch
from torch.utils.data import Dataset, default_collate

from trainables.data.loaders import FinishedHere, on_device
from trainables.data.sets import DataError

JPEG_SUFFIXES = (".jpg", ".jpeg")


def decodable(images, mode: str, device: torch.device) -> bool:
    """Whether ``images`` are decoded on ``device`` under ``data.decode: mode``: read from
    JPEG files (not from the cache), and ``device`` asked for, or ``auto`` on CUDA."""
    if mode == "workers" or getattr(images, "in_memory", False):
        return False
    files = images.files()
    if not files or not all(str(f).lower().endswith(JPEG_SUFFIXES) for f in files):
        return False
    return mode == "device" or device.type == "cuda"


class EncodedView(Dataset):
    """``images`` as the files' bytes (a uint8 tensor each), their targets and indices; read with
    plain indices, or with ``(index, seed)`` keys (the seed goes with the batch, for BatchAugment)."""

    def __init__(self, images, seeded: bool):
        self.images, self.seeded = images, seeded
        self.paths = images.files()
        self.targets = getattr(images, "targets", None)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key):
        i, seed = key if self.seeded else (key, 0)
        return read_bytes(self.paths[i]), self.images.target(i), i, seed


def read_bytes(path) -> torch.Tensor:
    """A file's bytes as a uint8 tensor in ordinary memory (torchvision's read_file maps the
    file, and a DataLoader worker cannot send such a tensor to the training process)."""
    return torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)


def collate_encoded(batch: List[tuple]):
    """The files' bytes stay a list (their lengths differ); targets, indices, seeds are collated."""
    return ([b[0] for b in batch], *default_collate([b[1:] for b in batch]))


def decode_batch(data: List[torch.Tensor], paths: List[Any], size: int, device: torch.device) -> torch.Tensor:
    """The JPEGs ``data`` (read from ``paths``) decoded on ``device`` as RGB, each resized to
    ``size`` x ``size``: a (B, 3, size, size) uint8 tensor. A file that does not decode raises
    naming it."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from trainables.data.images import square_resize

    try:
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        for one, path in zip(data, paths):  # find the file to name
            try:
                decode_jpeg(one, mode=ImageReadMode.RGB, device=device)
            except RuntimeError as e:
                raise DataError(f"cannot read image {path}: {e}. Remove or replace the file and run again "
                                "(or set data.decode: workers)") from e
        raise
    return torch.stack([square_resize(im, size) for im in images])


class DeviceDecoded(FinishedHere):
    """A loader of an EncodedView whose batches leave decoded, resized and (with ``augment``)
    augmented on ``device``; its workers only read files."""

    def __init__(self, loader, size: int, device: torch.device, augment=None):
        super().__init__(loader, device, augment)
        self.size = size

    def __iter__(self):
        paths = self.loader.dataset.paths
        for data, y, index, seeds in self.loader:
            x = decode_batch(data, [paths[i] for i in index.tolist()], self.size, self.device)
            if self.augment is not None:
                x = on_device(self.augment, x, seeds.tolist(), self.device)
            yield x, y
