"""Which images a split holds: stratified splits, label fractions, class imbalance, caps.

Every choice is a prefix of a seed-fixed per-class order, so subsets are stratified, nested
(the 10% labels lie inside the 50%) and the same on every machine.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import numpy as np

from trainables.data.sets import DataError, Source


def stratified_order(targets: np.ndarray, seed: int) -> Dict[int, np.ndarray]:
    """Per class, its indices in a seed-fixed random order (the basis of every split)."""
    rng = np.random.default_rng(seed)
    return {int(c): rng.permutation(np.flatnonzero(targets == c)) for c in np.unique(targets)}


def stratified_split(targets: np.ndarray, fractions: Sequence[float], seed: int) -> List[np.ndarray]:
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


def resolve_class_fraction(spec: Dict[str, float], source: Source) -> Dict[int, float]:
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
