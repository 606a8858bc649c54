"""Data: a data set by name, split into train / val / test (and the unlabelled rest).

- ``sets.py``: the data sets and their on-disk layouts (the ``DATASETS`` registry);
- ``images.py``: image sets in memory or on disk, resized to the input size;
- ``splits.py``: stratified splits, label fractions, class imbalance;
- ``transforms.py`` / ``loaders.py``: training augmentation and the DataLoaders of a trial.

This package imports no torch until a data set is built.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, List, Optional

import numpy as np

from trainables.config import DataConfig
from trainables.data.sets import DATASETS, DataError, Source
from trainables.data.splits import (
    cap_per_split, class_fraction_indices, label_fraction_indices, resolve_class_fraction, stratified_split,
)

if TYPE_CHECKING:
    from trainables.data.images import ImageSet

__all__ = ["DATASETS", "DataBundle", "DataError", "Source", "build_data", "parse_data_config", "select_classes"]


@dataclass
class DataBundle:
    train: "ImageSet"
    val: "ImageSet"
    test: "ImageSet"
    classes: List[str]
    reduced: List[int] = field(default_factory=list)  # classes data.class_fraction cut down
    unlabeled: Optional["ImageSet"] = None  # the training images label_fraction left out

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def parse_data_config(cfg: Any) -> DataConfig:
    """A data section as its data set's config model (from a mapping or a model)."""
    if isinstance(cfg, DataConfig):
        return cfg
    return DATASETS.section(DataConfig.model_fields["name"].default)(dict(cfg))


def select_classes(source: Source, names: List[str], data_name: str) -> Source:
    """``source`` with only the classes ``names``, relabelled 0..k-1 in that order (one task of
    a data set: digits 0-4, then 5-9)."""
    index = {c: i for i, c in enumerate(source.classes)}
    unknown = [c for c in names if c not in index]
    if unknown:
        valid = ", ".join(source.classes[:40]) + (", ..." if len(source.classes) > 40 else "")
        raise DataError(f"data.classes: {unknown} {'is not a class' if len(unknown) == 1 else 'are not classes'} "
                        f"of data set {data_name!r}; its classes: {valid}")
    keep = [index[c] for c in names]
    mapping = np.full(len(source.classes), -1, dtype=np.int64)
    mapping[keep] = np.arange(len(keep))
    pools = {k: p.subset(np.flatnonzero(np.isin(p.targets, keep))).relabel(mapping) for k, p in source.pools.items()}
    groups = {g: sorted(int(mapping[c]) for c in members if mapping[c] >= 0) for g, members in source.groups.items()}
    return Source(pools, list(names), {g: m for g, m in groups.items() if m})


def build_data(cfg: Any) -> DataBundle:
    """Load ``cfg.name`` and return train/val/test splits fixed by ``cfg.seed``."""
    cfg = parse_data_config(cfg)
    source = DATASETS.get(cfg.name)(cfg)
    if cfg.classes is not None:
        source = select_classes(source, cfg.classes, cfg.name)
    seed = cfg.seed
    pools = dict(source.pools)
    if cfg.max_images:
        pools = {k: p.subset(cap_per_split(p.targets, cfg.max_images, seed)) for k, p in pools.items()}
    if cfg.cache != "off" and any(p.files() for p in pools.values()):
        from trainables.data.cache import cached

        pools = {k: cached(p, cfg.image_size, cfg.cache, cfg.num_workers or 0) for k, p in pools.items()}
    train = pools["train"]
    carve = [s for s in ("val", "test") if s not in pools]
    if carve:
        fracs = [getattr(cfg, f"{s}_fraction") for s in carve]
        *held, rest = stratified_split(train.targets, fracs, seed)
        for name, idx in zip(carve, held):
            pools[name] = train.subset(idx)
        train = train.subset(rest)
    unlabeled = None
    if cfg.label_fraction < 1.0:
        labeled = label_fraction_indices(train.targets, cfg.label_fraction, seed)
        unlabeled = train.subset(np.setdiff1d(np.arange(len(train)), labeled))  # for semi-supervised use
        train = train.subset(labeled)
    reduced: List[int] = []
    if cfg.class_fraction:
        fractions = resolve_class_fraction(cfg.class_fraction, source)
        train = train.subset(class_fraction_indices(train.targets, fractions, seed))
        reduced = sorted(c for c, f in fractions.items() if f < 1.0)
    for name in ("val", "test"):
        if len(pools[name]) == 0:
            raise DataError(
                f"data set {cfg.name!r}: the {name} split is empty; raise data.{name}_fraction "
                "or data.max_images, or add images"
            )
    return DataBundle(train=train, val=pools["val"], test=pools["test"], classes=source.classes, reduced=reduced,
                      unlabeled=unlabeled)
