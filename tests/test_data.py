"""Loaders on data written in the real layouts, stratified splits, label fractions."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import save_jpeg
from trainables.data import DataError, build_data, label_fraction_indices, stratified_split


def cfg(**kw):
    base = {"image_size": 16, "val_fraction": 0.2, "test_fraction": 0.2, "seed": 0, "label_fraction": 1.0}
    base.update(kw)
    return base


def test_pets_breeds_and_species_through_the_real_layout(pets_root):
    d = build_data(cfg(name="pets", root=str(pets_root), target="breeds"))
    assert d.classes == ["Abyssinian", "Bengal", "American Bulldog", "Beagle"]
    assert len(d.test) == 4 * 3, "test is the official test.txt"
    assert len(d.train) + len(d.val) == 4 * 9
    x, y = d.train[0]
    assert x.dtype == torch.uint8 and x.shape == (3, 16, 16) and 0 <= y < 4
    s = build_data(cfg(name="pets", root=str(pets_root), target="species"))
    assert s.classes == ["Cat", "Dog"]
    assert sorted(np.bincount(s.test.targets).tolist()) == [6, 6]


def test_splits_are_stratified_and_fixed_by_seed(pets_root):
    a = build_data(cfg(name="pets", root=str(pets_root), val_fraction=0.34))
    b = build_data(cfg(name="pets", root=str(pets_root), val_fraction=0.34))
    c = build_data(cfg(name="pets", root=str(pets_root), val_fraction=0.34, seed=1))
    assert np.bincount(a.val.targets).tolist() == [3, 3, 3, 3]
    assert a.val.indices.tolist() == b.val.indices.tolist()
    assert a.val.indices.tolist() != c.val.indices.tolist()
    assert not set(a.val.indices) & set(a.train.indices)


def test_missing_root_says_where_and_what(tmp_path):
    with pytest.raises(DataError) as e:
        build_data(cfg(name="pets", root=str(tmp_path / "nowhere")))
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / "oxford-iiit-pet") in msg
    assert "annotations/trainval.txt" in msg and "data.download: true" in msg
    for name in ("flowers102", "cifar10", "image_folder"):
        with pytest.raises(DataError, match="not found: looked in"):
            build_data(cfg(name=name, root=str(tmp_path / "nowhere")))


def _class_folders(root: Path, classes=("cat", "dog", "fox"), n=6):
    for c, cls in enumerate(classes):
        for i in range(n):
            save_jpeg(root / cls / f"{i}.jpg", (80 * c, 50, 200 - 60 * c), seed=i)


def test_image_folder_flat_is_split_by_seed(tmp_path):
    _class_folders(tmp_path / "imgs")
    d = build_data(cfg(name="image_folder", root=str(tmp_path / "imgs"), val_fraction=0.34, test_fraction=0.34))
    assert d.classes == ["cat", "dog", "fox"]
    assert [len(d.train), len(d.val), len(d.test)] == [6, 6, 6]
    assert np.bincount(d.test.targets).tolist() == [2, 2, 2]


def test_image_folder_with_split_folders(tmp_path):
    _class_folders(tmp_path / "ds" / "train", n=5)
    _class_folders(tmp_path / "ds" / "test", n=2)
    d = build_data(cfg(name="image_folder", root=str(tmp_path / "ds"), val_fraction=0.2))
    assert len(d.test) == 6 and len(d.val) == 3 and len(d.train) == 12
    _class_folders(tmp_path / "ds" / "val", classes=("cat", "wolf"), n=1)
    with pytest.raises(DataError, match=r"classes \['wolf'\] are not in"):
        build_data(cfg(name="image_folder", root=str(tmp_path / "ds")))


def test_corrupt_image_names_the_file(tmp_path):
    _class_folders(tmp_path / "imgs", n=3)
    bad = tmp_path / "imgs" / "dog" / "1.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    d = build_data(cfg(name="image_folder", root=str(tmp_path / "imgs"), val_fraction=0.34, test_fraction=0.34, seed=0,
                       cache="off"))
    sets = [d.train, d.val, d.test]
    with pytest.raises(DataError, match=f"cannot read image {bad}"):
        for s in sets:
            for i in range(len(s)):
                s[i]
    # with the decoded-image cache, every image is read as the data set is built: the error comes first
    with pytest.raises(DataError, match=f"cannot read image {bad}"):
        build_data(cfg(name="image_folder", root=str(tmp_path / "imgs"), val_fraction=0.34, test_fraction=0.34))


def test_flowers102_official_split_from_mat_files(tmp_path):
    from scipy.io import savemat

    base = tmp_path / "flowers-102"
    labels = np.repeat([1, 2, 3], 4)  # 12 images, 3 classes
    for i in range(1, 13):
        save_jpeg(base / "jpg" / f"image_{i:05d}.jpg", (20 * i, 100, 50), seed=i)
    savemat(base / "imagelabels.mat", {"labels": labels[None]})
    savemat(base / "setid.mat", {"trnid": np.array([[1, 2, 5, 6, 9, 10]]), "valid": np.array([[3, 7, 11]]),
                                 "tstid": np.array([[4, 8, 12]])})
    d = build_data(cfg(name="flowers102", root=str(tmp_path)))
    assert [len(d.train), len(d.val), len(d.test)] == [6, 3, 3]
    assert d.test.targets.tolist() == [0, 1, 2] and d.num_classes == 3
    assert d.train[0][0].shape == (3, 16, 16)


def test_cifar10_python_batches(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("data_batch_1", 40), ("data_batch_2", 40), ("test_batch", 20)):
        with open(base / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                         b"labels": [i % 10 for i in range(n)]}, f)
    d = build_data(cfg(name="cifar10", root=str(tmp_path), val_fraction=0.25, verify=False))
    assert len(d.test) == 20 and len(d.val) == 20 and len(d.train) == 60
    assert d.classes[0] == "airplane" and d.train[0][0].shape == (3, 16, 16)


def test_offline_sets_ship_with_packages():
    digits = build_data(cfg(name="digits"))
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    mnist = build_data(cfg(name="mnist5k", max_images=500))
    assert mnist.num_classes == 10 and sorted(set(mnist.train.targets.tolist())) == list(range(10))
    x, _ = mnist.train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and int(x.max()) > 100


def test_label_fraction_is_stratified_nested_and_keeps_every_class():
    targets = np.repeat(np.arange(5), [100, 50, 20, 8, 3])
    subsets = {f: set(label_fraction_indices(targets, f, seed=7).tolist()) for f in (1.0, 0.5, 0.1, 0.01)}
    assert subsets[0.01] <= subsets[0.1] <= subsets[0.5] <= subsets[1.0]
    assert len(subsets[1.0]) == len(targets)
    counts = {f: np.bincount(targets[sorted(s)], minlength=5).tolist() for f, s in subsets.items()}
    assert counts[0.5] == [50, 25, 10, 4, 2]
    assert counts[0.1] == [10, 5, 2, 1, 1]
    assert counts[0.01] == [1, 1, 1, 1, 1], "at least one image per class"
    again = label_fraction_indices(targets, 0.1, seed=7)
    other = label_fraction_indices(targets, 0.1, seed=8)
    assert again.tolist() == sorted(subsets[0.1]) and again.tolist() != other.tolist()


def test_label_fraction_applies_to_the_training_split_only():
    full = build_data(cfg(name="digits", label_fraction=1.0))
    tenth = build_data(cfg(name="digits", label_fraction=0.1))
    assert tenth.val.indices.tolist() == full.val.indices.tolist()
    assert set(tenth.train.indices) <= set(full.train.indices)
    assert abs(len(tenth.train) - 0.1 * len(full.train)) <= 10


def test_stratified_split_keeps_one_for_training():
    targets = np.array([0, 0, 1])
    val, rest = stratified_split(targets, [0.5], seed=0)
    assert 2 in rest.tolist(), "a class with one image keeps it for training"


def _cifar_batches(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for name, n in (("data_batch_1", 20), ("test_batch", 10)):
        with open(base / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), b"labels": [i % 10 for i in range(n)]}, f)
    return base


def test_cifar_batches_not_on_torchvisions_md5_list_are_not_read(tmp_path):
    _cifar_batches(tmp_path)
    with pytest.raises(DataError, match=r"data_batch_1 is not the official CIFAR-10 data_batch_1 .*MD5"):
        build_data(cfg(name="cifar10", root=str(tmp_path)))


class _Boom:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_a_cifar_batch_that_would_run_code_is_refused_even_unverified(tmp_path):
    base = _cifar_batches(tmp_path)
    with open(base / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Boom(), b"labels": []}, f)
    with pytest.raises(DataError, match="posix.system is not allowed in a CIFAR batch|system is not allowed"):
        build_data(cfg(name="cifar10", root=str(tmp_path), verify=False))
