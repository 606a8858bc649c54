"""Several targets on one backbone (trainables/tasks.py): key points through augmentation and
the resize every image gets, per-task metrics on a hand-made example, the table data sets
(CSV, Parquet, synthetic faces), the single-task default, resume, and each study shrunk."""
from __future__ import annotations

import contextlib
import copy
import math
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from conftest import SEARCH_SPACES, offline_command, run_cli, save_jpeg, trial_config
from orchestrator.spec import SpecError, load_specs, validate
from trainables.config import ClassTarget, KeypointsTarget, RegressionTarget
from trainables.data import DataError, build_data
from trainables.data.images import TableImageSet, TensorImageSet
from trainables.data.table import FLIP_PAIRS_68, Table, face_template, synthetic_faces
from trainables.tasks import KeypointsTask, KeyPointTransform, Tasks, square_points
from trainables.trainable import FineTuneTrial

torch.set_num_threads(1)

# 160 drawn faces at 32 px, a pretrained EfficientNet-Lite0, 2 epochs: age + gender + 68 points.
FACES = {
    "name": "faces",
    "data": {"name": "synthetic_faces", "images": 160, "image_size": 32, "val_fraction": 0.25, "test_fraction": 0.25,
             "num_workers": 0},
    "model": {"name": "timm:tf_efficientnet_lite0", "weights": "imagenet"},
    "strategy": {"name": "unfreeze_last", "unfreeze_last": 1},
    "train": {"epochs": 2, "batch_size": 16, "lr": 2e-3},
    "targets": {"age": {"kind": "regression", "column": "age"}, "gender": {"kind": "class", "column": "gender"},
                "face": {"kind": "keypoints", "column_range": ["0", "135"], "flip_pairs": FLIP_PAIRS_68}},
    "search": {"metric": "val/age/mae"},
}


def faces(**sections):
    """FACES with ``sections`` on top: targets and strategy replaced, the others merged."""
    spec = copy.deepcopy(FACES)
    for k, v in sections.items():
        spec[k] = v if k in ("targets", "strategy") or not isinstance(v, dict) else {**spec.get(k, {}), **v}
    return spec


def run(cfg):
    reports = []
    trial = FineTuneTrial(cfg)
    trial.fit(lambda m, d: reports.append(m), checkpoint=False)
    return trial, reports


# --------------------------------------------------------------------------- key points move with the pixels


def points_task(points: int, first_col: int, flip_pairs=()):
    task = KeypointsTask("pts", KeypointsTarget(columns=[str(i) for i in range(2 * points)], flip_pairs=flip_pairs))
    task.points = points
    task.cols = slice(first_col, first_col + 2 * points)
    return task


def test_key_points_follow_a_horizontal_flip_and_swap_their_pairs():
    from torchvision.transforms import v2

    S = 32
    pts = [(5, 9), (20, 4), (12, 30)]  # pixels of the 32 x 32 input; points 0 and 1 are a left / right pair
    image = torch.zeros(3, S, S, dtype=torch.uint8)
    for x, y in pts:
        image[:, y, x] = 255
    target = torch.tensor([33.0] + [c / S for p in pts for c in p])  # another task's column first, then x0, y0, ...
    flip = KeyPointTransform(v2.Compose([v2.RandomHorizontalFlip(p=1.0)]), [points_task(3, 1, [(0, 1)])], S)
    x, y = flip(image, target)
    # by hand: x -> 31 - x (torchvision's pixel convention), y kept; then points 0 and 1 swap
    flipped = [(31 - 20, 4), (31 - 5, 9), (31 - 12, 30)]
    assert y[0] == 33.0, "the other task's column is left alone"
    assert (y[1:] * S).tolist() == pytest.approx([c for p in flipped for c in p])
    for px, py in flipped:  # the pixels went where the points went
        assert x[0, py, px] == 255
    assert int((x[0] == 255).sum()) == 3
    assert (target[1:] * S).tolist() == pytest.approx([c for p in pts for c in p]), "the input is not changed"
    # without flip pairs the order stays
    _, y = KeyPointTransform(v2.Compose([v2.RandomHorizontalFlip(p=1.0)]), [points_task(3, 1)], S)(image, target)
    assert (y[1:3] * S).tolist() == pytest.approx([26, 9])


def test_key_points_follow_a_resize():
    from torchvision.transforms import v2

    S = 32
    target = torch.tensor([12 / S, 10 / S, 16 / S, 16 / S])
    image = torch.zeros(3, S, S, dtype=torch.uint8)
    crop_resize = KeyPointTransform(v2.Compose([v2.CenterCrop(16), v2.Resize(S)]), [points_task(2, 0)], S)
    _, y = crop_resize(image, target)
    # by hand: the crop starts at (8, 8), then x2: (12, 10) -> (4, 2) -> (8, 4); (16, 16) -> (8, 8) -> (16, 16)
    assert (y * S).tolist() == pytest.approx([8, 4, 16, 16])
    _, y = KeyPointTransform(v2.Compose([v2.Resize(16)]), [points_task(2, 0)], S)(image, target)
    assert y.tolist() == pytest.approx(target.tolist()), "a plain resize keeps coordinates relative to the image"


def test_the_resize_and_centre_crop_of_every_image_move_the_table_points():
    """A 96 x 80 image at 32 px: resized to 38 x 32 (torchvision truncates), 3 columns cropped on
    the left; by hand, and as torchvision's own key-point kernels do it."""
    from torchvision import tv_tensors
    from torchvision.transforms.v2 import functional as F

    x, y = square_points(np.array([48.0, 10.0]), np.array([40.0, 20.0]), 96, 80, 32)
    assert x.tolist() == pytest.approx([48 * 38 / 96 - 3, 10 * 38 / 96 - 3])
    assert y.tolist() == pytest.approx([16, 8])
    for w, h, s in [(96, 80, 32), (80, 120, 48), (57, 101, 64), (64, 64, 64)]:
        pts = torch.tensor([[3.0, 7.0], [w - 1.0, h - 1.0], [w / 3, h / 2]])
        moved = F.center_crop(F.resize(tv_tensors.KeyPoints(pts, canvas_size=(h, w)), [s]), [s, s])
        x, y = square_points(pts[:, 0].numpy(), pts[:, 1].numpy(), w, h, s)
        assert np.stack([x, y], 1) == pytest.approx(moved.numpy(), abs=1e-4)


def test_the_training_loader_moves_points_with_the_pixels():
    """Through the trial's own loader (hflip, seeded per image): a point of a face lands where
    its pixel went; the synthetic faces are symmetric under 300-W's flip pairs."""
    cfg = trial_config(faces(augment={"hflip": True}, train={"epochs": 1, "batch_size": 8}))
    trial = FineTuneTrial(cfg)
    face = trial.tasks.tasks[2]
    S = 32
    base = trial.data.train
    loader = trial.loaders["train"]
    flips = 0
    for (i, seed) in list(loader.sampler)[:16]:
        x0, y0 = base[i]
        x1, y1 = loader.dataset[(i, seed)]
        cols = face.cols
        before, after = (y0[cols] * S).view(-1, 2), (y1[cols] * S).view(-1, 2)
        if torch.equal(x1, x0):
            assert torch.allclose(after, before)
        else:
            flips += 1
            assert torch.equal(x1, x0.flip(-1))
            perm = face.perm()
            assert torch.allclose(after[:, 0], (S - 1) - before[perm, 0], atol=1e-4)
            assert torch.allclose(after[:, 1], before[perm, 1], atol=1e-4)
        assert torch.equal(y1[: cols.start], y0[: cols.start]), "age and gender do not move"
    assert 0 < flips < 16
    t = face_template()
    for a, b in FLIP_PAIRS_68:
        assert t[a] == pytest.approx([-t[b, 0], t[b, 1]])


# --------------------------------------------------------------------------- metrics on a hand-made example


def hand_made_tasks(weights=(1.0, 1.0, 1.0)):
    """Six images with a class (one missing), a value (one missing), two key points (one missing)."""
    S = 8
    columns = {
        "kind": np.array(["a", "a", "b", "b", "c", None], dtype=object),
        "value": np.array([10.0, 14.0, 6.0, np.nan, 12.0, 8.0]),
        "x0": np.array([0.4, 0.6, 0.5, 0.5, 0.5, 0.5]), "y0": np.full(6, 0.5), "x1": np.full(6, 0.25),
        "y1": np.array([0.75] * 5 + [np.nan]),
    }
    table = Table(columns, "hand-made", sizes=np.full((6, 2), float(S)))
    images = TableImageSet(TensorImageSet(np.zeros((6, 3, S, S), np.uint8), np.zeros(6), S), table, np.zeros(6, int))
    data = SimpleNamespace(train=images, val=images, test=images)
    targets = {"kind": ClassTarget(column="kind", weight=weights[0]),
               "value": RegressionTarget(column="value", center=10, scale=2, weight=weights[1]),
               "pts": KeypointsTarget(columns=["x0", "y0", "x1", "y1"], units="relative", loss="l1", weight=weights[2])}
    return Tasks(targets, data, S), data


def test_per_task_metrics_on_a_hand_made_example():
    tasks, data = hand_made_tasks(weights=(1.0, 0.5, 2.0))
    assert tasks.width == 3 + 1 + 4
    y = torch.stack([data.val[i][1] for i in range(6)])
    out = torch.zeros(6, 8)
    # class: true a a b b c -; predicted a b b b a c
    logits = torch.full((6, 3), -2.0)
    for i, c in enumerate([0, 1, 1, 1, 0, 2]):
        logits[i, c] = 2.0
    out[:, 0:3] = logits
    # regression: predicted 10 + 2 z = 10 12 10 10 11 10 against 10 14 6 - 12 8
    out[:, 3] = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.5, 0.0])
    # key points: learnt about the mean shape (0.5, 0.5), (0.25, 0.75), in units of the spread of
    # the 23 coordinates about it (only x0 of images 0 and 1 differ, by 0.1)
    pts = tasks.tasks[2]
    spread = math.sqrt(2 * 0.1**2 / 23)
    assert pts.center.tolist() == pytest.approx([0.5, 0.5, 0.25, 0.75]) and pts.scale == pytest.approx(spread)
    # true: image 0 (0.4, 0.5), (0.25, 0.75); it predicts (0.4, 0.8), (0.55, 1.15); the others exact
    rel = y[:, pts.cols].nan_to_num(0.75).clone()
    rel[0] = torch.tensor([0.4, 0.8, 0.55, 1.15])
    out[:, 4:8] = (rel - pts.center) / spread
    trial = SimpleNamespace(model=torch.nn.Identity(), device=torch.device("cpu"), loaders={"val": [(out, y)]},
                            inputs=lambda x: x, autocast=contextlib.nullcontext,
                            forward=torch.nn.Identity(), phase_cfg=SimpleNamespace(train=SimpleNamespace(per_class_metrics=True)))
    m = tasks.evaluate(trial, "val")
    assert m["val/kind/acc"] == pytest.approx(3 / 5)
    # per class: a P 1/2 R 1/2, b P 2/3 R 1, c P 0 R 0
    assert m["val/kind/macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert m["val/kind/balanced_acc"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert m["val/kind/acc_per_class/b"] == pytest.approx(1.0)
    ce = torch.nn.functional.cross_entropy(logits[:5], torch.tensor([0, 0, 1, 1, 2]))
    assert m["val/kind/loss"] == pytest.approx(float(ce), rel=1e-5)
    assert m["val/value/mae"] == pytest.approx((0 + 2 + 4 + 1 + 2) / 5)
    assert m["val/value/loss"] == pytest.approx((0 + 2 + 4 + 1 + 2) / 5 / 2), "L1 on (value - 10) / 2"
    assert m["val/pts/nme"] == pytest.approx((0.3 + 0.5) / 11), "11 points seen, distances over the image size"
    assert m["val/pts/loss"] == pytest.approx((0.3 + 0.3 + 0.4) / spread / 23, rel=1e-5), "L1 in spreads, 23 coordinates"
    assert m["val/loss"] == pytest.approx(m["val/kind/loss"] + 0.5 * m["val/value/loss"] + 2 * m["val/pts/loss"])
    # the training loss is the same weighted sum, and each task's part is kept for the epoch
    total = tasks.loss(out, y)
    assert float(total) == pytest.approx(m["val/loss"], rel=1e-5)
    per = tasks.epoch_metrics()
    assert per["train/value/loss"] == pytest.approx(m["val/value/loss"])
    assert tasks.epoch_metrics() == {}, "reset after the epoch"


def test_a_regression_is_standardised_by_the_training_split():
    columns = {"v": np.array([1.0, 3.0, 5.0, np.nan])}
    table = Table(columns, "t", sizes=np.full((4, 2), 8.0))
    images = TableImageSet(TensorImageSet(np.zeros((4, 3, 8, 8), np.uint8), np.zeros(4), 8), table, np.zeros(4, int))
    tasks = Tasks({"v": RegressionTarget(column="v")}, SimpleNamespace(train=images, val=images, test=images), 8)
    task = tasks.tasks[0]
    assert (task.center, task.scale) == pytest.approx((3.0, math.sqrt(8 / 3)))


# --------------------------------------------------------------------------- table data sets


@pytest.fixture
def face_table(tmp_path):
    """12 JPEGs (40 x 30) and a UTKFace-style CSV of them with a key point."""
    rows = []
    for i in range(12):
        save_jpeg(tmp_path / "img" / f"{i}.jpg", (20 * i, 100, 50), size=30, seed=i)
        rows.append({"file": f"{i}.jpg", "age": 20 + i, "gender": ["f", "m"][i % 2], "nose_x": 15.0, "nose_y": 10.0})
    import pandas as pd

    frame = pd.DataFrame(rows)
    frame.to_csv(tmp_path / "labels.csv", index=False)
    return tmp_path, frame


def test_table_reads_a_csv_with_its_classes_and_sizes(face_table):
    root, _ = face_table
    data = build_data({"name": "table", "file": str(root / "labels.csv"), "root": str(root / "img"),
                       "image_column": "file", "label_column": "gender", "image_size": 16, "cache": "off"})
    assert data.classes == ["f", "m"] and len(data.train) + len(data.val) + len(data.test) == 12
    table = data.train.table()
    assert table.sizes().tolist() == [[30.0, 30.0]] * len(data.train)
    assert sorted(table.column("gender")) == sorted(data.classes[t] for t in data.train.targets)
    x, y = data.train[0]
    assert x.shape == (3, 16, 16) and y in (0, 1)
    tasks = Tasks({"age": RegressionTarget(column="age"),
                   "nose": KeypointsTarget(columns=["nose_x", "nose_y"])}, data, 16)
    assert tasks.width == 3
    _, y = data.test[0]
    assert y[1:].tolist() == pytest.approx([0.5, 10 / 30])
    assert float(y[0]) in [20 + i for i in range(12)]


def test_table_reads_parquet_and_the_decoded_image_cache_keeps_the_rows(face_table, tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")
    root, frame = face_table
    frame.to_parquet(root / "labels.parquet")
    monkeypatch.setenv("TL_SWEEP_CACHE", str(tmp_path / "cache"))
    data = build_data({"name": "table", "file": str(root / "labels.parquet"), "root": str(root / "img"),
                       "label_column": "gender", "image_size": 16})
    assert type(data.train).__name__ == "Subset" and type(data.train.base).__name__ == "CachedImageSet"
    tasks = Tasks({"age": RegressionTarget(column="age")}, data, 16)
    ages = data.train.table().column("age")
    assert [float(data.train[i][1][0]) for i in range(len(data.train))] == ages.tolist()
    assert tasks.width == 1


def test_table_errors_name_the_file_the_column_and_what_to_do(face_table, monkeypatch):
    root, frame = face_table
    cfg = {"name": "table", "file": str(root / "labels.csv"), "root": str(root / "img"), "cache": "off"}
    with pytest.raises(DataError, match=r"no file .*nope.csv"):
        build_data(dict(cfg, file=str(root / "nope.csv")))
    with pytest.raises(DataError, match=r"data.label_column 'sex' is not a column of .*labels.csv; its columns: file, age"):
        build_data(dict(cfg, label_column="sex"))
    data = build_data(dict(cfg, label_column="gender"))
    with pytest.raises(DataError, match=r"targets.age.column 'years' is not a column of .*labels.csv"):
        Tasks({"age": RegressionTarget(column="years")}, data, 16)
    with pytest.raises(DataError, match=r"targets.g.column 'gender' of .*labels.csv holds text \('f'\), not numbers"):
        Tasks({"g": RegressionTarget(column="gender")}, data, 16)
    with pytest.raises(DataError, match=r"flip_pairs: point 1, but the task has 1 points"):
        Tasks({"n": KeypointsTarget(column_range=["nose_x", "nose_y"], flip_pairs=[[0, 1]])}, data, 16)
    (root / "img" / "3.jpg").unlink()
    with pytest.raises(DataError, match=r"1 of 12 image\(s\) not found, e.g. .*3.jpg"):
        build_data(dict(cfg, label_column="gender"))
    (root / "labels.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    with pytest.raises(DataError, match=r"labels.parquet is Parquet: reading it needs pyarrow \(pip install pyarrow\)"):
        build_data(dict(cfg, file=str(root / "labels.parquet")))


def test_synthetic_faces_are_made_from_the_seed():
    a, ca = synthetic_faces(20, 0)
    b, cb = synthetic_faces(20, 0)
    c, _ = synthetic_faces(20, 1)
    assert a.shape == (20, 3, 80, 96) and np.array_equal(a, b) and not np.array_equal(a, c)
    assert all(np.array_equal(ca[k], cb[k]) for k in ca)
    assert set(ca) >= {"file", "age", "gender", "race", "0", "135"}
    assert ca["age"].min() >= 1 and ca["age"].max() <= 90


def test_check_finds_a_missing_column_before_the_sweep_starts():
    from trainables.check import CheckError, check

    cfg = trial_config(faces(targets={"age": {"kind": "regression", "column": "years"}}))
    with pytest.raises(CheckError, match=r"targets: targets.age.column 'years' is not a column of synthetic_faces"):
        check([cfg])
    found, = check([trial_config(faces())])
    assert found["classes"] == 1 + 2 + 136, "the head's width: age, 2 gender logits, 68 points"


# --------------------------------------------------------------------------- the spec


def test_per_task_metrics_are_valid_sweep_metrics_with_their_natural_mode():
    assert validate(faces(search={"metric": "val/age/mae"})).search.mode == "min"
    assert validate(faces(search={"metric": "val/face/nme"})).search.mode == "min"
    assert validate(faces(search={"metric": "val/gender/macro_f1"})).search.mode == "max"
    assert validate(faces(search={"metric": "train/face/loss"})).search.mode == "min"
    for metric, needle in [("val/acc", "'val/acc' is not reported with these targets; use one of val/loss"),
                           ("val/age/acc", "'val/age/acc' is not reported with these targets"),
                           ("val/height/mae", "'val/height/mae' is not reported")]:
        with pytest.raises(SpecError, match=needle):
            validate(faces(search={"metric": metric}))
    with pytest.raises(SpecError, match="'val/age/mae' is not reported without targets"):
        validate({"name": "x", "search": {"metric": "val/age/mae"}})


@pytest.mark.parametrize("sections, needle", [
    ({"augment": {"mixup_alpha": 0.2}}, "augment.cutmix_alpha / augment.mixup_alpha (they mix class labels)"),
    ({"train": {"class_weighting": "inverse"}}, "train.class_weighting"),
    ({"semi": {"method": "fixmatch"}, "data": {"label_fraction": 0.5}}, "semi.method"),
    ({"augment": {"trivial_augment": True}}, "augment.trivial_augment (it cannot move key points"),
    ({"strategy": {"name": "masked", "method": "fisher"}}, "strategy.method fisher (its scores come from the cross-entropy"),
    ({"data": {"name": "digits"}}, "targets: data set 'digits' has no columns to learn"),
    ({"targets": {}}, "data.name synthetic_faces: set data.label_column"),
    ({"targets": {"age": {"kind": "ordinal", "column": "age"}}}, "targets.age.kind: kind must be one of class, regression"),
    ({"targets": {"p": {"kind": "keypoints"}}}, "targets.p: give the x, y columns either as columns"),
    ({"targets": {"age": {"kind": "regression", "column": "age", "loss": "huber"}}}, "targets.age.loss: Input should be"),
])
def test_combinations_that_need_one_classification_task_are_refused(sections, needle):
    spec = faces(**{k: v for k, v in sections.items() if k != "data"})
    if "data" in sections:
        spec["data"] = {**({} if "name" in sections["data"] else spec["data"]), **sections["data"]}
    if sections.get("targets") == {}:
        spec["search"] = {"metric": "val/acc"}
    with pytest.raises(SpecError) as e:
        validate(spec)
    assert any(needle in p for p in e.value.problems), e.value.problems


# --------------------------------------------------------------------------- the trial


def test_a_trial_reports_every_task_each_epoch_and_test_at_the_end():
    trial, reports = run(trial_config(faces()))
    assert trial.tasks is not None and trial.model.get_classifier().out_features == 139
    for m in reports:
        assert {"train/loss", "val/loss", "train/age/loss", "train/gender/loss", "train/face/loss", "val/age/mae",
                "val/gender/acc", "val/gender/macro_f1", "val/face/nme", "model/params_trainable"} <= set(m)
        assert "train/acc" not in m and "val/acc" not in m
        assert 0 <= m["val/gender/acc"] <= 1 and 0 < m["val/face/nme"] < 1 and m["val/age/mae"] > 0
    assert ["test/face/nme" in m for m in reports] == [False, True]


def test_one_class_target_trains_exactly_as_the_default_classification_task():
    """The multi-task path reduces to today's: a lone class target on the label column gives the
    default trial's losses and accuracies, and the default trial's metrics keep their names."""
    single = faces(targets={}, search={"metric": "val/acc"})
    single["data"]["label_column"] = "gender"
    default, one = run(trial_config(single))
    assert default.tasks is None
    assert {"train/acc", "val/acc", "val/balanced_acc", "val/macro_f1", "val/loss"} <= set(one[-1])
    assert not any(k.count("/") > 1 for k in one[-1] if k.startswith(("val/", "train/"))), "no per-task keys"
    multi = faces(targets={"gender": {"kind": "class", "column": "gender"}}, search={"metric": "val/gender/acc"})
    multi["data"]["label_column"] = "gender"
    _, tasked = run(trial_config(multi))
    for a, b in zip(one, tasked):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5)
        assert b["train/gender/loss"] == pytest.approx(a["train/loss"], rel=1e-5)
        assert b["val/loss"] == pytest.approx(a["val/loss"], rel=1e-5)
        assert (b["val/gender/acc"], b["val/gender/macro_f1"]) == pytest.approx((a["val/acc"], a["val/macro_f1"]))


def test_resume_with_a_multi_task_head_continues_exactly(tmp_path):
    from test_trainable import straight_and_resumed

    # a DataLoader worker runs the key points' transform (pickled with the data set)
    cfg = trial_config(faces(augment={"hflip": True, "rotation": 10}, train={"epochs": 3}, data={"num_workers": 1}))
    straight, rest, at = straight_and_resumed(cfg, tmp_path)
    assert at == 1
    for a, b in zip(straight[1:], rest):
        for k in ("train/loss", "train/face/loss", "val/age/mae", "val/face/nme", "val/gender/acc"):
            assert b[k] == pytest.approx(a[k], rel=1e-5), k


def test_phases_share_the_head_and_a_new_data_set_gets_its_targets():
    cfg = trial_config(faces(train={"epochs": 1}, phases=[
        {"name": "small", "epochs": 1}, {"name": "more", "epochs": 1, "data": {"images": 200, "seed": 1}}]))
    trial, reports = run(cfg)
    assert len(trial.data.train) == 100 and type(trial.data.train).__name__ == "TargetedSet"  # 200 faces, half train
    assert {"small/val/age/mae", "more/val/age/mae", "more/test/face/nme"} <= set(reports[0]) | set(reports[1])


def test_the_feature_cache_keeps_each_images_target_vector(tmp_path, monkeypatch):
    """A linear probe trains on cached features with the tasks' targets beside them, as without
    the cache; key points under a flip make a target per view, so then there is no cache."""
    monkeypatch.setenv("TL_SWEEP_CACHE", str(tmp_path))
    probe = faces(strategy={"name": "unfreeze_last", "unfreeze_last": 0})
    cached, with_cache = run(trial_config(probe))
    assert cached.feature_sets is not None
    off = copy.deepcopy(probe)
    off["strategy"]["feature_cache"] = "off"
    plain, without = run(trial_config(off))
    assert plain.feature_sets is None
    for k in ("train/loss", "val/age/mae", "val/face/nme", "val/gender/acc"):
        assert with_cache[-1][k] == pytest.approx(without[-1][k], rel=1e-3), k
    flipped = copy.deepcopy(probe)
    flipped["augment"] = {"hflip": True}
    flipped["strategy"]["feature_cache_views"] = 2
    assert FineTuneTrial(trial_config(flipped)).feature_sets is None


# --------------------------------------------------------------------------- the studies


@pytest.mark.parametrize("study", ["multitask", "keypoints"])
def test_each_study_header_gives_a_complete_offline_command(study):
    path = SEARCH_SPACES / f"{study}.yaml"
    spec, _ = offline_command(study)
    assert spec.data.name == "synthetic_faces"
    assert spec.model.name == "timm:tf_efficientnet_lite0" and spec.model.weights == "imagenet"
    (full, _, _), = load_specs(path)
    assert full.data.name == "table" and full.targets.keys() == spec.targets.keys()
    assert full.search.metric == spec.search.metric and full.search.mode == "min"
    if study == "keypoints":
        pairs = [tuple(p) for p in full.targets["landmarks"].flip_pairs]
        assert pairs == FLIP_PAIRS_68, "300-W's pairs, as the synthetic faces are drawn"


def offline_sets(study: str):
    return [w for w in offline_command(study)[1] if not w.startswith("storage.path=")]


E2E = {
    "multitask": ({"data": "{name: synthetic_faces, images: 160, image_size: 32, label_column: gender, num_workers: 0}",
                   "search.space.targets.gender.weight": "{grid: [0.25, 4.0]}"},
                  ["val/age/mae", "val/age/loss", "val/gender/acc", "val/gender/macro_f1", "train/age/loss",
                   "test/age/mae", "test/gender/acc"], "targets.gender.weight"),
    "keypoints": ({"data": "{name: synthetic_faces, images: 160, image_size: 32, num_workers: 0}",
                   "search.space.targets.landmarks.loss": "{grid: [smooth_l1, mse]}"},
                  ["val/landmarks/nme", "val/landmarks/loss", "train/landmarks/loss", "test/landmarks/nme"],
                  "targets.landmarks.loss"),
}


@pytest.mark.slow
@pytest.mark.parametrize("study", list(E2E))
def test_study_runs_offline_shrunk_and_logs_each_task(study, tmp_path):
    from test_e2e import mlflow_client, only_sweep, sweep_runs

    extra, metrics, searched = E2E[study]
    sets = offline_sets(study) + [f"{k}={v}" for k, v in {**extra, "train.epochs": "2", "train.batch_size": "16",
                                                          "search.scheduler.grace_period": "1",
                                                          "storage.path": str(tmp_path / "sweeps")}.items()]
    r = run_cli(["run", str(SEARCH_SPACES / f"{study}.yaml"), *[a for s in sets for a in ("--set", s)]], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    storage = tmp_path / "sweeps"
    meta = only_sweep(storage, study)
    client = mlflow_client(storage)
    parent, children = sweep_runs(client, meta)
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert len({c.data.params[searched] for c in children}) == 2
    finished = [c for c in children if c.data.tags.get("tl_sweep.status") == "finished"]
    assert finished
    for c in finished:
        assert set(metrics) <= set(c.data.metrics), sorted(c.data.metrics)
        assert "val/acc" not in c.data.metrics
        history = client.get_metric_history(c.info.run_id, meta["metric"])
        assert sorted(h.step for h in history) == [1, 2], "the sweep's metric every epoch"
    nme_or_mae = [c.data.metrics[meta["metric"]] for c in finished]
    assert all(0 < v < (1 if study == "keypoints" else 90) for v in nme_or_mae)
    assert meta["mode"] == "min"
    # the best trial: its spec re-runs it with its targets; its model is logged, its report written
    best = client.get_run(parent.data.tags["tl_sweep.best_run_id"])
    with open(client.download_artifacts(best.info.run_id, "trial_spec.yaml")) as f:
        assert set(yaml.safe_load(f)["targets"]) == set(yaml.safe_load((SEARCH_SPACES / f"{study}.yaml").read_text())["targets"])
    assert best.data.tags.get("tl_sweep.model_id"), "the multi-task model is logged"
    assert (storage / meta["id"] / "report" / "report.html").is_file()
