"""Strategy 2 (gradual unfreezing), batch-norm modes and LR schedules on a tiny model."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import trial_config
from trainables.schedules import group_lr, lr_factor
from trainables.trainable import FineTuneTrial


@pytest.fixture
def tiny(base_spec):
    base_spec["model"] = {"name": "resnet18", "weights": "none"}
    base_spec["data"].update(max_images=60, image_size=16)
    base_spec["train"].update(epochs=4, batch_size=16, optimizer="adamw", scheduler="constant", lr=1e-2)
    return base_spec


def groups_of(trial):
    names = {id(p): n for n, p in trial.model.named_parameters()}
    in_opt = {names[id(p)] for g in trial.optimizer.param_groups for p in g["params"]}
    grads = {n for n, p in trial.model.named_parameters() if p.requires_grad}
    return grads, in_opt


def expected(trial, k):
    return {p for g in trial.backbone.groups[len(trial.backbone.groups) - 1 - k:] for p in g.params}


def test_gradual_unfreezing_adds_one_group_per_epoch_up_to_the_limit(tiny):
    tiny["strategy"] = {"name": "gradual_unfreeze", "start_groups": 0, "unfreeze_every": 1, "max_groups": 2, "lr_decay": 0.5}
    trial = FineTuneTrial(trial_config(tiny))
    seen = []
    for epoch, k in zip(range(1, 5), [0, 1, 2, 2]):
        m = trial.train_one_epoch()
        grads, in_opt = groups_of(trial)
        assert grads == expected(trial, k) == in_opt, (epoch, k)
        assert m["train/trainable_groups"] == k + 1
        seen.append([(g["name"], g["lr"]) for g in trial.optimizer.param_groups])
    assert seen[-1] == [("head", 1e-2), ("layer4", 5e-3), ("layer3", 2.5e-3)], "a group joins with its decayed LR"
    assert len(trial.optimizer.state) > 0, "earlier groups kept their Adam state"


def test_unfreeze_at_given_epochs_and_new_group_warmup(tiny):
    tiny["strategy"] = {"name": "gradual_unfreeze", "unfreeze_at": [3], "lr_decay": 1.0}
    tiny["train"]["new_group_warmup"] = 1.0
    trial = FineTuneTrial(trial_config(tiny))
    for k in (0, 0, 1):
        trial.train_one_epoch()
        assert groups_of(trial)[0] == expected(trial, k)
    layer4 = next(g for g in trial.optimizer.param_groups if g["name"] == "layer4")
    assert layer4["joined"] == 2
    # the warm-up ramps the new group over its first epoch: at the end of it, the full LR
    assert layer4["lr"] == pytest.approx(1e-2)
    assert group_lr(trial.config.train, 1e-2, 2, 2.0, 4.0, 2.25) == pytest.approx(2.5e-3)


def test_gradual_unfreezing_resumes_with_the_same_param_groups(tiny, tmp_path):
    tiny["strategy"] = {"name": "gradual_unfreeze", "unfreeze_every": 1, "lr_decay": 0.5}
    straight = []
    FineTuneTrial(trial_config(tiny)).fit(lambda m, d: straight.append(m), checkpoint=False)
    first = FineTuneTrial(trial_config(tiny))
    first.train_one_epoch(), first.train_one_epoch()
    first.save(str(tmp_path))
    resumed = FineTuneTrial(trial_config(tiny))
    resumed.load(str(tmp_path))
    assert [g["name"] for g in resumed.optimizer.param_groups] == ["head", "layer4"]
    rest = []
    resumed.fit(lambda m, d: rest.append(m), checkpoint=False)
    assert [m["train/loss"] for m in rest] == pytest.approx([m["train/loss"] for m in straight[2:]], rel=1e-4)


def test_gradual_unfreezing_refuses_impossible_limits(tiny):
    tiny["strategy"] = {"name": "gradual_unfreeze", "start_groups": 3, "max_groups": 2}
    with pytest.raises(ValueError, match="start_groups"):
        FineTuneTrial(trial_config(tiny))


@pytest.mark.parametrize("mode, frozen_stats_move, trained_bn_affine", [
    ("train", False, True), ("frozen", False, False), ("stats_only", True, False), ("bn_only", True, True),
])
def test_bn_modes(tiny, mode, frozen_stats_move, trained_bn_affine):
    tiny["strategy"] = {"name": "unfreeze_last", "unfreeze_last": 1, "bn": mode}
    tiny["train"]["epochs"] = 1
    trial = FineTuneTrial(trial_config(tiny))
    m = trial.model
    frozen_bn, trained_bn = m.layer2[0].bn1, m.layer4[0].bn1  # layer2 is frozen, layer4 trains
    before = (frozen_bn.running_mean.clone(), trained_bn.weight.detach().clone())
    trial.train_one_epoch()
    assert (not torch.equal(frozen_bn.running_mean, before[0])) == frozen_stats_move
    assert (not torch.equal(trained_bn.weight, before[1])) == trained_bn_affine
    conv_grad = m.layer4[0].conv1.weight.requires_grad
    assert conv_grad == (mode != "bn_only"), "bn_only freezes everything but BN and the head"
    if mode == "bn_only":
        assert m.layer1[0].bn1.weight.requires_grad and m.fc.weight.requires_grad
        assert not m.conv1.weight.requires_grad


@pytest.mark.parametrize("name, points", [
    ("constant", [(0, 1.0), (5, 1.0)]),
    ("step", [(0, 1.0), (0.99, 1.0), (1.0, 0.5), (2.5, 0.25)]),
    ("cosine", [(0, 1.0), (5, 0.5), (10, 0.0)]),
    ("onecycle", [(0, 1 / 25), (3, 1.0), (10, 1 / 25e4)]),
])
def test_schedules(name, points):
    cfg = {"scheduler": name, "gamma": 0.5, "step_size": 1, "onecycle_pct": 0.3}
    for t, want in points:
        assert lr_factor(cfg, t, 10) == pytest.approx(want, abs=1e-9), (name, t)


def test_warmup_and_per_group_scope():
    assert lr_factor({"scheduler": "warmup", "warmup_epochs": 2}, 1.0, 10) == pytest.approx(0.5)
    assert lr_factor({"scheduler": "cosine", "warmup_epochs": 2}, 5, 10) == pytest.approx(0.5)
    shared = {"scheduler": "cosine"}
    per_group = {"scheduler": "cosine", "schedule_scope": "per_group"}
    # a group that joined at epoch 6 of 10: shared is already past the middle, per_group starts its own cosine
    assert group_lr(shared, 1.0, 6, 6.0, 10.0, 6.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.6)))
    assert group_lr(per_group, 1.0, 6, 6.0, 10.0, 6.0) == pytest.approx(1.0)
