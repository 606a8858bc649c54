"""Batch-norm modes, for every strategy (``strategy.bn``).

- ``train`` (default): a BN layer follows its layer group: it trains (affine parameters and
  running statistics) where its group trains, and is frozen in eval mode where its group is.
- ``frozen``: every BN layer is in eval mode (pretrained statistics) with its affine frozen,
  even in the groups that train.
- ``stats_only``: every BN layer updates its running statistics on the new data (AdaBN-style),
  including in frozen groups; no BN affine parameter trains.
- ``bn_only``: only the BN affine parameters (every group), their running statistics and the
  head train; every other parameter is frozen, whatever the strategy says.

The modes themselves are ``trainables.config.BnMode``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Tuple

if TYPE_CHECKING:
    from torch import nn


def bn_layers(model: "nn.Module") -> Iterator[Tuple[str, "nn.Module"]]:
    from torch.nn.modules.batchnorm import _BatchNorm

    return ((n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm))


def apply_bn_grads(model: "nn.Module", mode: str, head_params: set) -> None:
    """Set ``requires_grad`` for the mode (after the strategy set it per group)."""
    if mode == "bn_only":
        bn_params = {id(p) for _, m in bn_layers(model) for p in m.parameters()}
        for name, p in model.named_parameters():
            p.requires_grad_(id(p) in bn_params or name in head_params)
    elif mode in ("frozen", "stats_only"):
        for _, m in bn_layers(model):
            for p in m.parameters():
                p.requires_grad_(False)


def apply_bn_modes(model: "nn.Module", mode: str) -> None:
    """Set BN layers' train / eval mode; call after ``model.train()`` and the freezing of
    frozen modules (which leaves BN in frozen groups in eval mode: the ``train`` mode)."""
    if mode == "frozen":
        for _, m in bn_layers(model):
            m.eval()
    elif mode in ("stats_only", "bn_only"):
        for _, m in bn_layers(model):
            m.train()
