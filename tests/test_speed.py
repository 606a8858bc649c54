"""Fast trials: the decoded-image cache, the frozen-prefix feature cache, lean checkpoints."""
from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pytest
import torch

from conftest import assert_epochs_close, save_jpeg, trial_config
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
    base_spec["data"]["num_workers"] = 1
    runs = {}
    for mode in ("off", "auto"):
        base_spec["data"]["cache"] = mode
        reports = []
        trial = FineTuneTrial(trial_config(base_spec))
        # workers decode the files; the cache is read in the training process (a copy per image)
        want = 1 if mode == "off" else 0
        assert [trial.loaders[s].num_workers for s in ("val", "test")] == [want, want]
        assert trial.loaders["train"].loader.num_workers == want
        trial.fit(lambda m, d: reports.append(m), checkpoint=False)
        runs[mode] = [(m["train/loss"], m["val/acc"]) for m in reports]
    assert_epochs_close(runs["auto"], runs["off"], rel=1e-6, why="same seeds, same pixels: the same trial")


@pytest.mark.parametrize("model, last", [("resnet18", 0), ("resnet18", 1), ("timm:tf_efficientnet_lite0", 2)])
def test_the_frozen_prefix_cache_trains_exactly_as_the_full_model(tmp_path, monkeypatch, base_spec, model, last):
    monkeypatch.setenv("TL_SWEEP_CACHE", str(tmp_path / "cache"))
    base_spec["model"] = {"name": model, "weights": "none"}
    base_spec["data"].update(max_images=80, image_size=32)
    base_spec["strategy"] = {"name": "unfreeze_last", "unfreeze_last": last, "lr_decay": 0.5}
    base_spec["train"].update(epochs=2, batch_size=16)
    runs, trials = {}, {}
    for mode in ("off", "auto"):
        base_spec["strategy"]["feature_cache"] = mode
        trial = FineTuneTrial(trial_config(base_spec))
        reports = []
        trial.fit(lambda m, d: reports.append(m), checkpoint=False)
        runs[mode], trials[mode] = [(m["train/loss"], m["val/acc"], m["val/loss"]) for m in reports], trial
    assert trials["off"].feature_sets is None and trials["auto"].feature_sets is not None
    # up to float rounding: a CPU convolution rounds differently with another batch composition, and
    # two epochs of training amplify it by a CPU-dependent amount (1.7e-3 on one AMD EPYC host); a
    # wrong suffix or stale features are off by far more. Exactness is checked on the logits below.
    for cached_run, full_run in zip(runs["auto"], runs["off"]):
        assert cached_run == pytest.approx(full_run, rel=5e-3), "the suffix on cached outputs is the full model"
    x, _ = next(iter(trials["off"].loaders["val"]))
    cached = trials["auto"]
    with torch.no_grad():
        cached.model.eval()
        full = cached.model(cached.inputs(x))
        feats, _ = next(iter(cached.loaders["val"]))
        assert torch.allclose(cached.forward(*cached.inputs(feats)), full, atol=1e-5), "logits of the same images"
    stored = [p for p in (tmp_path / "cache" / "features").iterdir() if p.is_dir()]
    assert len(stored) == 3, "train, val and test outputs, each once"


def test_a_prefix_an_earlier_phase_trained_is_cached_from_its_trained_weights(tmp_path, monkeypatch, base_spec):
    """Phase 1 trains every group, phase 2 is a linear probe: the probe's cached features come
    from the weights phase 1 left (not the pretrained ones: those are another trial's cache
    entry), straight and resumed inside phase 2."""
    monkeypatch.setenv("TL_SWEEP_CACHE", str(tmp_path / "cache"))
    base_spec["model"] = {"name": "resnet18", "weights": "none"}
    base_spec["data"].update(max_images=60, image_size=16)
    base_spec["strategy"] = {"name": "unfreeze_last", "unfreeze_last": 4}
    base_spec["train"].update(epochs=1, batch_size=16, lr=1e-2)
    # another trial (same seed, same data) probes the untrained weights first: its cache entry
    probe_only = dict(base_spec, strategy={"name": "unfreeze_last", "unfreeze_last": 0})
    assert FineTuneTrial(trial_config(probe_only)).feature_sets is not None
    base_spec["phases"] = [{"name": "all", "epochs": 1},
                           {"name": "probe", "epochs": 2, "strategy": {"unfreeze_last": 0}}]
    runs = {}
    for mode in ("auto", "off"):
        base_spec["strategy"]["feature_cache"] = mode
        reports = []
        trial = FineTuneTrial(trial_config(base_spec))
        trial.fit(lambda m, d: reports.append(m), checkpoint=False)
        runs[mode] = [(m["train/loss"], m["val/loss"]) for m in reports]
        assert (trial.feature_sets is not None) == (mode == "auto")
    assert_epochs_close(runs["auto"], runs["off"], rel=5e-3)
    base_spec["strategy"]["feature_cache"] = "auto"
    first = FineTuneTrial(trial_config(base_spec))
    for _ in range(2):  # phase "all", then the probe's first epoch
        if first.phase_epoch >= first.phase_epochs(first.phase_index):
            first.enter_phase(first.phase_index + 1)
        first.phase.run_epoch()
    first.save(str(tmp_path))
    resumed = FineTuneTrial(trial_config(base_spec))
    resumed.load(str(tmp_path))
    assert resumed.feature_sets is not None
    last = resumed.phase.run_epoch()
    assert (last["train/loss"], last["val/loss"]) == pytest.approx(runs["off"][-1], rel=5e-3)


def test_a_second_trial_reuses_the_prefix_outputs(tmp_path, monkeypatch, base_spec):
    monkeypatch.setenv("TL_SWEEP_CACHE", str(tmp_path / "cache"))
    base_spec["model"] = {"name": "resnet18", "weights": "imagenet" if False else "none"}
    base_spec["data"].update(max_images=60, image_size=32)
    base_spec["strategy"] = {"name": "unfreeze_last", "unfreeze_last": 0}
    base_spec["train"].update(epochs=1, seed=3)
    FineTuneTrial(trial_config(base_spec))
    first = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "features").iterdir() if p.is_dir()}
    base_spec["train"]["lr"] = 0.05  # another trial of the sweep: same backbone, same prefix, same data
    FineTuneTrial(trial_config(base_spec))
    second = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "features").iterdir() if p.is_dir()}
    assert first == second, "computed once, read again"


def test_augmentation_before_the_prefix_uses_cached_views_or_no_cache(tmp_path, monkeypatch, base_spec):
    monkeypatch.setenv("TL_SWEEP_CACHE", str(tmp_path / "cache"))
    base_spec["model"] = {"name": "resnet18", "weights": "none"}
    base_spec["data"].update(max_images=60, image_size=32)
    base_spec["augment"] = {"hflip": True}
    base_spec["train"].update(epochs=2)
    assert FineTuneTrial(trial_config(base_spec)).feature_sets is None, "no views asked: no cache"
    base_spec["strategy"]["feature_cache_views"] = 2
    trial = FineTuneTrial(trial_config(base_spec))
    assert trial.feature_sets["train"].views == 2 and trial.feature_sets["val"].views == 1
    a = trial.feature_sets["train"]
    a.use_view(0)
    v0 = [a[i][0][0].clone() for i in range(len(a))]
    a.use_view(1)
    same = sum(torch.equal(v, a[i][0][0]) for i, v in enumerate(v0))
    assert 0 < same < len(a), "two views of each image, flipped or not by chance"
    base_spec["augment"] = {"mixup_alpha": 0.2}
    assert FineTuneTrial(trial_config(base_spec)).feature_sets is None, "batch mixing comes before the prefix"


def test_a_lean_checkpoint_holds_what_trained_and_resumes_exactly(tmp_path, base_spec):
    base_spec["model"] = {"name": "resnet18", "weights": "none"}
    base_spec["data"].update(max_images=60, image_size=16)
    base_spec["strategy"] = {"name": "unfreeze_last", "unfreeze_last": 0}
    base_spec["train"].update(epochs=3)
    cfg = trial_config(base_spec)
    sizes, straight = [], []

    def keep(m, d):
        straight.append(m)
        sizes.append(m["checkpoint/size_mb"])
        if m["epoch"] == 1:
            import shutil

            shutil.copytree(d, tmp_path / "epoch1")

    FineTuneTrial(cfg).fit(keep)
    base_spec["strategy"]["unfreeze_last"] = 5
    full = []
    FineTuneTrial(trial_config(base_spec)).fit(lambda m, d: full.append(m["checkpoint/size_mb"]))
    assert sizes[0] / full[0] <= 0.1, "a linear probe's checkpoint: the head and the buffers, not the backbone"
    assert sizes[-1] > 10 * sizes[0], "the last checkpoint is complete (it is what a trial exports)"
    state = torch.load(tmp_path / "epoch1" / "checkpoint.pt", weights_only=True)
    assert "layer1.0.conv1.weight" not in state["model"] and "fc.weight" in state["model"]
    resumed = FineTuneTrial(cfg)
    resumed.load(str(tmp_path / "epoch1"))
    rest = []
    resumed.fit(lambda m, d: rest.append(m), checkpoint=False)
    assert [m["train/loss"] for m in rest] == pytest.approx([m["train/loss"] for m in straight[1:]], rel=1e-6)
    other = dict(cfg, train=dict(cfg["train"], seed=cfg["train"]["seed"] + 5))  # other random frozen weights
    with pytest.raises(RuntimeError, match="frozen weights came from other weights"):
        FineTuneTrial(other).load(str(tmp_path / "epoch1"))


def test_jpegs_decoded_on_the_device_train_as_the_workers_decoding_them(tmp_path, monkeypatch, base_spec):
    from trainables.data.decode import DeviceDecoded, decodable

    monkeypatch.setenv("TL_SWEEP_CACHE", str(tmp_path / "cache"))
    root = _folder(tmp_path / "imgs", n=12)
    base_spec["model"] = {"name": "resnet18", "weights": "none"}
    base_spec["data"] = folder_cfg(root, cache="off", num_workers=1)
    base_spec["augment"] = {"hflip": True, "crop_scale_min": 0.6}
    base_spec["train"].update(epochs=2, batch_size=8)
    runs = {}
    for mode in ("workers", "device"):
        base_spec["data"]["decode"] = mode
        trial = FineTuneTrial(trial_config(base_spec))
        if mode == "device":  # the workers read bytes; the training process decodes (libjpeg-turbo here, nvJPEG on CUDA)
            assert all(isinstance(trial.loaders[s], DeviceDecoded) for s in ("train", "val", "test"))
            assert trial.loaders["train"].num_workers == 1
            x, _ = next(iter(trial.loaders["val"]))
            assert x.dtype == torch.uint8 and x.shape[1:] == (3, 24, 24)
            assert torch.equal(x, torch.stack([trial.data.val[i][0] for i in range(len(x))])), "the pixels PIL gives"
        reports = []
        trial.fit(lambda m, d: reports.append(m), checkpoint=False)
        runs[mode] = [(m["train/loss"], m["val/acc"], m["test/acc"] if "test/acc" in m else None) for m in reports]
    assert_epochs_close(runs["device"], runs["workers"], rel=1e-6)
    data = build_data(folder_cfg(root, cache="off"))
    assert not decodable(data.train, "auto", torch.device("cpu")), "auto decodes on the device on CUDA only"
    assert decodable(data.train, "device", torch.device("cpu")) and not decodable(data.train, "workers", torch.device("cpu"))
    assert not decodable(build_data(folder_cfg(root)).train, "device", torch.device("cpu")), "the cache holds decoded images"
    base_spec["augment"] = {"trivial_augment": True}  # per image, in the workers: they decode too
    assert not isinstance(FineTuneTrial(trial_config(base_spec)).loaders["train"], DeviceDecoded)


def test_a_jpeg_that_does_not_decode_on_the_device_is_named(tmp_path):
    from trainables.data import DataError
    from trainables.data.decode import decode_batch, read_bytes

    root = _folder(tmp_path / "imgs", n=2)
    bad = root / "cat" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    files = sorted(root.glob("*/*.jpg"))
    with pytest.raises(DataError, match=r"cannot read image .*cat/1\.jpg.*data\.decode: workers"):
        decode_batch([read_bytes(f) for f in files], files, 24, torch.device("cpu"))
