"""Several targets on one backbone (``targets:`` in a spec): multi-task heads, losses and metrics.

The trial's head is one layer whose outputs are the tasks' slices side by side (a class task
C logits, a regression 1 value, k key points 2k coordinates), so freezing, LR groups,
checkpoints, the feature cache and export treat it as any head. Each task reads its columns of a
table data set (trainables/data/table.py), encodes them into its part of a target vector per
image (``TargetedSet``), and has its own loss, weight and metrics:

- ``class``: cross-entropy (``train.label_smoothing`` applies); ``<split>/<task>/acc``,
  ``balanced_acc``, ``macro_f1``;
- ``regression``: the head predicts ``(value - center) / scale`` (mean and standard deviation of
  the training split unless given) with MSE, L1 or smooth L1; ``<split>/<task>/mae`` in the
  column's units;
- ``keypoints``: coordinates relative to the input image (after the resize and centre crop every
  image gets), learnt as offsets from the training split's mean shape in units of its spread (the
  head's zero is the mean face; raw coordinates would have the head spend its first hundreds of
  steps walking its biases there); they move with the pixels through the training augmentation (torchvision.transforms.v2 with ``tv_tensors.KeyPoints``: crop, flip, affine), a
  flip swapping the points of ``flip_pairs``; ``<split>/<task>/nme`` is the mean distance between
  predicted and true points divided by the image size.

A missing value (NaN, an empty cell) leaves that task's term out for that image. ``train/loss`` and
``val/loss`` are the weighted sums of the tasks' mean losses; each task's loss is logged as
``<split>/<task>/loss``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

from trainables import metrics as M
from trainables.config import ClassTarget, KeypointsTarget, RegressionTarget, TargetConfig
from trainables.data.images import Derived, ImageSet
from trainables.data.sets import DataError
from trainables.data.table import Table, class_codes, class_names

SPLITS = ("train", "val", "test")


def square_points(x: np.ndarray, y: np.ndarray, w: np.ndarray, h: np.ndarray, size: int):
    """Pixel coordinates in a ``w`` x ``h`` image -> in its square input (the shorter side
    resized to ``size``, then a centre crop: trainables.data.images.square_resize), with the
    arithmetic of torchvision's resize and centre-crop kernels for key points."""
    w, h = np.asarray(w, dtype=np.float64), np.asarray(h, dtype=np.float64)
    short, long = np.minimum(w, h), np.maximum(w, h)
    new_long = np.floor(size * long / short)
    new_w, new_h = np.where(w <= h, size, new_long), np.where(w <= h, new_long, size)
    left, top = np.round((new_w - size) / 2.0), np.round((new_h - size) / 2.0)
    return x * (new_w / w) - left, y * (new_h / h) - top


def _pointwise(loss: str, beta: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if loss == "mse":
        return lambda p, t: (p - t).square()
    if loss == "l1":
        return lambda p, t: (p - t).abs()
    return lambda p, t: F.smooth_l1_loss(p, t, reduction="none", beta=beta)


def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return (values * valid).sum() / valid.sum().clamp(min=1)


class Task:
    """One target: its columns, its slice of the head (``out``) and of the target vector (``cols``)."""

    kind = ""

    def __init__(self, name: str, cfg: TargetConfig):
        self.name, self.cfg = name, cfg
        self.out = self.cols = slice(0, 0)

    @property
    def weight(self) -> float:
        return float(self.cfg.weight)

    width = 1  # head outputs
    size = 1  # target columns

    def fit(self, tables: Dict[str, Table]) -> None:
        """Read what the task needs from the table (its columns, classes)."""

    def calibrate(self, train: np.ndarray) -> None:
        """Statistics of the training split's encoded targets (``train``: its columns of them)."""

    def encode(self, table: Table, image_size: int) -> np.ndarray:
        raise NotImplementedError

    def loss(self, out: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        raise NotImplementedError

    # evaluation: sums over a split, on the device
    def reset(self, device) -> None:
        raise NotImplementedError

    def update(self, out: torch.Tensor, y: torch.Tensor) -> None:
        raise NotImplementedError

    def result(self, split: str, per_class: bool) -> Dict[str, float]:
        raise NotImplementedError

    def describe(self) -> Dict[str, Any]:
        return {"kind": self.kind, "outputs": [self.out.start, self.out.stop]}


class ClassTask(Task):
    kind = "class"

    def fit(self, tables):
        values = np.concatenate([t.column(self.cfg.column, f"targets.{self.name}.column") for t in tables.values()])
        self.classes = class_names(values)
        if len(self.classes) < 2:
            raise DataError(f"targets.{self.name}: column {self.cfg.column!r} has {len(self.classes)} class(es); "
                            "a class task needs two or more")
        self.width = len(self.classes)

    def encode(self, table, image_size):
        codes = class_codes(table.column(self.cfg.column), self.classes).astype(np.float32)
        codes[codes < 0] = np.nan
        return codes[:, None]

    def _codes(self, y):
        t = y[:, self.cols.start]
        valid = ~torch.isnan(t)
        return t.nan_to_num(0).long(), valid

    def loss(self, out, y, label_smoothing=0.0):
        codes, valid = self._codes(y)
        per = F.cross_entropy(out[:, self.out], codes, reduction="none", label_smoothing=label_smoothing)
        return _masked_mean(per, valid)

    def reset(self, device):
        C = self.width
        self.confusion = torch.zeros(C, C, dtype=torch.long, device=device)
        self.loss_sum = torch.zeros((), device=device)

    def update(self, out, y):
        codes, valid = self._codes(y)
        logits = out[:, self.out]
        self.loss_sum += (F.cross_entropy(logits, codes, reduction="none") * valid).sum()
        C = self.width
        pairs = (codes * C + logits.argmax(1))[valid]
        self.confusion += torch.bincount(pairs, minlength=C * C).view(C, C)

    def result(self, split, per_class):
        return M.confusion_metrics(self.confusion.cpu(), self.loss_sum.item(), f"{split}/{self.name}",
                                   self.classes, [], per_class=per_class)

    def describe(self):
        return {**super().describe(), "classes": list(self.classes)}


class RegressionTask(Task):
    kind = "regression"

    def fit(self, tables):
        tables["train"].numbers(self.cfg.column, f"targets.{self.name}.column")
        self.fn = _pointwise(self.cfg.loss, self.cfg.beta)

    def calibrate(self, train):
        finite = train[np.isfinite(train)].astype(np.float64)
        if not len(finite):
            raise DataError(f"targets.{self.name}: column {self.cfg.column!r} has no value in the training split")
        std = float(finite.std()) if len(finite) > 1 else 0.0
        self.center = float(finite.mean()) if self.cfg.center is None else float(self.cfg.center)
        self.scale = (std if std > 0 else 1.0) if self.cfg.scale is None else float(self.cfg.scale)

    def encode(self, table, image_size):
        return table.numbers(self.cfg.column, f"targets.{self.name}.column").astype(np.float32)[:, None]

    def _pair(self, out, y):
        t = y[:, self.cols.start]
        valid = ~torch.isnan(t)
        return out[:, self.out.start], ((t - self.center) / self.scale).nan_to_num(0), valid

    def loss(self, out, y, label_smoothing=0.0):
        pred, target, valid = self._pair(out, y)
        return _masked_mean(self.fn(pred, target), valid)

    def reset(self, device):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, absolute error, count

    def update(self, out, y):
        pred, target, valid = self._pair(out, y)
        err = (pred - target).abs() * self.scale
        self.sums += torch.stack([(self.fn(pred, target) * valid).sum(), (err * valid).sum(), valid.sum()]).double()

    def result(self, split, per_class):
        loss, err, n = self.sums.tolist()
        return {M.task_key(split, self.name, M.LOSS): loss / max(n, 1), M.task_key(split, self.name, M.MAE): err / max(n, 1)}

    def describe(self):
        return {**super().describe(), "value": "output * scale + center", "center": self.center, "scale": self.scale}


class KeypointsTask(Task):
    kind = "keypoints"

    def fit(self, tables):
        table = tables["train"]
        cfg, what = self.cfg, f"targets.{self.name}"
        if cfg.columns is not None:
            names = list(cfg.columns)
        else:
            first, last = cfg.column_range
            order = table.names
            for c in (first, last):
                table.column(c, f"{what}.column_range")
            i, j = order.index(first), order.index(last)
            if j < i or (j - i + 1) % 2:
                raise DataError(f"{what}.column_range: {first!r}..{last!r} spans {j - i + 1} column(s) of "
                                f"{table.source}; it needs x and y columns in pairs, first before last")
            names = order[i : j + 1]
        for c in names:
            table.numbers(c, f"{what} column")
        self.columns = names
        self.points = len(names) // 2
        flat = [i for pair in cfg.flip_pairs for i in pair]
        if flat and max(flat) >= self.points:
            raise DataError(f"{what}.flip_pairs: point {max(flat)}, but the task has {self.points} points (0-based)")
        self.width = self.size = 2 * self.points
        self.fn = _pointwise(cfg.loss, cfg.beta)

    def calibrate(self, train):
        """The mean shape (per coordinate) and one spread (the RMS distance of the coordinates
        from it) over the training split's points."""
        mean = np.nanmean(train, axis=0) if np.isfinite(train).any(axis=0).all() else None
        if mean is None:
            raise DataError(f"targets.{self.name}: a key point has no value in the training split")
        spread = float(np.sqrt(np.nanmean((train - mean) ** 2)))
        self.center = torch.tensor(mean, dtype=torch.float32)
        self.scale = spread if spread > 0 else 1.0

    def encode(self, table, image_size):
        xy = np.stack([table.numbers(c) for c in self.columns], axis=1)  # (n, 2k) x0, y0, x1, y1, ...
        sizes = table.sizes()
        w, h = sizes[:, :1], sizes[:, 1:]
        x, y = xy[:, 0::2], xy[:, 1::2]
        if self.cfg.units == "relative":
            x, y = x * w, y * h
        x, y = square_points(x, y, w, h, image_size)
        out = np.empty_like(xy)
        out[:, 0::2], out[:, 1::2] = x / image_size, y / image_size
        return out.astype(np.float32)

    def perm(self) -> List[int]:
        """Point order after a horizontal flip: the pairs swapped."""
        p = list(range(self.points))
        for a, b in self.cfg.flip_pairs:
            p[a], p[b] = b, a
        return p

    def _pair(self, out, y):
        r = y[:, self.cols]
        valid = ~torch.isnan(r)
        return out[:, self.out], ((r - self.center.to(r.device)) / self.scale).nan_to_num(0), valid

    def loss(self, out, y, label_smoothing=0.0):
        pred, target, valid = self._pair(out, y)
        return _masked_mean(self.fn(pred, target), valid)

    def reset(self, device):
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, coordinates, distance, points

    def update(self, out, y):
        pred, target, valid = self._pair(out, y)
        d = ((pred - target) * self.scale).view(len(y), -1, 2)  # in units of the image size
        seen = valid.view(len(y), -1, 2).all(-1)
        dist = d.square().sum(-1).sqrt()
        self.sums += torch.stack([(self.fn(pred, target) * valid).sum(), valid.sum(),
                                  (dist * seen).sum(), seen.sum()]).double()

    def result(self, split, per_class):
        loss, coords, dist, points = self.sums.tolist()
        return {M.task_key(split, self.name, M.LOSS): loss / max(coords, 1),
                M.task_key(split, self.name, M.NME): dist / max(points, 1)}

    def describe(self):
        return {**super().describe(), "points": self.points, "center": self.center.tolist(), "scale": self.scale,
                "value": "x0, y0, x1, y1, ...: (output * scale + center) times the input's width / height"}


KINDS = {"class": ClassTask, "regression": RegressionTask, "keypoints": KeypointsTask}


class TargetedSet(Derived):
    """A split with each image's target vector (the tasks' columns encoded) in place of its
    class; ``values`` holds them all (the feature cache stores them beside the features)."""

    def __init__(self, base: ImageSet, values: np.ndarray):
        self.base, self.values = base, np.ascontiguousarray(values, dtype=np.float32)
        self.targets = base.targets  # the label column's classes (or 0): splits and the sampler use them

    def __getitem__(self, i: int):
        return self.base[i][0], torch.from_numpy(self.values[i])

    def target(self, i: int):
        return torch.from_numpy(self.values[i])


class Tasks:
    """The trial's tasks: the head's width, the summed loss, per-task metrics, the key points'
    path through augmentation. ``attach`` gives a data bundle's splits their target vectors."""

    def __init__(self, targets: Dict[str, TargetConfig], data: Any, image_size: int):
        self.tasks: List[Task] = [KINDS[cfg.kind](name, cfg) for name, cfg in targets.items()]
        tables = self._tables(data)
        out = cols = 0
        for t in self.tasks:
            t.fit(tables)
            t.calibrate(t.encode(tables["train"], image_size))
            t.out, t.cols = slice(out, out + t.width), slice(cols, cols + t.size)
            out, cols = out + t.width, cols + t.size
        self.width = out
        self._sums: Dict[str, torch.Tensor] = {}
        self._seen = 0
        self.attach(data, image_size)

    @classmethod
    def build(cls, cfg: Any, data: Any) -> Optional["Tasks"]:
        """The tasks of a trial config's ``targets`` on ``data`` (attached), or None without targets."""
        return cls(cfg.targets, data, cfg.data.image_size) if cfg.targets else None

    @staticmethod
    def _tables(data: Any) -> Dict[str, Table]:
        tables = {}
        for split in SPLITS:
            images = getattr(data, split)
            table = images.table()
            if table is None:
                raise DataError("targets: the data set has no table of values per image; use data.name table "
                                "or synthetic_faces")
            tables[split] = table
        return tables

    @property
    def moves_with_pixels(self) -> bool:
        """Whether a target moves when the pixels do (key points)."""
        return any(isinstance(t, KeypointsTask) for t in self.tasks)

    def attach(self, data: Any, image_size: int) -> None:
        """Replace the train / val / test splits of ``data`` by ``TargetedSet``s (once)."""
        tables = self._tables(data)
        for split in SPLITS:
            images = getattr(data, split)
            if isinstance(images, TargetedSet):
                continue
            values = np.concatenate([t.encode(tables[split], image_size) for t in self.tasks], axis=1)
            setattr(data, split, TargetedSet(images, values))

    # ------------------------------------------------------------------ training
    def loss(self, out: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """The weighted sum of the tasks' losses on a batch (each task's is kept for the epoch's
        ``train/<task>/loss``)."""
        total = out.new_zeros(())
        n = len(y)
        for t in self.tasks:
            part = t.loss(out, y, label_smoothing)
            total = total + t.weight * part
            self._sums[t.name] = self._sums.get(t.name, 0) + part.detach() * n
        self._seen += n
        return total

    def epoch_metrics(self) -> Dict[str, float]:
        """Each task's mean training loss over the epoch; then reset."""
        out = {M.task_key(M.TRAIN, name, M.LOSS): float(v) / max(self._seen, 1) for name, v in self._sums.items()}
        self._sums, self._seen = {}, 0
        return out

    def train_transform(self, base: Optional[Callable], image_size: int) -> Optional[Callable]:
        """The training augmentation ``base`` (image only), made to move the key points too."""
        if base is None or not self.moves_with_pixels:
            return base
        return KeyPointTransform(base, [t for t in self.tasks if isinstance(t, KeypointsTask)], image_size)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, trial: Any, split: str) -> Dict[str, float]:
        """Each task's metrics on ``split`` and the weighted loss (``<split>/loss``)."""
        trial.model.eval()
        for t in self.tasks:
            t.reset(trial.device)
        for x, y in trial.loaders[split]:
            x, y = trial.inputs(x), y.to(trial.device, non_blocking=True)
            with trial.autocast():
                out = (trial.forward(*x) if isinstance(x, tuple) else trial.forward(x)).float()
            for t in self.tasks:
                t.update(out, y)
        per_class = trial.phase_cfg.train.per_class_metrics
        metrics: Dict[str, float] = {}
        total = 0.0
        for t in self.tasks:
            m = t.result(split, per_class)
            total += t.weight * m[M.task_key(split, t.name, M.LOSS)]
            metrics.update(m)
        metrics[M.key(split, M.LOSS)] = total
        return metrics

    def describe(self) -> Dict[str, Any]:
        """The head's outputs, task by task (a served model's metadata)."""
        return {t.name: t.describe() for t in self.tasks}


class KeyPointTransform:
    """A training transform of ``(image, target vector)``: the key points of the target vector
    go through ``base`` as ``tv_tensors.KeyPoints`` (in pixels of the square input), so a crop,
    flip or affine moves them with the pixels; a flip also swaps each task's ``flip_pairs``."""

    with_target = True  # trainables.data.loaders.SeededView passes the target through

    def __init__(self, base: Callable, tasks: List[KeypointsTask], size: int):
        self.size = size
        self.cols = torch.tensor([c for t in tasks for c in range(t.cols.start, t.cols.stop)])
        perm, offset = [], 0
        for t in tasks:
            perm += [offset + i for i in t.perm()]
            offset += t.points
        steps = list(base.transforms) if isinstance(base, v2.Compose) else [base]
        swapped = [PairedFlip(s.p, perm) if type(s) is v2.RandomHorizontalFlip else s for s in steps]
        self.base = v2.Compose(swapped)

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        y = y.clone()
        points = tv_tensors.KeyPoints(y[self.cols].view(-1, 2) * self.size, canvas_size=(self.size, self.size))
        x, points = self.base(x, points)
        h, w = points.canvas_size
        xy = points.as_subclass(torch.Tensor).reshape(-1, 2) / torch.tensor([float(w), float(h)])
        y[self.cols] = xy.reshape(-1).to(y.dtype)
        return x, y


class PairedFlip(v2.RandomHorizontalFlip):
    """A horizontal flip that also swaps the points of flip pairs (a face's left and right eye)."""

    def __init__(self, p: float, perm: List[int]):
        super().__init__(p)
        self.perm = list(perm)

    def transform(self, inpt, params):
        out = super().transform(inpt, params)
        if isinstance(inpt, tv_tensors.KeyPoints) and self.perm != sorted(self.perm):
            out = tv_tensors.wrap(out.as_subclass(torch.Tensor)[self.perm], like=out)
        return out
