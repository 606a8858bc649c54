"""Strategy 2: gradual unfreezing (ULMFiT, Howard & Ruder 2018).

Training starts with the head (plus the last ``start_groups`` groups); one more group, moving
down towards the stem, unfreezes every ``unfreeze_every`` epochs (or at the epochs listed in
``unfreeze_at``), until ``max_groups`` groups below the head train. A group that unfreezes
joins the optimizer with its own (decayed) LR and, with ``train.new_group_warmup``, warms up.
"""
from __future__ import annotations

from typing import List

from trainables.strategies.base import STRATEGIES, Strategy


@STRATEGIES.register("gradual_unfreeze")
class GradualUnfreeze(Strategy):
    def __init__(self, backbone, cfg, lr):
        super().__init__(backbone, cfg, lr)
        body = len(backbone.body)
        self.start = int(cfg.get("start_groups", 0))
        self.every = int(cfg.get("unfreeze_every", 1))
        self.at = sorted(int(e) for e in cfg.get("unfreeze_at") or [])
        self.limit = body if cfg.get("max_groups") is None else int(cfg["max_groups"])
        if not 0 <= self.start <= self.limit <= body:
            raise ValueError(
                f"gradual_unfreeze needs 0 <= strategy.start_groups ({self.start}) <= strategy.max_groups "
                f"({self.limit}) <= {body}, the layer groups below the head of this backbone"
            )
        if self.every < 1:
            raise ValueError(f"strategy.unfreeze_every must be >= 1, got {self.every}")

    def body_groups_at(self, epoch: int) -> int:
        """How many groups below the head train during ``epoch`` (1-based)."""
        events = sum(e <= epoch for e in self.at) if self.at else (epoch - 1) // self.every
        return min(self.limit, self.start + events)

    def trainable_groups(self, epoch: int) -> List[int]:
        n = self.num_groups
        return list(range(n - 1 - self.body_groups_at(epoch), n))
