"""Optimizers by name (learning-rate schedules: trainables/schedules.py)."""
from __future__ import annotations

from typing import Any, Callable, Dict, List

from trainables.config import TrainConfig
from trainables.registry import Registry

OPTIMIZERS: Registry[Callable[[List[Dict], TrainConfig], Any]] = Registry("optimizer")


@OPTIMIZERS.register("adam")
def _adam(groups, cfg: TrainConfig):
    import torch

    # torch's Adam adds L2 to the gradient; AdamW decouples it (Loshchilov & Hutter).
    return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("adamw")
def _adamw(groups, cfg: TrainConfig):
    import torch

    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("sgd")
def _sgd(groups, cfg: TrainConfig):
    import torch

    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.weight_decay)


def build_optimizer(groups: List[Dict], cfg: Any):
    cfg = cfg if isinstance(cfg, TrainConfig) else TrainConfig.model_validate(cfg)
    return OPTIMIZERS.get(cfg.optimizer)(groups, cfg)
