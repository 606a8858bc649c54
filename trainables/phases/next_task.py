"""The ``next_task`` phase: a second task in sequence, for catastrophic forgetting studies.

The phase before it trained the first task; this one has its own data (another data set, or
other ``data.classes``) and its own head for them. As it starts it measures the first task on
its test split, keeps a frozen copy of the model as it was (the first task's head with it: the
anchor of L2-SP, the teacher of LwF, see trainables/losses/forgetting.py) and puts a new head
in the old one's place (same module path, so parameter names and layer groups stay). When it
ends it measures both tasks, the first through its kept head, and reports GEM's accuracy matrix
(Lopez-Paz & Ranzato 2017): ``R[i][j]`` = test accuracy on task j after training task i.
``R[0][1]`` is the second task with its fresh, untrained head.
"""
from __future__ import annotations

import copy
import json
from typing import TYPE_CHECKING, Any, Dict, List, Literal, Sequence

from pydantic import model_validator

from trainables import metrics as M
from trainables.config import PhaseConfig
from trainables.phases.base import PHASES
from trainables.phases.train import TrainPhase

if TYPE_CHECKING:
    from torch import nn

    from trainables.trainable import FineTuneTrial

TASK1_BEFORE = "task1/acc_before"  # R[0][0]: the first task, as its own phase left it
TASK1_AFTER = "task1/acc_after"  # R[1][0]: the first task after the second, through its kept head
TASK2_ACC = "task2/acc"  # R[1][1]
BWT = "forgetting/bwt"  # backward transfer: < 0 is forgetting
MATRIX_FILE = "accuracy_matrix.json"


def backward_transfer(R: Sequence[Sequence[float]]) -> float:
    """GEM's BWT = 1/(T-1) * sum_{i<T-1} (R[T-1][i] - R[i][i]) for T tasks."""
    T = len(R)
    if T < 2:
        raise ValueError("backward transfer needs two tasks or more")
    return sum(R[T - 1][i] - R[i][i] for i in range(T - 1)) / (T - 1)


def head_path(backbone: Any) -> str:
    """The module that holds the head's parameters (``fc``, ``classifier``)."""
    owners = sorted({p.rpartition(".")[0] for p in backbone.head.params})
    if len(owners) != 1 or not owners[0]:
        raise ValueError(f"a next_task phase replaces the head, but this backbone's head is not one module: {owners}")
    return owners[0]


def accuracy(trial: "FineTuneTrial", model: "nn.Module", loader) -> float:
    """Top-1 accuracy of ``model`` over ``loader`` (eval mode)."""
    import torch

    model.eval()
    right = torch.zeros((), dtype=torch.long, device=trial.device)
    seen = 0
    with torch.no_grad():
        for x, y in loader:
            x, y = trial.inputs(x), y.to(trial.device, non_blocking=True)
            with trial.autocast():
                logits = model(x)
            right += (logits.argmax(1) == y).sum()
            seen += len(y)
    return right.item() / max(seen, 1)


class NextTaskConfig(PhaseConfig):
    kind: Literal["next_task"] = "next_task"

    @model_validator(mode="after")
    def _own_data(self) -> "NextTaskConfig":
        if not self.data:
            raise ValueError(f"phase {self.name!r} (next_task) needs its own data: the next task's "
                             "(another data set, or data.classes: [...])")
        return self


@PHASES.register("next_task", config=NextTaskConfig)
class NextTaskPhase(TrainPhase):
    """Epochs of fine-tuning on the next task; the first task measured before and after."""

    new_head = True  # the next task may have another number of classes
    # its frozen prefix was trained by the first task: the feature cache (keyed by the source
    # weights) does not hold its outputs
    no_feature_cache = True

    def __init__(self, trial: "FineTuneTrial", index: int):
        super().__init__(trial, index)
        name = trial.phases[index].name
        if index == 0:
            raise ValueError(f"phases.0 ({name}): a next_task phase follows the phase that trains the first task")
        if any(p.kind == "next_task" for p in trial.phases[:index]):
            raise ValueError(f"phases.{index} ({name}): a trial takes one next_task phase (two tasks in sequence)")
        self.tasks = [trial.phases[index - 1].name, name]
        # The first task's data: the trial's, unless it entered this phase straight from phase 0
        # (a resume) while the task before was another phase's data.
        previous = trial.sections(index - 1).data
        if previous == trial.sections(0).data:
            self.previous_data = trial.data
        else:
            from trainables.data import build_data

            self.previous_data = build_data(previous)
        self.R: List[List[float]] = []
        self.touched_before: List[str] = []

    # ------------------------------------------------------------------ hooks
    def start(self) -> None:
        """Measure the first task, keep the model as it is, put in a new head, measure the
        second task with it (``R[0]``)."""
        from trainables.data.loaders import eval_loader
        from trainables.models import _new_head, _replace

        t = self.trial
        s = t.phase_cfg.train
        batch = s.eval_batch_size or 2 * s.batch_size
        self.test_loaders = [eval_loader(d.test, batch, t.num_workers, t.pin_memory) for d in (self.previous_data, t.data)]
        self.head = head_path(t.backbone)
        self.touched_before = sorted(t._touched())  # the weights the first task moved from their source
        before = accuracy(t, t.model, self.test_loaders[0])
        self.previous = copy.deepcopy(t.model).eval().requires_grad_(False)
        old = t.model.get_submodule(self.head)
        new = _new_head(old, t.data.num_classes).to(next(old.parameters()).device)
        _replace(t.model, self.head, new)
        self.R = [[before, accuracy(t, t.model, self.test_loaders[1])]]

    @property
    def kept_head(self) -> "nn.Module":
        """The first task's head, frozen: the previous model's."""
        return self.previous.get_submodule(self.head)

    def first_task_accuracy(self) -> float:
        """The first task's test accuracy through the current body and its kept head."""
        from trainables.models import _replace

        t = self.trial
        current = t.model.get_submodule(self.head)
        _replace(t.model, self.head, self.kept_head)
        try:
            return accuracy(t, t.model, self.test_loaders[0])
        finally:
            _replace(t.model, self.head, current)

    def finish(self) -> Dict[str, Any]:
        """The second task's test metrics, the first task's accuracy after it, BWT, and the
        accuracy matrix as a file of the run."""
        out: Dict[str, Any] = dict(self.trial.evaluate(M.TEST))
        R = [list(self.R[0]), [self.first_task_accuracy(), out[M.TEST_ACC]]]
        bwt = backward_transfer(R)
        out.update({TASK1_BEFORE: R[0][0], TASK1_AFTER: R[1][0], TASK2_ACC: R[1][1], BWT: bwt})
        data = [self.previous_data, self.trial.data]
        matrix = {
            "tasks": [{"phase": n, "classes": list(d.classes)} for n, d in zip(self.tasks, data)],
            "R": R,
            "bwt": bwt,
            "about": "R[i][j]: test accuracy on task j after training task i (GEM, Lopez-Paz & Ranzato 2017); "
                     "R[0][1]: task 2 with its fresh head; task 1 after task 2 through its kept head",
        }
        out[M.ARTIFACT_PREFIX + MATRIX_FILE] = json.dumps(matrix, indent=2)
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """``R[0]`` and the previous model: its buffers and the weights the first task moved
        (the others are the source's, as the resumed trial builds them)."""
        params = {n for n, _ in self.previous.named_parameters()}
        keep = set(self.touched_before) | set(self.trial.backbone.head.params)
        return {"R": [list(map(float, row)) for row in self.R], "touched_before": list(self.touched_before),
                "previous": {k: v for k, v in self.previous.state_dict().items() if k not in params or k in keep}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        missing, unexpected = self.previous.load_state_dict(state["previous"], strict=False)
        lacking = set(missing) & set(state["touched_before"])
        if unexpected or lacking:
            raise RuntimeError(f"next_task: the checkpoint's previous model does not fit (unexpected {unexpected[:5]}, "
                               f"missing {sorted(lacking)[:5]})")
        self.previous.requires_grad_(False)
        self.R = [[float(v) for v in row] for row in state["R"]]
        self.touched_before = list(state["touched_before"])
