"""Optimizers and learning-rate schedules by name."""
from __future__ import annotations

from typing import Callable, Dict, List

import torch

from trainables.registry import Registry

OPTIMIZERS: Registry[Callable[[List[Dict], dict], torch.optim.Optimizer]] = Registry("optimizer")
SCHEDULERS: Registry[Callable[[torch.optim.Optimizer, dict], object]] = Registry("scheduler")


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


@SCHEDULERS.register("constant")
def _constant(opt, cfg):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


@SCHEDULERS.register("cosine")
def _cosine(opt, cfg):
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(cfg["epochs"])))


@SCHEDULERS.register("step")
def _step(opt, cfg):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=int(cfg.get("step_size", 1)), gamma=float(cfg.get("gamma", 0.1)))


def build_optimizer(groups: List[Dict], cfg: dict) -> torch.optim.Optimizer:
    return OPTIMIZERS.get(cfg.get("optimizer", "adamw"))(groups, cfg)


def build_scheduler(opt: torch.optim.Optimizer, cfg: dict):
    """A scheduler stepped once per epoch."""
    return SCHEDULERS.get(cfg.get("scheduler", "cosine"))(opt, cfg)
