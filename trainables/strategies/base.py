"""What every strategy shares: per-group learning rates, freezing, and eval-mode for frozen parts."""
from __future__ import annotations

from typing import Dict, List, Sequence

from torch import nn

from trainables.models import Backbone
from trainables.registry import Registry
from trainables.strategies.batchnorm import apply_bn_grads, apply_bn_modes


class Strategy:
    """Decides, epoch by epoch, which layer groups train and at which learning rate.

    Group indices count along ``backbone.groups`` (stem = 0, head = last). The learning rate of a
    group at depth ``d`` below the head (head: d = 0) is ``group_lrs[d]`` when the config gives an
    explicit list, else ``lr * lr_decay ** d`` (layer-wise decay, as in ULMFiT / BEiT).
    """

    def __init__(self, backbone: Backbone, cfg: dict, lr: float):
        self.backbone, self.cfg, self.base_lr = backbone, cfg, lr
        self.num_groups = len(backbone.groups)
        lrs = cfg.get("group_lrs")
        # Only the groups that train need a value: group_lr checks the length when asked.
        self._explicit = list(lrs) if lrs is not None else None

    def trainable_groups(self, epoch: int) -> List[int]:
        """Indices of the groups that train during ``epoch`` (1-based)."""
        raise NotImplementedError

    def group_lr(self, index: int) -> float:
        depth = self.num_groups - 1 - index
        if self._explicit is not None:
            if depth >= len(self._explicit):
                raise ValueError(
                    f"strategy.group_lrs has {len(self._explicit)} values (head first) but group "
                    f"{self.backbone.groups[index].name!r} is {depth} below the head"
                )
            return float(self._explicit[depth])
        return self.base_lr * float(self.cfg.get("lr_decay", 1.0)) ** depth

    @property
    def bn_mode(self) -> str:
        return self.cfg.get("bn", "train")

    def apply(self, model: nn.Module, epoch: int) -> List[int]:
        """Set ``requires_grad`` for ``epoch`` and return the indices of the groups that have
        parameters in the optimizer (with ``bn: bn_only``, every group: its BN layers train)."""
        train = set(self.trainable_groups(epoch))
        if self.bn_mode == "bn_only":
            train = set(range(self.num_groups))
        named = dict(model.named_parameters())
        for i, g in enumerate(self.backbone.groups):
            for p in g.params:
                named[p].requires_grad_(i in train)
        apply_bn_grads(model, self.bn_mode, set(self.backbone.head.params))
        return sorted(train)

    def set_modes(self, model: nn.Module) -> None:
        """Train / eval mode of every module for an epoch of training."""
        model.train()
        freeze_frozen_modules(model)
        apply_bn_modes(model, self.bn_mode)

    def param_groups(self, model: nn.Module, indices: Sequence[int]) -> List[Dict]:
        """One optimizer param group per layer group: its trainable parameters, its LR."""
        named = dict(model.named_parameters())
        out = []
        for i in indices:
            params = [named[p] for p in self.backbone.groups[i].params if named[p].requires_grad]
            if params:
                out.append({"params": params, "lr": self.group_lr(i), "base_lr": self.group_lr(i),
                            "name": self.backbone.groups[i].name})
        return out


def freeze_frozen_modules(model: nn.Module) -> None:
    """Put every module whose parameters are all frozen in eval mode.

    A frozen group is a fixed feature extractor: its batch-norm keeps the pretrained running
    statistics and its dropout / stochastic depth is off. Call after ``model.train()``.
    """
    for _, m in model.named_modules():
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            m.eval()


STRATEGIES: Registry[type] = Registry("strategy")
