"""LoRA: low-rank adapters on the frozen body, the head trained in full (trainables/lora.py
has the math).

The adapted layers are the ``nn.Linear`` / ``nn.Conv2d`` modules (grouped and depthwise convs
included) whose name matches one of ``targets`` (fnmatch on ``named_modules`` names, or
``re:<regex>``) and that lie in the last ``target_groups`` layer groups below the head (both
filters apply: default every such layer of the body). The head is never adapted: it trains.
Every base weight, bias and norm layer stays frozen; batch-norm keeps its ImageNet statistics
(in eval mode) unless ``bn`` is ``stats_only`` (statistics re-estimated) or ``bn_only`` (BN
affine parameters train too).

``rank: full`` is the full-rank end of the same axis: no adapters, every parameter of the
target groups trains (exactly strategy ``unfreeze_last`` with l = ``target_groups``; the
patterns do not apply). So one grid over ``rank`` x ``target_groups`` compares LoRA ranks with
full fine-tuning (``full`` x ``all``) and with training the last l groups (``full`` x l).

``alpha`` is fixed, not tied to the rank (default 16, as in most LoRA recipes): the update is
scaled by alpha / rank, so a larger rank gives each direction a smaller step.
"""
from __future__ import annotations

from typing import List, Literal, Union

from pydantic import Field, field_validator

from trainables.config import StrategyConfig
from trainables.strategies.base import STRATEGIES, Strategy


class LoRAConfig(StrategyConfig):
    name: Literal["lora"] = "lora"
    # the adapters' rank; full: no adapters, the target groups train in full
    rank: Union[int, Literal["full"]] = 8
    alpha: float = Field(16.0, gt=0)  # the update is scaled by alpha / rank
    dropout: float = Field(0.0, ge=0, lt=1)  # on A's columns (input features) in training
    # module-name patterns of the layers to adapt (fnmatch, or re:<regex>); "*": every Linear / Conv2d
    targets: List[str] = ["*"]
    # the layer groups below the head that are adapted (the last n; 0: the head alone), or all
    target_groups: Union[int, Literal["all"]] = "all"

    @field_validator("rank", mode="before")
    @classmethod
    def _rank(cls, v):
        if v != "full" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError("an integer >= 1, or full (no adapters: the target groups train in full)")
        return v

    @field_validator("target_groups", mode="before")
    @classmethod
    def _groups(cls, v):
        if v != "all" and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError("an integer >= 0 (the last n layer groups below the head), or all")
        return v

    @field_validator("targets")
    @classmethod
    def _patterns(cls, v: List[str]) -> List[str]:
        import re

        if not v or any(not isinstance(p, str) or not p.strip() for p in v):
            raise ValueError("targets needs one or more module-name patterns, e.g. ['*'] or ['blocks.*.attn.qkv']")
        for p in v:
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as e:
                    raise ValueError(f"targets: {p!r} is not a regular expression ({e})") from None
        return v


@STRATEGIES.register("lora", config=LoRAConfig)
class LoRA(Strategy):
    def __init__(self, backbone, cfg: LoRAConfig, lr: float):
        super().__init__(backbone, cfg, lr)
        body = len(backbone.body)
        n = body if self.cfg.target_groups == "all" else self.cfg.target_groups
        if n > body:
            names = ", ".join(g.name for g in backbone.body)
            raise ValueError(f"strategy.target_groups={n}, but this backbone has {body} layer groups below the head "
                             f"({names}); use 0..{body} or all")
        self.adapted_groups = list(range(body - n, body))
        self.full = self.cfg.rank == "full"
        self.modules: List[tuple] = []  # (module name, group index)
        if not self.full and n > 0:
            from trainables.lora import targets_by_group

            self.modules = targets_by_group(backbone.model, backbone.groups, self.cfg.targets, self.adapted_groups)
            if not self.modules:
                raise ValueError(
                    f"strategy.targets {self.cfg.targets} match no nn.Linear / nn.Conv2d in the layer groups "
                    f"{[backbone.groups[i].name for i in self.adapted_groups]}; module names look like "
                    f"{_examples(backbone.model)}")

    def trainable_groups(self, epoch: int) -> List[int]:
        head = self.num_groups - 1
        if self.full:
            return self.adapted_groups + [head]
        return sorted({g for _, g in self.modules} | {head})

    def prepare(self, model, batches=None) -> None:
        """Add the adapters (a module that has one keeps it: a later phase, the same trial) and
        rename the layer groups' parameters after them."""
        if not self.modules:
            return
        from trainables.lora import add_lora, regroup

        c = self.cfg
        add_lora(model, [m for m, _ in self.modules], int(c.rank), c.alpha, c.dropout)
        regroup(model, self.backbone.groups)

    def apply(self, model, epoch: int) -> List[int]:
        """Adapters and head train; every other parameter is frozen (BN affine too, unless
        ``bn_only``). Returns the groups that have parameters in the optimizer."""
        if self.full:
            return super().apply(model, epoch)
        from trainables.lora import is_lora_param
        from trainables.strategies.batchnorm import apply_bn_grads

        head = set(self.backbone.head.params)
        named = dict(model.named_parameters())
        for name, p in named.items():
            p.requires_grad_(name in head or is_lora_param(name))
        if self.cfg.bn == "bn_only":  # BN affine of every group trains too (it resets the others: set them again)
            apply_bn_grads(model, "bn_only", head)
            for name, p in named.items():
                if is_lora_param(name):
                    p.requires_grad_(True)
        return [i for i, g in enumerate(self.backbone.groups) if any(named[p].requires_grad for p in g.params)]

    def export(self, model):
        """A merged copy: plain ``nn.Linear`` / ``nn.Conv2d``, the original model's keys."""
        from trainables.lora import merged

        return merged(model)


def _examples(model, n: int = 4) -> List[str]:
    from torch import nn

    names = [k for k, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return names[:n] + (["..."] if len(names) > n else [])

