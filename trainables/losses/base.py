"""Extra losses of the training step, as components.

A component has its own loader (drawn with its own generator), its own state and a weight; the
step sums ``weight * component.loss(...)`` into the supervised loss. Semi-supervised losses use
the images ``data.label_fraction`` left unlabelled (section ``semi``); other losses are listed by
name under ``losses``. A component's state (its generator, anything it accumulates) goes into
the trial's checkpoint.

No torch at module level: the registries are read when a spec is validated.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional

from trainables.config import LossConfig, SemiConfig
from trainables.metrics import TRAIN, key
from trainables.registry import Registry

if TYPE_CHECKING:
    import torch

    from trainables.trainable import FineTuneTrial


class LossComponent:
    """One extra loss. Subclasses implement ``loss``; ``setup`` builds what it needs."""

    def __init__(self, cfg: Any, trial: "FineTuneTrial", seed: int):
        import torch

        self.cfg, self.trial = cfg, trial
        self.generator = torch.Generator().manual_seed(seed)
        self._sums: Dict[str, "torch.Tensor"] = {}
        self._steps = 0

    @property
    def weight(self) -> float:
        return float(self.cfg.weight)

    @property
    def active(self) -> bool:
        """False when the component has nothing to work on (then the step skips it)."""
        return True

    def loss(self, x: "torch.Tensor", y: "torch.Tensor") -> "torch.Tensor":
        """This step's loss; ``x``, ``y`` are the labelled batch (normalised, on the device)."""
        raise NotImplementedError

    def parameters(self) -> List["torch.nn.Parameter"]:
        """Weights of the component's own that train with the model (a pretext task's head):
        the trial gives them one optimizer param group at the phase's ``train.lr``; their values
        belong in ``state_dict``."""
        return []

    # ------------------------------------------------------------------ epoch metrics
    def track(self, **values: "torch.Tensor") -> None:
        """Add this step's values (kept on the device: no host sync per step)."""
        for k, v in values.items():
            self._sums[k] = self._sums.get(k, 0) + v.detach()

    def step_done(self) -> None:
        self._steps += 1

    def epoch_metrics(self) -> Dict[str, float]:
        """The epoch's mean of every tracked value, as ``train/<name>``; then reset."""
        out = {key(TRAIN, k): float(v) / max(self._steps, 1) for k, v in self._sums.items()}
        self._sums, self._steps = {}, 0
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.generator.set_state(state["generator"].cpu())


def next_batch(component: LossComponent, loader_attr: str = "loader", iter_attr: str = "_iter"):
    """The next batch of a component's loader, starting it again when it runs out (an
    unlabelled pool may be smaller than the labelled one)."""
    it: Optional[Any] = getattr(component, iter_attr, None)
    if it is not None:
        try:
            return next(it)
        except StopIteration:
            pass
    it = iter(getattr(component, loader_attr))
    setattr(component, iter_attr, it)
    return next(it)


SEMI: Registry[type] = Registry("semi-supervised method", config_base=SemiConfig)
LOSSES: Registry[type] = Registry("loss", config_base=LossConfig)
