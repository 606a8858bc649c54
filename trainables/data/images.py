"""Image sets: indexable uint8 CHW images at ``image_size`` (square) plus integer targets.

Normalisation with the backbone's own mean/std happens on the device, per batch, in the loop.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from trainables.data.sets import DataError


class ImageSet(Dataset):
    """Indexable images + integer targets; ``subset`` keeps a view by index."""

    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, indices: Sequence[int]) -> "ImageSet":
        return Subset(self, np.asarray(indices, dtype=np.int64))

    def files(self) -> Optional[List[Path]]:
        """The image files, in order, when the set is read from files (else None)."""
        return None

    def relabel(self, mapping: np.ndarray) -> "ImageSet":
        """The same images with target ``t`` read as ``mapping[t]`` (data.classes)."""
        return Relabelled(self, np.asarray(mapping, dtype=np.int64))

    def table(self):
        """The rows of a table data set that go with the images, in order (a
        ``trainables.data.table.Table``: the targets of trainables/tasks.py), else None."""
        return None

    def target(self, i: int):
        """Item ``i``'s target without reading its image."""
        return int(self.targets[i])

    @property
    def in_memory(self) -> bool:
        """Reading an image is a copy (in memory, or memory-mapped from the decoded-image
        cache): no decoding, no resizing, so no DataLoader worker is needed to read it."""
        return False


class Derived(ImageSet):
    """An image set made from ``base`` (other targets, a subset): its files, rows and reads are
    the base's unless it says otherwise."""

    base: ImageSet

    def files(self) -> Optional[List[Path]]:
        return self.base.files()

    def table(self):
        return self.base.table()

    @property
    def in_memory(self) -> bool:
        return self.base.in_memory


class Relabelled(Derived):
    def __init__(self, base: ImageSet, mapping: np.ndarray):
        self.base, self.mapping = base, mapping
        self.targets = mapping[base.targets]

    def __getitem__(self, i: int):
        image, target = self.base[i]
        return image, int(self.mapping[target])


class Subset(Derived):
    def __init__(self, base: ImageSet, indices: np.ndarray):
        self.base, self.indices = base, indices
        self.targets = base.targets[indices]

    def __getitem__(self, i: int):
        return self.base[int(self.indices[i])]

    def target(self, i: int):
        return self.base.target(int(self.indices[i]))

    def subset(self, indices: Sequence[int]) -> "ImageSet":
        # Compose onto the source, so ``indices`` always count in the original data set.
        return Subset(self.base, self.indices[np.asarray(indices, dtype=np.int64)])

    def files(self) -> Optional[List[Path]]:
        base = self.base.files()
        return None if base is None else [base[i] for i in self.indices]

    def table(self):
        base = self.base.table()
        return None if base is None else base.take(self.indices)


def square_resize(img: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` and centre-crop to ``size`` x ``size`` (uint8 CHW)."""
    from torchvision.transforms.v2 import functional as F

    if img.shape[-2:] != (size, size):
        img = F.resize(img, [size], antialias=True)
        img = F.center_crop(img, [size, size])
    return img


# In-memory sets whose resized copy fits in this many bytes are resized once, not every epoch.
RESIZE_CACHE_BYTES = 512 * 2**20


class TensorImageSet(ImageSet):
    """In-memory images (N, C, H, W) uint8; resized once when small enough, else per item."""

    def __init__(self, images, targets: np.ndarray, image_size: int):
        images = torch.as_tensor(images)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        self.images, self.targets, self.image_size = images, np.asarray(targets), image_size
        self._resized: Optional[torch.Tensor] = None
        if images.shape[-2:] != (image_size, image_size) and len(images) * 3 * image_size**2 <= RESIZE_CACHE_BYTES:
            self._resized = torch.stack([square_resize(im, image_size) for im in images])

    def __getitem__(self, i: int):
        if self._resized is not None:
            return self._resized[i], int(self.targets[i])
        return square_resize(self.images[i], self.image_size), int(self.targets[i])

    @property
    def in_memory(self) -> bool:
        return self._resized is not None or self.images.shape[-2:] == (self.image_size, self.image_size)


class FileImageSet(ImageSet):
    """Images on disk, decoded with PIL; an unreadable file raises naming the file."""

    def __init__(self, paths: Sequence[Path], targets: Sequence[int], image_size: int):
        self.paths, self.targets, self.image_size = list(paths), np.asarray(targets), image_size

    def files(self) -> Optional[List[Path]]:
        return self.paths

    def __getitem__(self, i: int):
        from PIL import Image
        from torchvision.transforms.v2 import functional as F

        path = self.paths[i]
        try:
            with Image.open(path) as im:
                img = F.pil_to_tensor(im.convert("RGB"))
        except Exception as e:  # PIL raises several types for truncated / non-image files
            raise DataError(
                f"cannot read image {path}: {type(e).__name__}: {e}. "
                "Remove or replace the file and run again."
            ) from e
        return square_resize(img, self.image_size), int(self.targets[i])


class TableImageSet(ImageSet):
    """The images of a table data set with their rows (``table()``, trainables/data/table.py);
    the integer targets are the label column's classes (they stratify the splits), else 0."""

    def __init__(self, images: ImageSet, table, targets: np.ndarray):
        self.images, self._table, self.targets = images, table, np.asarray(targets)

    def __getitem__(self, i: int):
        return self.images[i][0], int(self.targets[i])

    def files(self) -> Optional[List[Path]]:
        return self.images.files()

    def table(self):
        return self._table

    @property
    def in_memory(self) -> bool:
        return self.images.in_memory
