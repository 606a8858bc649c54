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


def test_each_epoch_reports_what_trains_and_what_it_costs(tiny):
    """model/params_trainable counts the weights in the trainable groups (the head and the last
    group here), model/params_total all of them; the peak memory is the process's, > 0."""
    reports = []
    trial = FineTuneTrial(tiny)
    trial.fit(lambda m, d: reports.append(m), checkpoint=False)
    named = dict(trial.model.named_parameters())
    groups = trial.backbone.groups
    expected = sum(named[n].numel() for g in groups[-2:] for n in g.params)
    for m in reports:
        assert m["model/params_trainable"] == expected
        assert m["model/params_total"] == sum(p.numel() for p in trial.model.parameters()) > expected
        assert m["train/peak_mem_mb"] > 10
    assert reports[-1]["train/peak_mem_mb"] >= reports[0]["train/peak_mem_mb"], "a peak never falls"


def straight_and_resumed(cfg, folder):
    """The epochs' reports of an uninterrupted trial, and of one saved after its first epoch and
    resumed from that checkpoint in a fresh trial (with the epoch it resumed at)."""
    straight = []
    FineTuneTrial(cfg).fit(lambda m, d: straight.append(m), checkpoint=False)
    first = FineTuneTrial(cfg)
    first.train_one_epoch()
    first.save(str(folder))
    resumed = FineTuneTrial(cfg)
    resumed.load(str(folder))
    at = resumed.epoch
    rest = []
    resumed.fit(lambda m, d: rest.append(m), checkpoint=False)
    return straight, rest, at


def test_resume_continues_from_the_checkpoint_exactly(tiny, tmp_path):
    straight, rest, at = straight_and_resumed(tiny, tmp_path)
    assert at == 1
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


def test_resume_is_exact_with_dataloader_workers_and_augmentation(tiny, tmp_path):
    # every image's random transform runs under its own seed, drawn from the checkpointed generator
    aug = dict(tiny["augment"], hflip=True, rotation=15, crop_scale_min=0.5, batched=False)
    cfg = dict(tiny, data=dict(tiny["data"], num_workers=2), augment=aug)
    assert FineTuneTrial(cfg).loaders["train"].num_workers == 2
    straight, rest, _ = straight_and_resumed(cfg, tmp_path)
    assert [m["train/loss"] for m in rest] == pytest.approx([m["train/loss"] for m in straight[1:]], rel=1e-6)
    again = []
    FineTuneTrial(dict(cfg, data=dict(cfg["data"], num_workers=0))).fit(lambda m, d: again.append(m), checkpoint=False)
    assert [m["train/loss"] for m in again] == pytest.approx([m["train/loss"] for m in straight], rel=1e-6), \
        "the same batches with and without workers"
    # batched in the training process (in-memory images: no worker reads them): the same batches again
    batched = dict(cfg, augment=dict(aug, batched=True))
    trial = FineTuneTrial(batched)
    assert trial.augment is not None and trial.loaders["train"].loader.num_workers == 0
    on_device = []
    trial.fit(lambda m, d: on_device.append(m), checkpoint=False)
    assert [m["train/loss"] for m in on_device] == pytest.approx([m["train/loss"] for m in straight], rel=1e-6)
    (tmp_path / "batched").mkdir()
    _, rest, _ = straight_and_resumed(batched, tmp_path / "batched")
    assert [m["train/loss"] for m in rest] == pytest.approx([m["train/loss"] for m in straight[1:]], rel=1e-6)


def test_replicates_differ_and_a_trial_index_fixes_the_seed(tiny):
    losses = {}
    for index in (0, 1):
        reports = []
        FineTuneTrial(dict(tiny, trial_index=index)).fit(lambda m, d: reports.append(m), checkpoint=False)
        losses[index] = [m["train/loss"] for m in reports]
    assert losses[0] != losses[1], "a replicate is another run, not the same one again"
    same = []
    FineTuneTrial(dict(tiny, trial_index=0, train=dict(tiny["train"], seed=tiny["train"]["seed"] + 1))).fit(
        lambda m, d: same.append(m), checkpoint=False)
    assert [m["train/loss"] for m in same] == pytest.approx(losses[1]), "seed = train.seed + trial index"


def test_checkpoints_load_with_weights_only(tiny, tmp_path):
    trial = FineTuneTrial(tiny)
    trial.train_one_epoch()
    trial.save(str(tmp_path))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "rng", "loader_rng", "components", "strategy"} <= set(state)
