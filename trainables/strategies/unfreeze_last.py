"""Strategy 1: fine-tune the head and the last ``l`` layer groups at once (l = 0: linear probe)."""
from __future__ import annotations

from typing import List, Literal

from pydantic import Field

from trainables.config import StrategyConfig
from trainables.strategies.base import STRATEGIES, Strategy


class UnfreezeLastConfig(StrategyConfig):
    name: Literal["unfreeze_last"] = "unfreeze_last"
    unfreeze_last: int = Field(0, ge=0)  # layer groups below the head that train (0 = linear probe)


@STRATEGIES.register("unfreeze_last", config=UnfreezeLastConfig)
class UnfreezeLast(Strategy):
    def __init__(self, backbone, cfg: UnfreezeLastConfig, lr: float):
        super().__init__(backbone, cfg, lr)
        body = len(backbone.body)
        self.last = self.cfg.unfreeze_last
        if self.last > body:
            names = ", ".join(g.name for g in backbone.body)
            raise ValueError(
                f"strategy.unfreeze_last={self.last}, but this backbone has {body} layer groups "
                f"below the head ({names}); use 0..{body}"
            )

    def trainable_groups(self, epoch: int) -> List[int]:
        n = self.num_groups
        return list(range(n - 1 - self.last, n))
