"""LoRA (Hu et al. 2021), written here: a low-rank update of a layer's weight, as a
parametrization of that weight (minLoRA's way, ``torch.nn.utils.parametrize``).

A target layer ``m`` (``nn.Linear`` or ``nn.Conv2d``, grouped and depthwise included) keeps its
weight ``W``, frozen, as ``m.parametrizations.weight.original``; ``m.weight`` becomes

    W + (alpha / rank) * (B @ A).view(W.shape)

with ``A`` (rank x fan_in) and ``B`` (out x rank) at ``m.parametrizations.weight.0.lora_A`` /
``lora_B``. ``fan_in`` is every dimension of ``W`` but the first: ``in`` for a Linear,
``in / groups * kh * kw`` for a Conv2d. The update is thus the low-rank factorisation of the
weight seen as an (out x fan_in) matrix, the matrix each output channel's kernel is a row of.
For a grouped or depthwise conv that matrix is the weight as stored ((out, in/groups, kh, kw)),
so one rule covers every conv and the module's own forward stays as it is (loralib and PEFT
build the update per group or not at all, the known failure this avoids). For a depthwise 3x3
conv fan_in is 9: a rank above min(out, 9) adds parameters but no rank. (The other common conv
adapter, a k x k conv to ``rank`` channels then a 1 x 1 conv to ``out``, changes the forward
and does not fold into one grouped conv; the parametrization does.)

``A`` starts Kaiming-uniform (as ``nn.Linear``'s weight, as in loralib), ``B`` at zero: a new
adapter leaves the layer as it was. Dropout: the parametrization sees the weight, not the
layer's input, so the input dropout of the paper is not possible here; as in minLoRA, each
forward in training drops columns of ``A`` (input features, or input-channel x kernel-tap
entries of a conv), one mask for the whole batch, scaled by 1 / (1 - p).

``merge`` folds the updates into the weights (``remove_parametrizations(...,
leave_parametrized=True)``): plain modules, state-dict keys as the original model's.
"""
from __future__ import annotations

import copy
import fnmatch
import math
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

LAYERS = (nn.Linear, nn.Conv2d)
ORIGINAL = ".parametrizations.weight.original"  # where a parametrized module keeps its weight


class LoRAParametrization(nn.Module):
    """``forward(W) = W + (alpha / rank) * (B @ A).view(W.shape)``, for a weight of ``shape``."""

    def __init__(self, shape: Sequence[int], rank: int, alpha: float, dropout: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        out, fan_in = int(shape[0]), math.prod(int(s) for s in shape[1:])
        self.rank, self.alpha, self.dropout = int(rank), float(alpha), float(dropout)
        self.scale = self.alpha / self.rank
        self.lora_A = nn.Parameter(torch.empty(self.rank, fan_in, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out, self.rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta(self) -> torch.Tensor:
        """The update as an (out x fan_in) matrix, scaled (with dropout on A's columns in training)."""
        a = self.lora_A
        if self.training and self.dropout > 0:
            a = a * F.dropout(torch.ones_like(a[:1]), self.dropout, training=True)
        return (self.lora_B @ a) * self.scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().view(weight.shape).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}"


def adapter(module: nn.Module) -> Optional[LoRAParametrization]:
    """The LoRA parametrization of ``module``'s weight, if it has one."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next((p for p in module.parametrizations.weight if isinstance(p, LoRAParametrization)), None)


def base_name(param: str) -> str:
    """A parameter's name as in the model before any parametrization: ``m.parametrizations.
    weight.original`` and ``m.parametrizations.weight.0.lora_A`` are ``m.weight``."""
    module, sep, rest = param.partition(".parametrizations.")
    return f"{module}.{rest.split('.')[0]}" if sep else param


def is_lora_param(name: str) -> bool:
    return ".parametrizations." in name and name.rsplit(".", 1)[-1] in ("lora_A", "lora_B")


def lora_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """Every adapter parameter of ``model``, by name."""
    return {n: p for n, p in model.named_parameters() if is_lora_param(n)}


def _matches(name: str, pattern: str) -> bool:
    """fnmatch on the module's name (``blocks.*.attn.qkv``), or a regex with ``re:`` (full match)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def find_targets(model: nn.Module, patterns: Iterable[str], allowed: Optional[Iterable[str]] = None) -> List[str]:
    """The names of the ``nn.Linear`` / ``nn.Conv2d`` modules (subclasses included) that match
    one of ``patterns``, in model order; only those in ``allowed`` when given. A module whose
    weight has a parametrization other than LoRA (weight norm, ...) is left out."""
    patterns = list(patterns)
    allowed = None if allowed is None else set(allowed)
    out = []
    for name, m in model.named_modules():
        if not name or not isinstance(m, LAYERS) or (allowed is not None and name not in allowed):
            continue
        if parametrize.is_parametrized(m, "weight") and adapter(m) is None:
            continue
        if any(_matches(name, p) for p in patterns):
            out.append(name)
    return out


def add_lora(model: nn.Module, names: Iterable[str], rank: int, alpha: float, dropout: float = 0.0) -> List[str]:
    """Give each named module an adapter; returns the names that got a new one. A module that
    has one already keeps it (and its trained values) when rank and alpha agree, and takes the
    new dropout; another rank or alpha is an error (the update cannot change shape in a trial)."""
    added = []
    for name in names:
        m = model.get_submodule(name)
        have = adapter(m)
        if have is not None:
            if have.rank != rank or have.alpha != float(alpha):
                raise ValueError(f"{name} has a LoRA adapter of rank {have.rank}, alpha {have.alpha} already "
                                 f"(an earlier phase); it cannot become rank {rank}, alpha {alpha}")
            have.dropout = float(dropout)
            continue
        w = m.weight
        p = LoRAParametrization(w.shape, rank, alpha, dropout, device=w.device, dtype=w.dtype)
        parametrize.register_parametrization(m, "weight", p)
        added.append(name)
    return added


def regroup(model: nn.Module, groups: Sequence) -> None:
    """Rename the parameters of layer groups (objects with ``.params``) after parametrizations
    were added: a parametrized weight's original and its adapter's A and B belong to the group
    of the weight. Idempotent; the model's parameter order."""
    owner: Dict[str, int] = {}
    for i, g in enumerate(groups):
        for p in g.params:
            owner[base_name(p)] = i
    new: List[List[str]] = [[] for _ in groups]
    for name, _ in model.named_parameters():
        i = owner.get(base_name(name))
        if i is None:
            raise ValueError(f"parameter {name} belongs to no layer group")
        new[i].append(name)
    for g, params in zip(groups, new):
        g.params = params


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight, in place: the modules become plain ``nn.Linear`` /
    ``nn.Conv2d`` again, with the keys of the original model. Dropout is off while merging."""
    for _, m in list(model.named_modules()):
        p = adapter(m)
        if p is None:
            continue
        if len(m.parametrizations.weight) > 1:
            raise ValueError(f"{type(m).__name__} has parametrizations beside LoRA on its weight; merge them first")
        p.eval()
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return model


def merged(model: nn.Module) -> nn.Module:
    """A merged copy of ``model`` (the model itself when it has no adapter), in eval mode; the
    model is left as it was."""
    if not any(adapter(m) is not None for m in model.modules()):
        return model
    out = copy.deepcopy(model)
    for m in out.modules():
        if adapter(m) is not None:
            # A deep copy shares the parametrized class of each module with the original, and
            # remove_parametrizations deletes the weight's property from that class: the original
            # would lose its weight. The copy gets classes of its own first.
            cls = type(m)
            own = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
            m.__class__ = type(cls.__name__, cls.__bases__, own)
    out.eval()
    return merge(out)


def count(shape: Sequence[int], rank: int) -> int:
    """The parameters an adapter of ``rank`` adds to a weight of ``shape``: rank * (out + fan_in)."""
    return rank * (int(shape[0]) + math.prod(int(s) for s in shape[1:]))


def targets_by_group(model: nn.Module, groups: Sequence, patterns: Iterable[str],
                     group_indices: Iterable[int]) -> List[Tuple[str, int]]:
    """``(module name, group index)`` of the target modules whose weight is in one of
    ``group_indices`` (in model order)."""
    where: Dict[str, int] = {}
    wanted = set(group_indices)
    for i, g in enumerate(groups):
        if i in wanted:
            for p in g.params:
                b = base_name(p)
                if b.endswith(".weight"):
                    where[b[: -len(".weight")]] = i
    return [(n, where[n]) for n in find_targets(model, patterns, where)]
