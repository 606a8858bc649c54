"""A node's cache of decoded, resized images, shared by its trials.

A sweep is many trials over the same files: the first trial that needs a split of a data set at
an input size decodes and resizes each image once into one uint8 array on the node's disk;
every later trial (and epoch) memory-maps it. The array is keyed by the size and a fingerprint
of the files (paths, sizes, modification times); it is written under a temporary name and
renamed when complete, under a file lock, so trials started together neither decode twice nor
read a half-written array. ``data.cache: auto`` (the default) caches when the array fits the
disk budget; ``off`` decodes every epoch.

    TL_SWEEP_CACHE          the cache folder (default ~/.cache/tl-sweep)
    TL_SWEEP_CACHE_GB       the most disk it may take (default: half the free space)
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from trainables.data.images import ImageSet

VERSION = 1  # of the layout: a change makes new keys


def cache_root() -> Path:
    return Path(os.environ.get("TL_SWEEP_CACHE", "~/.cache/tl-sweep")).expanduser() / "images"


def budget_bytes(folder: Path) -> int:
    if os.environ.get("TL_SWEEP_CACHE_GB"):
        return int(float(os.environ["TL_SWEEP_CACHE_GB"]) * 2**30)
    folder.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(folder).free // 2


def fingerprint(files: Sequence[Path], size: int) -> str:
    """Of the files as they are now: a changed, added or removed file makes a new key."""
    h = hashlib.sha256(f"v{VERSION} size={size} n={len(files)}".encode())
    for f in files:
        st = os.stat(f)
        h.update(f"\0{f}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


class CachedImageSet(ImageSet):
    """Images read from a cached uint8 array (memory-mapped: trials on a node share its pages);
    the targets are the pool's own (the same files may be read with other labels)."""

    def __init__(self, folder: Path, targets: np.ndarray, table=None):
        meta = json.loads((folder / "meta.json").read_text())
        self.folder = folder
        self.targets = np.asarray(targets)
        self._table = table  # a table data set's rows (ImageSet.table)
        self.shape = tuple(meta["shape"])
        self._images: Optional[np.memmap] = None  # opened in each process that reads it

    @property
    def images(self) -> np.memmap:
        if self._images is None:
            self._images = np.memmap(self.folder / "images.u8", dtype=np.uint8, mode="r", shape=self.shape)
        return self._images

    def __getstate__(self):  # DataLoader workers map the file again
        return {k: v for k, v in self.__dict__.items() if k != "_images"} | {"_images": None}

    def __getitem__(self, i: int):
        return torch.from_numpy(np.array(self.images[i])), int(self.targets[i])

    def table(self):
        return self._table

    @property
    def in_memory(self) -> bool:
        return True


def cached(pool: ImageSet, size: int, mode: str = "auto", workers: int = 0) -> ImageSet:
    """``pool`` read from the node's cache (filled on first use), or ``pool`` itself when it is
    not read from files, when ``mode`` is off, or when it does not fit the disk budget."""
    files = pool.files() if mode != "off" else None
    if not files:
        return pool
    root = cache_root()
    key = fingerprint(files, size)
    folder = root / key
    if (folder / "complete").exists():
        return CachedImageSet(folder, pool.targets, pool.table())
    need = len(files) * 3 * size * size
    if need > budget_bytes(root):
        return pool
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one writer; the others wait, then read what it wrote
        if not (folder / "complete").exists():
            _fill(pool, folder, (len(files), 3, size, size), workers)
    return CachedImageSet(folder, pool.targets, pool.table())


def _fill(pool: ImageSet, folder: Path, shape, workers: int) -> None:
    """Decode every image once, in order, into a temporary folder; rename it when complete."""
    from torch.utils.data import DataLoader

    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    images = np.memmap(tmp / "images.u8", dtype=np.uint8, mode="w+", shape=shape)
    start = 0
    # a generator of its own: filling the cache draws nothing from the trial's RNG
    loader = DataLoader(pool, batch_size=64, shuffle=False, num_workers=workers, generator=torch.Generator())
    for x, _ in loader:
        images[start : start + len(x)] = x.numpy()
        start += len(x)
    images.flush()
    del images
    (tmp / "meta.json").write_text(json.dumps({"shape": list(shape), "version": VERSION}))
    (tmp / "complete").touch()
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
