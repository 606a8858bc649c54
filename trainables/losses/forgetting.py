"""Losses that hold a model to the task before (``losses:`` of a ``next_task`` phase).

- ``l2sp`` (Li, Grandvalet & Davoine 2018, L2-SP): ``weight * sum (w - w0)^2`` over the body's
  weights (every group but the head), ``w0`` the weights as the first task left them. The
  paper's second term, plain L2 on the new head, is ``train.weight_decay``.
- ``lwf`` (Li & Hoiem 2016, Learning without Forgetting): on each training batch of the new
  task, the cross-entropy of the first model's outputs (its own head: the teacher) against the
  current body's outputs through the first task's kept head (the student), both softened by
  ``temperature``. The kept head stays frozen (the paper trains it too): the distillation holds
  the shared body, and the first task is measured through the head it trained.

Both read the phase's previous model (trainables/phases/next_task.py). A weight of 0 leaves the
component out: the phase trains exactly as plain fine-tuning. No torch at module level.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, ClassVar, Literal, Tuple

from pydantic import Field

from trainables.config import LossConfig
from trainables.losses.base import LOSSES, LossComponent

if TYPE_CHECKING:
    import torch
    from torch import nn

    from trainables.trainable import FineTuneTrial


class L2SPConfig(LossConfig):
    name: Literal["l2sp"] = "l2sp"
    weight: float = Field(0.01, ge=0)  # alpha: on the body's squared distance to the first task's weights
    phase_kinds: ClassVar[Tuple[str, ...]] = ("next_task",)


class LwFConfig(LossConfig):
    name: Literal["lwf"] = "lwf"
    weight: float = Field(1.0, ge=0)  # lambda_o
    temperature: float = Field(2.0, gt=0)  # T: the paper's 2
    phase_kinds: ClassVar[Tuple[str, ...]] = ("next_task",)


def _previous_model(trial: "FineTuneTrial", name: str) -> "nn.Module":
    previous = getattr(trial.phase, "previous", None)
    if previous is None:
        raise ValueError(f"losses.{name}: only in a next_task phase (it holds the model to the first task's); "
                         f"put it under that phase's losses")
    return previous


def distillation_loss(student: "torch.Tensor", teacher: "torch.Tensor", temperature: float) -> "torch.Tensor":
    """LwF's L_old: ``-sum softmax(teacher/T) * log softmax(student/T)``, averaged over the batch
    (the KL divergence plus the teacher's entropy, which is constant)."""
    target = (teacher.float() / temperature).softmax(1)
    return -(target * (student.float() / temperature).log_softmax(1)).sum(1).mean()


@contextlib.contextmanager
def bn_stats_kept(model: "nn.Module"):
    """Batch norm normalises with the batch as in training but leaves its running statistics
    alone: the step's supervised forward has already counted this batch."""
    from torch import nn

    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            saved.append((m, m.momentum, m.num_batches_tracked.clone()))
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


@LOSSES.register("l2sp", config=L2SPConfig)
class L2SP(LossComponent):
    """The body's squared distance to the first task's weights (the step weighs it)."""

    def __init__(self, cfg: L2SPConfig, trial: "FineTuneTrial", seed: int):
        super().__init__(cfg, trial, seed)
        anchors = dict(_previous_model(trial, "l2sp").named_parameters())
        head = set(trial.backbone.head.params)
        body = [(n, p) for n, p in trial.model.named_parameters() if n not in head]
        lacking = [n for n, _ in body if n not in anchors]
        if lacking:
            raise ValueError(f"losses.l2sp: {lacking[:3]} have no weights in the previous model (a strategy renamed "
                             "them); L2-SP takes a strategy that keeps parameter names")
        self.pairs = [(p, anchors[n]) for n, p in body]

    @property
    def active(self) -> bool:
        return self.weight > 0

    def loss(self, x, y):
        value = sum(((p - a) ** 2).sum() for p, a in self.pairs)
        self.track(l2sp=value)
        return value


@LOSSES.register("lwf", config=LwFConfig)
class LwF(LossComponent):
    """Distillation from the first model into the current body through the first task's head."""

    def __init__(self, cfg: LwFConfig, trial: "FineTuneTrial", seed: int):
        super().__init__(cfg, trial, seed)
        self.previous = _previous_model(trial, "lwf")
        self.phase = trial.phase

    @property
    def active(self) -> bool:
        return self.weight > 0

    def student(self, x: "torch.Tensor") -> "torch.Tensor":
        """The kept first-task head on the current body's features of ``x``."""
        t = self.trial
        features = []
        hook = t.model.get_submodule(self.phase.head).register_forward_hook(lambda m, i, o: features.append(i[0]))
        try:
            with bn_stats_kept(t.model), t.autocast():
                t.model(x)
        finally:
            hook.remove()
        with t.autocast():
            return self.phase.kept_head(features[0])

    def loss(self, x, y):
        import torch

        t = self.trial
        with torch.no_grad(), t.autocast():
            teacher = self.previous(x)
        value = distillation_loss(self.student(x), teacher, self.cfg.temperature)
        self.track(lwf=value)
        return value
