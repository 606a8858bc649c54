"""Optimizers by name (learning-rate schedules: trainables/schedules.py)."""
from __future__ import annotations

from typing import Callable, Dict, List

import torch

from trainables.registry import Registry

OPTIMIZERS: Registry[Callable[[List[Dict], dict], torch.optim.Optimizer]] = Registry("optimizer")


@OPTIMIZERS.register("adam")
def _adam(groups, cfg):
    # torch's Adam adds L2 to the gradient; AdamW decouples it (Loshchilov & Hutter).
    return torch.optim.Adam(groups, lr=cfg["lr"], weight_decay=cfg.get("weight_decay", 0.0))


@OPTIMIZERS.register("adamw")
def _adamw(groups, cfg):
    return torch.optim.AdamW(groups, lr=cfg["lr"], weight_decay=cfg.get("weight_decay", 0.0))


@OPTIMIZERS.register("sgd")
def _sgd(groups, cfg):
    momentum = cfg.get("momentum", 0.9)
    return torch.optim.SGD(
        groups, lr=cfg["lr"], momentum=momentum, nesterov=bool(cfg.get("nesterov", True)) and momentum > 0,
        weight_decay=cfg.get("weight_decay", 0.0),
    )


def build_optimizer(groups: List[Dict], cfg: dict) -> torch.optim.Optimizer:
    return OPTIMIZERS.get(cfg.get("optimizer", "adamw"))(groups, cfg)
