"""Strategy 2: gradual unfreezing (ULMFiT, Howard & Ruder 2018).

Training starts with the head (plus the last ``start_groups`` groups); one more group, moving
down towards the stem, unfreezes every ``unfreeze_every`` epochs (or at the epochs listed in
``unfreeze_at``), until ``max_groups`` groups below the head train. A group that unfreezes
joins the optimizer with its own (decayed) LR and, with ``train.new_group_warmup``, warms up.
"""
from __future__ import annotations

from typing import List, Literal, Optional

from pydantic import Field

from trainables.config import StrategyConfig
from trainables.strategies.base import STRATEGIES, Strategy


class GradualUnfreezeConfig(StrategyConfig):
    name: Literal["gradual_unfreeze"] = "gradual_unfreeze"
    start_groups: int = Field(0, ge=0)  # groups below the head that train from the start
    unfreeze_every: int = Field(1, ge=1)  # one more group every N epochs
    unfreeze_at: Optional[List[int]] = None  # or: the epochs at which one more group unfreezes
    max_groups: Optional[int] = Field(None, ge=0)  # how far down unfreezing goes (default: all)


@STRATEGIES.register("gradual_unfreeze", config=GradualUnfreezeConfig)
class GradualUnfreeze(Strategy):
    def __init__(self, backbone, cfg: GradualUnfreezeConfig, lr: float):
        super().__init__(backbone, cfg, lr)
        body = len(backbone.body)
        cfg = self.cfg
        self.start, self.every = cfg.start_groups, cfg.unfreeze_every
        self.at = sorted(cfg.unfreeze_at or [])
        self.limit = body if cfg.max_groups is None else cfg.max_groups
        if not 0 <= self.start <= self.limit <= body:
            raise ValueError(
                f"gradual_unfreeze needs 0 <= strategy.start_groups ({self.start}) <= strategy.max_groups "
                f"({self.limit}) <= {body}, the layer groups below the head of this backbone"
            )

    def body_groups_at(self, epoch: int) -> int:
        """How many groups below the head train during ``epoch`` (1-based)."""
        events = sum(e <= epoch for e in self.at) if self.at else (epoch - 1) // self.every
        return min(self.limit, self.start + events)

    def trainable_groups(self, epoch: int) -> List[int]:
        n = self.num_groups
        return list(range(n - 1 - self.body_groups_at(epoch), n))
