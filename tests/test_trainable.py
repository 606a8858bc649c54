"""One trial without Ray: metrics per epoch, test split at the end, resume from a checkpoint."""
from __future__ import annotations

import pytest
import torch

from conftest import trial_config
from trainables.trainable import FineTuneTrial


@pytest.fixture
def tiny(base_spec):
    base_spec["model"] = {"name": "resnet18", "weights": "none"}
    base_spec["data"].update(max_images=60, image_size=16)
    base_spec["train"].update(epochs=3, batch_size=16, optimizer="sgd", scheduler="step", step_size=1, gamma=0.5)
    return trial_config(base_spec)


def test_each_epoch_reports_namespaced_metrics_and_test_only_at_the_end(tiny):
    reports = []
    FineTuneTrial(tiny).fit(lambda m, d: reports.append((m, d)), checkpoint=False)
    assert [m["epoch"] for m, _ in reports] == [1, 2, 3]
    for m, _ in reports:
        assert {"train/loss", "train/acc", "val/loss", "val/acc", "images_per_s", "train/lr"} <= set(m)
        assert 0 <= m["val/acc"] <= 1 and m["images_per_s"] > 0
    assert ["test/acc" in m for m, _ in reports] == [False, False, True]
    assert [m["train/lr"] for m, _ in reports] == pytest.approx([2e-3, 1e-3, 5e-4]), "step schedule, per epoch"


def test_resume_continues_from_the_checkpoint_exactly(tiny, tmp_path):
    straight = []
    FineTuneTrial(tiny).fit(lambda m, d: straight.append(m), checkpoint=False)

    first = FineTuneTrial(tiny)
    first.train_one_epoch()
    first.save(str(tmp_path))
    resumed = FineTuneTrial(tiny)
    resumed.load(str(tmp_path))
    assert resumed.epoch == 1
    rest = []
    resumed.fit(lambda m, d: rest.append(m), checkpoint=False)
    assert [m["epoch"] for m in rest] == [2, 3]
    assert [m["train/lr"] for m in rest] == pytest.approx([m["train/lr"] for m in straight[1:]])
    assert rest[-1]["train/loss"] == pytest.approx(straight[-1]["train/loss"], rel=1e-4)
    assert rest[-1]["val/acc"] == pytest.approx(straight[-1]["val/acc"])


def test_a_checkpoint_that_does_not_load_names_the_file(tiny, tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match=r"checkpoint .*checkpoint.pt does not load"):
        FineTuneTrial(tiny).load(str(tmp_path))


def test_a_non_finite_loss_stops_the_trial(tiny):
    trial = FineTuneTrial(tiny)
    with torch.no_grad():
        trial.model.fc.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="loss is nan at epoch 1"):
        trial.train_one_epoch()
