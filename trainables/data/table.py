"""Table data sets: images with a row of values each (the targets of several tasks).

- ``table``: a CSV or Parquet file, one row per image: an image path (relative to ``data.root``,
  default the file's folder) and target columns, e.g. UTKFace-style ``file, age, gender, race``
  or a facial key-point file ``image, 0, 1, ..., 135`` (68 points, x and y interleaved, pixels);
- ``synthetic_faces``: drawn faces with known targets, generated in memory from ``data.seed``
  (offline: the ``# Try offline:`` lines of search_spaces/multitask.yaml and keypoints.yaml).

The rows go with the images as a ``Table`` (``ImageSet.table()``); the tasks of a trial
(trainables/tasks.py) read their columns from it and encode them. ``data.label_column`` names a
class column that stratifies the splits and, without a ``targets`` section, is the trial's one
classification task. No torch here: spec validation imports this module.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

import numpy as np
from pydantic import Field

from trainables.config import DataConfig
from trainables.data.sets import DATASETS, DataError, Source


class TableConfig(DataConfig):
    has_columns: ClassVar[bool] = True  # targets may name its columns
    file: str  # a CSV (.csv, .tsv) or Parquet (.parquet) file, one row per image
    root: Optional[str] = None  # image paths are relative to it; default: the file's folder
    image_column: Optional[str] = None  # default: the file's first column
    label_column: Optional[str] = None  # a class column: stratifies the splits; the one task without targets


class SyntheticFacesConfig(DataConfig):
    has_columns: ClassVar[bool] = True
    images: int = Field(1000, ge=20, le=200_000)  # how many faces are drawn
    label_column: Optional[str] = None  # as table's: gender or race


TABLE_LAYOUT = """  a CSV or Parquet file, one row per image, with a header:
    file,age,gender,race                       (UTKFace-style labels)
    images/1_0_0_2017.jpg,1,0,0
  or  image,0,1,2,...,135                     (68 key points: x0, y0, x1, y1, ... in pixels)
  image paths relative to data.root (default: the file's folder), or absolute"""


class Table:
    """Rows of values, one per image: numbers as float64 (NaN when missing), text as str
    (None when missing); ``take`` selects rows (subsets share the columns). ``sizes()`` gives
    each image's original (width, height): key points in pixels are read against it."""

    def __init__(self, columns: Dict[str, np.ndarray], source: str, sizes: Any = None,
                 index: Optional[np.ndarray] = None, _shared: Optional[Dict[str, Any]] = None):
        self.columns, self.source = columns, source
        n = len(next(iter(columns.values()))) if columns else 0
        self.index = np.arange(n) if index is None else np.asarray(index, dtype=np.int64)
        # sizes: an (N, 2) array, or a list of image files whose headers are read when first asked
        self._shared = _shared if _shared is not None else {"sizes": sizes}

    def __len__(self) -> int:
        return len(self.index)

    @property
    def names(self) -> List[str]:
        return list(self.columns)

    def take(self, indices: Sequence[int]) -> "Table":
        return Table(self.columns, self.source, index=self.index[np.asarray(indices, dtype=np.int64)],
                     _shared=self._shared)

    def column(self, name: str, what: str = "column") -> np.ndarray:
        if name not in self.columns:
            shown = ", ".join(self.names[:30]) + (", ..." if len(self.columns) > 30 else "")
            raise DataError(f"{what} {name!r} is not a column of {self.source}; its columns: {shown}")
        return self.columns[name][self.index]

    def numbers(self, name: str, what: str = "column") -> np.ndarray:
        v = self.column(name, what)
        if v.dtype.kind != "f":
            bad = next((x for x in v if x is not None), None)
            raise DataError(f"{what} {name!r} of {self.source} holds text ({bad!r}), not numbers")
        return v

    def sizes(self) -> np.ndarray:
        s = self._shared["sizes"]
        if s is None:
            raise DataError(f"{self.source}: the images' sizes are unknown, so key points in pixels cannot be read; "
                            "give them as units: relative")
        if not isinstance(s, np.ndarray):  # image files: read each header once, shared by every subset
            s = self._shared["sizes"] = _image_sizes(s)
        return s[self.index]


def _image_sizes(paths: Sequence[Path]) -> np.ndarray:
    from PIL import Image

    out = np.zeros((len(paths), 2), dtype=np.float64)
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:  # the header only
                out[i] = im.size
        except Exception as e:
            raise DataError(f"cannot read image {p}: {type(e).__name__}: {e}") from e
    return out


def read_frame(path: Path):
    """A CSV / TSV (pandas) or Parquet (pandas with pyarrow) file as a DataFrame."""
    import pandas as pd

    if not path.is_file():
        raise DataError(f"data set 'table' not found: no file {path}.\nExpected:\n{TABLE_LAYOUT}\n"
                        "Set data.file to such a file.")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise DataError(f"data.file {path} is Parquet: reading it needs pyarrow (pip install pyarrow), "
                                "or give a CSV file") from None
            return pd.read_parquet(path)
        if suffix in (".csv", ".tsv", ".txt"):
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"data.file {path} does not read as a table ({type(e).__name__}: {e})") from e
    raise DataError(f"data.file {path}: give a .csv, .tsv or .parquet file")


def frame_columns(frame) -> Dict[str, np.ndarray]:
    """Each column as float64 (numbers, NaN missing) or an object array of str (None missing)."""
    out: Dict[str, np.ndarray] = {}
    for name in frame.columns:
        col = frame[name]
        if col.dtype.kind in "biuf":
            out[str(name)] = col.to_numpy(dtype=np.float64, na_value=np.nan)
        else:
            out[str(name)] = np.array([None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
                                       for v in col.tolist()], dtype=object)
    return out


def class_names(values: np.ndarray) -> List[str]:
    """The sorted distinct values of a class column as names (2.0 -> '2')."""
    present = [v for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))]
    if values.dtype.kind == "f":
        return [_name(v) for v in sorted(set(float(v) for v in present))]
    return sorted(set(present))


def class_codes(values: np.ndarray, names: List[str]) -> np.ndarray:
    """Each value's index in ``names``; -1 when missing or not among them."""
    index = {n: i for i, n in enumerate(names)}
    as_name = (lambda v: None if np.isnan(v) else _name(v)) if values.dtype.kind == "f" else (lambda v: v)
    return np.array([index.get(as_name(v), -1) for v in values], dtype=np.int64)


def _name(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def _labelled(images: Any, table: Table, label_column: Optional[str], data_name: str) -> Tuple[Any, List[str]]:
    """The table's image set, its targets the label column's classes (or 0)."""
    from trainables.data.images import TableImageSet

    if label_column is None:
        return TableImageSet(images, table, np.zeros(len(table), dtype=np.int64)), []
    values = table.column(label_column, "data.label_column")
    names = class_names(values)
    codes = class_codes(values, names)
    if (codes < 0).any():
        raise DataError(f"data.label_column {label_column!r} of {table.source}: {int((codes < 0).sum())} row(s) have "
                        "no value; fill them or leave those rows out")
    return TableImageSet(images, table, codes), names


@DATASETS.register("table", config=TableConfig)
def _table(cfg: TableConfig) -> Source:
    """A CSV / Parquet file of image paths and target columns."""
    from trainables.data.images import FileImageSet

    path = Path(os.path.expanduser(cfg.file))
    frame = read_frame(path)
    if frame.empty:
        raise DataError(f"data.file {path} has no rows")
    columns = frame_columns(frame)
    image_column = cfg.image_column or str(frame.columns[0])
    table = Table(columns, str(path))
    names = table.column(image_column, "data.image_column")
    root = Path(os.path.expanduser(cfg.root)) if cfg.root else path.parent
    paths = [root / _path_text(v) for v in names]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"data set 'table' ({path}): {len(missing)} of {len(paths)} image(s) not found, e.g. "
                        f"{', '.join(str(p) for p in missing[:3])}; image paths are read relative to data.root "
                        f"({root})")
    table = Table(columns, str(path), sizes=paths)
    images = FileImageSet(paths, np.zeros(len(paths), dtype=np.int64), cfg.image_size)
    pool, classes = _labelled(images, table, cfg.label_column, "table")
    return Source({"train": pool}, classes)


def _path_text(v: Any) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        raise DataError("data.image_column: a row has no image path")
    return _name(v) if isinstance(v, float) else str(v)


# --------------------------------------------------------------------------- synthetic faces

# The 68 points of iBUG 300-W (jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, mouth 48-67) that
# swap under a horizontal flip.
FLIP_PAIRS_68 = [(0, 16), (1, 15), (2, 14), (3, 13), (4, 12), (5, 11), (6, 10), (7, 9), (17, 26), (18, 25),
                 (19, 24), (20, 23), (21, 22), (31, 35), (32, 34), (36, 45), (37, 44), (38, 43), (39, 42),
                 (40, 47), (41, 46), (48, 54), (49, 53), (50, 52), (55, 59), (56, 58), (60, 64), (61, 63),
                 (65, 67)]
SYNTH_WIDTH, SYNTH_HEIGHT = 96, 80  # not square: the key points go through the resize and centre crop too
SKIN = [(241, 194, 160), (224, 172, 130), (198, 134, 90), (141, 85, 54), (90, 56, 38)]  # race 0-4


def face_template() -> np.ndarray:
    """The 68 points on a unit face (the face ellipse is the unit circle, y down), in 300-W's
    order; each point of the image's right half mirrors its pair on the left."""
    t = np.full((68, 2), np.nan)
    for j in range(17):  # the jaw: the lower half of the outline, from the image's left to its right
        a = np.pi - np.pi * j / 16
        t[j] = (np.cos(a), np.sin(a))
    for k, i in enumerate(range(17, 22)):  # the left brow, outer to inner
        u = -0.75 + 0.15 * k
        t[i] = (u, -0.45 - 0.08 * np.sin(np.pi * k / 4))
    for k, i in enumerate(range(27, 31)):  # the bridge of the nose
        t[i] = (0.0, -0.3 + 0.15 * k)
    t[31], t[32], t[33] = (-0.2, 0.25), (-0.1, 0.28), (0.0, 0.3)
    t[36], t[37], t[38], t[39], t[40], t[41] = (-0.58, -0.25), (-0.46, -0.31), (-0.34, -0.31), (-0.22, -0.25), \
        (-0.34, -0.19), (-0.46, -0.19)
    t[48], t[49], t[50], t[51] = (-0.35, 0.5), (-0.22, 0.44), (-0.08, 0.42), (0.0, 0.43)
    t[57], t[58], t[59] = (0.0, 0.61), (-0.09, 0.6), (-0.22, 0.57)
    t[60], t[61], t[62], t[66], t[67] = (-0.28, 0.5), (-0.1, 0.47), (0.0, 0.47), (0.0, 0.54), (-0.1, 0.54)
    for left, right in FLIP_PAIRS_68:
        if np.isnan(t[right, 0]):
            t[right] = (-t[left, 0], t[left, 1])
        elif np.isnan(t[left, 0]):
            t[left] = (-t[right, 0], t[right, 1])
    assert not np.isnan(t).any()
    return t


def synthetic_faces(n: int, seed: int) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """``n`` drawn faces (uint8, N x 3 x 80 x 96) and their table: ``file``, ``age`` (1-90: the
    hair greys with it), ``gender`` (0: short hair, 1: long hair), ``race`` (0-4: the skin tone)
    and the 68 points in pixels as columns ``"0"``..``"135"`` (x0, y0, x1, y1, ...)."""
    rng = np.random.default_rng([seed, 68])
    W, H = SYNTH_WIDTH, SYNTH_HEIGHT
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32) + 0.5
    template = face_template()
    images = np.empty((n, H, W, 3), dtype=np.uint8)
    age = rng.uniform(1, 90, n).round(1)
    gender = rng.integers(0, 2, n)
    race = rng.integers(0, 5, n)
    points = np.empty((n, 68, 2))
    for i in range(n):
        cx, cy = rng.uniform(38, 58), rng.uniform(36, 44)
        a, b = rng.uniform(16, 21), rng.uniform(21, 26)
        img = np.empty((H, W, 3), dtype=np.float32)
        img[:] = rng.uniform(40, 220, 3)
        u, v = (xx - cx) / a, (yy - cy) / b
        face = u * u + v * v <= 1
        grey = (age[i] - 1) / 89
        hair = np.array([70, 45, 25]) * (1 - grey) + np.array([235, 235, 230]) * grey
        if gender[i]:  # long hair: behind the face, down to the chin's level
            big = ((xx - cx) / (a + 6)) ** 2 + ((yy - cy) / (b + 5)) ** 2 <= 1
            img[big & (v < 0.7)] = hair
        img[face] = SKIN[race[i]]
        cap = (((xx - cx) / (a + 2)) ** 2 + ((yy - cy) / (b + 3)) ** 2 <= 1) & (v < -0.55)
        img[cap] = hair
        for side in (-1, 1):  # eyes
            img[((u - 0.4 * side) / 0.16) ** 2 + ((v + 0.25) / 0.08) ** 2 <= 1] = (30, 30, 40)
        img[(u / 0.3) ** 2 + ((v - 0.515) / 0.07) ** 2 <= 1] = (120, 30, 40)  # mouth
        img[(u / 0.09) ** 2 + ((v - 0.27) / 0.06) ** 2 <= 1] *= 0.7  # nose
        img += rng.normal(0, 6, img.shape)
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
        points[i] = np.stack([cx + a * template[:, 0], cy + b * template[:, 1]], axis=1)
    columns: Dict[str, np.ndarray] = {
        "file": np.array([f"face_{i:06d}.png" for i in range(n)], dtype=object),
        "age": age.astype(np.float64), "gender": gender.astype(np.float64), "race": race.astype(np.float64)}
    flat = points.reshape(n, -1)
    for c in range(flat.shape[1]):
        columns[str(c)] = flat[:, c].astype(np.float64)
    return images.transpose(0, 3, 1, 2), columns


@DATASETS.register("synthetic_faces", config=SyntheticFacesConfig)
def _synthetic_faces(cfg: SyntheticFacesConfig) -> Source:
    """Drawn faces with known age, gender, race and 68 key points, made in memory (offline)."""
    from trainables.data.images import TensorImageSet

    images, columns = synthetic_faces(cfg.images, cfg.seed)
    n = len(images)
    table = Table(columns, "synthetic_faces", sizes=np.tile([float(SYNTH_WIDTH), float(SYNTH_HEIGHT)], (n, 1)))
    pool, classes = _labelled(TensorImageSet(images, np.zeros(n, dtype=np.int64), cfg.image_size), table,
                              cfg.label_column, "synthetic_faces")
    return Source({"train": pool}, classes)
