"""Learning-rate schedules as pure functions of training progress.

The loop sets every param group's LR before each step from (progress, the group's base LR,
the epoch it joined). A pure function, not a torch scheduler object, because gradual
unfreezing adds param groups mid-run (torch schedulers track a fixed set of groups) and
because a resumed trial then gets exactly the LRs an uninterrupted one would.

Progress ``t`` counts epochs as a float: 0 at the start, ``epochs`` at the end.
"""
from __future__ import annotations

import math
from typing import Callable

from trainables.config import TrainConfig
from trainables.registry import Registry

SCHEDULES: Registry[Callable[[TrainConfig, float, float], float]] = Registry("scheduler")


@SCHEDULES.register("constant")
def _constant(cfg: TrainConfig, t: float, total: float) -> float:
    return 1.0


@SCHEDULES.register("step")
def _step(cfg: TrainConfig, t: float, total: float) -> float:
    return cfg.gamma ** math.floor(t / cfg.step_size + 1e-9)


@SCHEDULES.register("cosine")
def _cosine(cfg: TrainConfig, t: float, total: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(t / max(total, 1e-9), 1.0)))


@SCHEDULES.register("onecycle")
def _onecycle(cfg: TrainConfig, t: float, total: float) -> float:
    """Smith's one-cycle: up from 1/div to 1 over the first ``onecycle_pct`` of training, then
    cosine down to 1/(div * 1e4), as torch's OneCycleLR (cos annealing, div_factor 25)."""
    pct, div = cfg.onecycle_pct, 25.0
    up = pct * total
    if t < up:
        return 1.0 / div + (1.0 - 1.0 / div) * t / max(up, 1e-9)
    low = 1.0 / (div * 1e4)
    return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * min((t - up) / max(total - up, 1e-9), 1.0)))


@SCHEDULES.register("warmup")
def _warmup(cfg: TrainConfig, t: float, total: float) -> float:
    """Linear warm-up over ``warmup_epochs`` (required), then constant (any schedule can warm
    up too: ``warmup_epochs`` applies to every one)."""
    return 1.0


def warm(t: float, epochs: float) -> float:
    """Linear ramp from 0 to 1 over ``epochs`` of progress (1 when ``epochs`` is 0)."""
    return 1.0 if epochs <= 0 else min(1.0, max(t, 0.0) / epochs)


def lr_factor(cfg: TrainConfig, t: float, total: float) -> float:
    """The schedule's factor at progress ``t`` of ``total`` epochs, with the global warm-up."""
    cfg = _train(cfg)
    return SCHEDULES.get(cfg.scheduler)(cfg, t, total) * warm(t, cfg.warmup_epochs)


def group_lr(cfg: TrainConfig, base_lr: float, joined: float, t: float, total: float, step_t: float) -> float:
    """A param group's LR: its base LR times the schedule and, for a group that joined after
    the start (gradual unfreezing), its own warm-up over ``new_group_warmup`` epochs.

    ``train.schedule_scope: per_group`` runs each group's schedule from the epoch it joined
    to the end; ``shared`` (default) runs one schedule over the whole training."""
    cfg = _train(cfg)
    if cfg.schedule_scope == "per_group":
        f = lr_factor(cfg, t - joined, total - joined)
    else:
        f = lr_factor(cfg, t, total)
    if joined > 0:
        f *= warm(step_t - joined, cfg.new_group_warmup)
    return base_lr * f


def _train(cfg) -> TrainConfig:
    return cfg if isinstance(cfg, TrainConfig) else TrainConfig.model_validate(cfg)
