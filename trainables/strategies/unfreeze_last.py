"""Strategy 1: fine-tune the head and the last ``l`` layer groups at once (l = 0: linear probe)."""
from __future__ import annotations

from typing import List

from trainables.strategies.base import STRATEGIES, Strategy


@STRATEGIES.register("unfreeze_last")
class UnfreezeLast(Strategy):
    def __init__(self, backbone, cfg, lr):
        super().__init__(backbone, cfg, lr)
        body = len(backbone.body)
        self.last = int(cfg.get("unfreeze_last", 0))
        if self.last < 0 or self.last > body:
            names = ", ".join(g.name for g in backbone.body)
            raise ValueError(
                f"strategy.unfreeze_last={self.last}, but this backbone has {body} layer groups "
                f"below the head ({names}); use 0..{body}"
            )

    def trainable_groups(self, epoch: int) -> List[int]:
        n = self.num_groups
        return list(range(n - 1 - self.last, n))
