"""Augmentation, CutMix / MixUp, class imbalance (fractions, weights, over-sampling), metrics."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import trial_config
from trainables.config import AugmentConfig
from trainables.data import DataError, build_data
from trainables.data.loaders import DeviceAugmented, SeededView
from trainables.data.transforms import train_transform
from trainables.metrics import confusion_metrics
from trainables.mixing import BatchMix, class_weights
from trainables.trainable import FineTuneTrial


@pytest.mark.parametrize("alphas", [(1.0, 0.0), (0.0, 0.4), (1.0, 0.4)])
def test_cutmix_mixup_targets_are_soft_and_sum_to_one(alphas):
    torch.manual_seed(0)
    mix = BatchMix(num_classes=5, cutmix_alpha=alphas[0], mixup_alpha=alphas[1], prob=1.0)
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 5
    mixed, soft = mix(x, y)
    assert mixed.shape == x.shape and soft.shape == (8, 5)
    assert torch.allclose(soft.sum(1), torch.ones(8))
    assert (soft.max(1).values < 1).any(), "some rows mix two classes"
    assert not torch.equal(mixed, x)


def test_no_mixing_gives_one_hot_targets():
    mix = BatchMix(num_classes=3, cutmix_alpha=1.0, mixup_alpha=0.0, prob=0.0)
    _, soft = mix(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]))
    assert soft.tolist() == torch.eye(3)[[0, 1, 2, 0]].tolist()


def test_train_transform_only_when_asked_and_only_for_training(base_spec):
    assert train_transform(AugmentConfig(), 16) is None
    tf = train_transform(AugmentConfig(hflip=True, rotation=10, scale_jitter=0.1, crop_scale_min=0.5,
                                       trivial_augment=True, random_erasing=0.5), 16)
    img = torch.randint(0, 255, (3, 16, 16), dtype=torch.uint8)
    torch.manual_seed(0)
    outs = [tf(img) for _ in range(4)]
    assert all(o.shape == (3, 16, 16) and o.dtype == torch.uint8 for o in outs)
    assert any(not torch.equal(o, img) for o in outs)
    base_spec["model"] = {"name": "resnet18", "weights": "none"}
    base_spec["data"].update(image_size=16)
    base_spec["augment"] = {"hflip": True}
    trial = FineTuneTrial(trial_config(base_spec))
    assert isinstance(trial.loaders["train"], DeviceAugmented) and trial.loaders["train"].dataset.transform is None
    assert not isinstance(trial.loaders["val"].dataset, SeededView), "no augmentation outside training"
    base_spec["augment"] = {"hflip": True, "batched": False}
    trial = FineTuneTrial(trial_config(base_spec))
    assert trial.augment is None and trial.loaders["train"].dataset.transform is not None


def test_batched_augmentation_makes_each_image_as_its_per_image_transform_would():
    from trainables.data.transforms import BatchAugment

    tf = train_transform(AugmentConfig(hflip=True, rotation=20, scale_jitter=0.2, crop_scale_min=0.3,
                                       random_erasing=0.7), 24)
    batched = BatchAugment.of(tf)
    x = torch.randint(0, 255, (12, 3, 24, 24), dtype=torch.uint8)
    seeds = [int(s) for s in torch.randint(0, 2**62, (12,), generator=torch.Generator().manual_seed(3))]
    torch.manual_seed(0)
    state = torch.get_rng_state()
    out = batched(x, seeds)
    assert torch.equal(torch.get_rng_state(), state), "the caller's random state is left alone"
    one_by_one = []
    for img, seed in zip(x, seeds):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            one_by_one.append(tf(img))
    assert out.dtype == torch.uint8 and torch.equal(out, torch.stack(one_by_one))
    assert torch.equal(batched(x[5:7], seeds[5:7]), out[5:7]), "an image depends on its own seed alone"
    assert sum(not torch.equal(o, i) for o, i in zip(out, x)) >= 10
    # an op chosen inside the transform (TrivialAugment) cannot be drawn ahead: per image, in workers
    assert BatchAugment.of(train_transform(AugmentConfig(hflip=True, trivial_augment=True), 24)) is None


def test_class_weights_match_the_counts():
    counts = torch.tensor([100, 50, 10])
    inv = class_weights(counts, "inverse")
    assert inv.tolist() == pytest.approx((1 / counts.float() / (1 / counts.float()).mean()).tolist())
    eff = class_weights(counts, "effective", beta=0.99)
    raw = (1 - 0.99) / (1 - 0.99 ** counts.double())
    assert eff.tolist() == pytest.approx((raw * 3 / raw.sum()).tolist(), rel=1e-5)
    assert class_weights(counts, "none") is None
    assert eff[2] > eff[1] > eff[0]


def test_class_fraction_keeps_a_fraction_of_each_cat_breed(pets_root):
    cfg = {"name": "pets", "root": str(pets_root), "image_size": 16, "val_fraction": 0.2, "test_fraction": 0.2, "seed": 0}
    full = build_data(cfg)
    cut = build_data(dict(cfg, class_fraction={"cat": 0.2}))
    assert cut.reduced == [0, 1], "Abyssinian and Bengal are the cat breeds"
    before, after = np.bincount(full.train.targets), np.bincount(cut.train.targets)
    assert after.tolist() == [max(1, int(np.ceil(0.2 * before[0]))), max(1, int(np.ceil(0.2 * before[1]))), before[2], before[3]]
    assert set(cut.train.indices) <= set(full.train.indices)
    assert cut.val.indices.tolist() == full.val.indices.tolist(), "val and test keep every class"
    one = build_data(dict(cfg, class_fraction={"*": 0.5, "Beagle": 1.0}))
    assert np.bincount(one.train.targets)[3] == before[3] and np.bincount(one.train.targets)[0] < before[0]
    with pytest.raises(DataError, match="neither a class nor a group"):
        build_data(dict(cfg, class_fraction={"hamster": 0.5}))


def test_imbalance_remedies_in_a_trial(base_spec, pets_root):
    base_spec["model"] = {"name": "resnet18", "weights": "none"}
    base_spec["data"] = {"name": "pets", "root": str(pets_root), "image_size": 16, "val_fraction": 0.2,
                         "test_fraction": 0.2, "class_fraction": {"cat": 0.2}}
    base_spec["train"].update(class_weighting="inverse", sampler="oversample", epochs=1)
    trial = FineTuneTrial(trial_config(base_spec))
    counts = torch.bincount(torch.as_tensor(trial.data.train.targets), minlength=4).float()
    inverse = 1 / counts
    assert trial.loss_weights.tolist() == pytest.approx((inverse / inverse.mean()).tolist()), "inverse frequency, mean 1"
    sampler = trial.loaders["train"].sampler
    per_class = {}
    for w, t in zip(sampler.weights.tolist(), trial.data.train.targets.tolist()):
        per_class.setdefault(t, set()).add(round(w, 12))
    assert {t: next(iter(v)) for t, v in per_class.items()} == {t: pytest.approx(1 / counts[t].item()) for t in per_class}
    metrics = trial.evaluate("val")
    assert {"val/balanced_acc", "val/macro_f1", "val/acc_reduced", "val/acc_rest"} <= set(metrics)
    assert "val/acc_per_class/Abyssinian" in metrics


def test_mixing_and_label_smoothing_train(base_spec):
    base_spec["model"] = {"name": "resnet18", "weights": "none"}
    base_spec["data"].update(image_size=16, max_images=60)
    base_spec["augment"] = {"cutmix_alpha": 1.0, "mixup_alpha": 0.2}
    base_spec["train"].update(label_smoothing=0.1, epochs=1)
    m = FineTuneTrial(trial_config(base_spec)).train_one_epoch()
    assert np.isfinite(m["train/loss"]) and 0 <= m["train/acc"] <= 1


def test_confusion_metrics():
    confusion = torch.tensor([[8, 2, 0], [1, 1, 0], [0, 0, 4]])  # rows: true
    m = confusion_metrics(confusion, 3.2, "val", ["a", "b", "c"], reduced=[1], per_class=True)
    assert m["val/acc"] == pytest.approx(13 / 16)
    assert m["val/balanced_acc"] == pytest.approx((0.8 + 0.5 + 1.0) / 3)
    f1 = [2 * (8 / 9) * 0.8 / (8 / 9 + 0.8), 2 * (1 / 3) * 0.5 / (1 / 3 + 0.5), 1.0]
    assert m["val/macro_f1"] == pytest.approx(sum(f1) / 3)
    assert m["val/acc_reduced"] == pytest.approx(0.5) and m["val/acc_rest"] == pytest.approx(12 / 14)
    assert m["val/acc_per_class/b"] == pytest.approx(0.5) and m["val/loss"] == pytest.approx(0.2)


def test_label_fraction_leaves_the_rest_unlabelled():
    cfg = {"name": "digits", "image_size": 16, "val_fraction": 0.2, "test_fraction": 0.2, "seed": 0}
    full = build_data(cfg)
    part = build_data(dict(cfg, label_fraction=0.1))
    assert full.unlabeled is None
    labeled, unlabeled = set(part.train.indices), set(part.unlabeled.indices)
    assert not labeled & unlabeled and labeled | unlabeled == set(full.train.indices)


@pytest.mark.parametrize("method", ["pseudo_label", "fixmatch"])
def test_semi_supervised_trial_uses_the_unlabelled_images(base_spec, method):
    base_spec["model"] = {"name": "resnet18", "weights": "none"}
    base_spec["data"].update(image_size=16, max_images=200, label_fraction=0.2)
    base_spec["train"]["epochs"] = 1
    base_spec["semi"] = {"method": method, "threshold": 0.0, "unlabeled_ratio": 2}
    trial = FineTuneTrial(trial_config(base_spec))
    assert trial.components["semi"].loader.batch_size == 2 * base_spec["train"]["batch_size"]
    m = trial.train_one_epoch()
    assert m["train/mask_rate"] == pytest.approx(1.0), "threshold 0: every prediction teaches"
    assert np.isfinite(m["train/unlabeled_loss"]) and m["train/unlabeled_loss"] > 0
    base_spec["semi"]["threshold"] = 1.0
    m = FineTuneTrial(trial_config(base_spec)).train_one_epoch()
    assert m["train/mask_rate"] < 0.05 and m["train/unlabeled_loss"] < 1e-3, "nothing is that confident"


def test_semi_supervised_without_unlabelled_images_is_plain_training(base_spec):
    base_spec["model"] = {"name": "resnet18", "weights": "none"}
    base_spec["data"].update(image_size=16, max_images=60)
    base_spec["semi"] = {"method": "fixmatch"}
    trial = FineTuneTrial(trial_config(base_spec))
    assert "semi" not in trial.components, "no unlabelled images: the semi-supervised loss is left out"
