"""Fast trials: the decoded-image cache, the frozen-prefix feature cache, lean checkpoints."""
from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pytest
import torch

from conftest import save_jpeg, trial_config
from trainables.data import build_data
from trainables.data.cache import CachedImageSet, cache_root
from trainables.trainable import FineTuneTrial


def _folder(root, classes=("cat", "dog", "fox"), n=8, size=40):
    for c, cls in enumerate(classes):
        for i in range(n):
            save_jpeg(root / cls / f"{i}.jpg", (80 * c, 50 + 10 * i, 200 - 60 * c), size=size, seed=i)
    return root


def folder_cfg(root, **kw):
    return {"name": "image_folder", "root": str(root), "image_size": 24, "val_fraction": 0.25, "test_fraction": 0.25,
            "seed": 0, **kw}


def test_decoded_images_are_cached_once_and_read_back_identical(tmp_path, monkeypatch):
    monkeypatch.setenv("TL_SWEEP_CACHE", str(tmp_path / "cache"))
    root = _folder(tmp_path / "imgs")
    plain = build_data(folder_cfg(root, cache="off"))
    cached = build_data(folder_cfg(root))
    assert isinstance(cached.train.base, CachedImageSet) and not isinstance(plain.train.base, CachedImageSet)
    for a, b in ((plain.train, cached.train), (plain.val, cached.val), (plain.test, cached.test)):
        assert len(a) == len(b) and a.targets.tolist() == b.targets.tolist()
        for i in range(len(a)):
            assert torch.equal(a[i][0], b[i][0]), "the same decoded, resized pixels"
    folders = [p for p in cache_root().iterdir() if p.is_dir()]
    assert len(folders) == 1 and (folders[0] / "complete").exists()
    again = build_data(folder_cfg(root))
    assert again.train.base.folder == folders[0], "a second build reads the cache"
    save_jpeg(root / "cat" / "0.jpg", (1, 2, 3), size=40, seed=99)  # a changed file: a new key
    os.utime(root / "cat" / "0.jpg", ns=(1, 10**18))
    changed = build_data(folder_cfg(root))
    assert changed.train.base.folder != folders[0]
    other_size = build_data(folder_cfg(root, image_size=16))
    assert other_size.train[0][0].shape == (3, 16, 16)


def _build(args):
    root, cache = args
    os.environ["TL_SWEEP_CACHE"] = cache
    d = build_data(folder_cfg(root))
    return str(d.train.base.folder), int(sum(int(x.sum()) for x, _ in (d.train[i] for i in range(len(d.train)))))


def test_trials_started_together_fill_the_cache_once(tmp_path):
    root = _folder(tmp_path / "imgs", n=30, size=64)
    with mp.get_context("spawn").Pool(3) as pool:
        results = pool.map(_build, [(str(root), str(tmp_path / "cache"))] * 3)
    assert len({r[0] for r in results}) == 1 and len({r[1] for r in results}) == 1
    entries = sorted(p.name for p in (tmp_path / "cache" / "images").iterdir())
    assert len([e for e in entries if not e.endswith(".lock")]) == 1, f"no duplicate, no half-written array: {entries}"


def test_training_with_the_cache_is_training_without_it(tmp_path, monkeypatch, base_spec):
    monkeypatch.setenv("TL_SWEEP_CACHE", str(tmp_path / "cache"))
    root = _folder(tmp_path / "imgs", n=12)
    base_spec["model"] = {"name": "resnet18", "weights": "none"}
    base_spec["data"] = folder_cfg(root)
    base_spec["augment"] = {"hflip": True, "crop_scale_min": 0.6}
    base_spec["train"].update(epochs=2, batch_size=8)
    runs = {}
    for mode in ("off", "auto"):
        base_spec["data"]["cache"] = mode
        reports = []
        FineTuneTrial(trial_config(base_spec)).fit(lambda m, d: reports.append(m), checkpoint=False)
        runs[mode] = [(m["train/loss"], m["val/acc"]) for m in reports]
    assert runs["auto"] == pytest.approx(runs["off"], rel=1e-6), "same seeds, same pixels: the same trial"
