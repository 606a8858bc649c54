"""Metric names, once, and the metrics computed from a confusion matrix.

Keys are namespaced ``<split>/<name>`` (``train/loss``, ``val/acc``) and the same key is used by
Ray Tune, ASHA / Optuna and MLflow. The step of every metric is the epoch (``EPOCH``).
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

TRAIN, VAL, TEST = "train", "val", "test"
LOSS, ACC, BALANCED_ACC, MACRO_F1 = "loss", "acc", "balanced_acc", "macro_f1"
SPLIT_METRICS = (LOSS, ACC, BALANCED_ACC, MACRO_F1)  # what evaluate() gives for a split

EPOCH = "epoch"  # the trial's epoch counter: ASHA's time attribute and MLflow's step
IMAGES_PER_S = "images_per_s"
TRAIN_LR = "train/lr"
TRAINABLE_GROUPS = "train/trainable_groups"
NODE_ID = "node_id"  # where a trial ran (an MLflow tag, not a metric)
CHECKPOINT_MB = "checkpoint/size_mb"  # the size of the epoch's checkpoint
PARAMS_TRAINABLE = "model/params_trainable"  # weights the strategy lets move (every epoch)
PARAMS_TOTAL = "model/params_total"
PEAK_MEM_MB = "train/peak_mem_mb"  # peak memory of training so far (CUDA: allocated; CPU: resident set)
# A result value under "artifact:<file name>" (text) becomes a file of the trial's MLflow run
# (e.g. forgetting's accuracy matrix); it is not a metric.
ARTIFACT_PREFIX = "artifact:"


def key(split: str, name: str) -> str:
    return f"{split}/{name}"


TRAIN_LOSS, TRAIN_ACC = key(TRAIN, LOSS), key(TRAIN, ACC)
VAL_LOSS, VAL_ACC = key(VAL, LOSS), key(VAL, ACC)
TEST_ACC = key(TEST, ACC)

# Reported every epoch, so they may drive ASHA and Optuna; a loss is minimised, the rest maximised.
EPOCH_METRICS = (VAL_ACC, VAL_LOSS, key(VAL, BALANCED_ACC), key(VAL, MACRO_F1), TRAIN_ACC, TRAIN_LOSS)


# With declared targets (trainables/tasks.py) each task reports its own metrics under its name,
# ``val/<task>/<metric>``, by kind; ``train/loss`` and ``val/loss`` are the weighted sums.
MAE, NME = "mae", "nme"  # regression: mean absolute error; key points: mean distance / image size
TASK_METRICS = {"class": (LOSS, ACC, BALANCED_ACC, MACRO_F1), "regression": (LOSS, MAE), "keypoints": (LOSS, NME)}
LOWER_IS_BETTER = (MAE, NME)


def task_key(split: str, task: str, name: str) -> str:
    return f"{split}/{task}/{name}"


def is_task_metric(metric: str) -> bool:
    """Whether ``metric`` has the form of a per-task metric reported every epoch."""
    parts = metric.split("/")
    names = {m for ms in TASK_METRICS.values() for m in ms}
    return len(parts) == 3 and parts[0] in (TRAIN, VAL) and bool(parts[1]) and parts[2] in names \
        and (parts[0] == VAL or parts[2] == LOSS)


def task_epoch_metrics(kinds: Dict[str, str]) -> Tuple[str, ...]:
    """The metrics reported every epoch by a trial with targets ``{task: kind}``."""
    out = [VAL_LOSS, TRAIN_LOSS]
    for task, kind in kinds.items():
        out += [task_key(VAL, task, m) for m in TASK_METRICS[kind]] + [task_key(TRAIN, task, LOSS)]
    return tuple(out)


def natural_mode(metric: str) -> str:
    """'min' for a loss or an error (MAE, NME), 'max' for everything else."""
    last = metric.rsplit("/", 1)[-1]
    return "min" if last.endswith(LOSS) or last in LOWER_IS_BETTER else "max"


def is_trial_metric(name: str) -> bool:
    """The trainable's own metrics (namespaced keys, the epoch, throughput), not Ray's bookkeeping."""
    return "/" in name or name in (EPOCH, IMAGES_PER_S)


def confusion_metrics(confusion, loss_sum: float, split: str, classes: Sequence[str], reduced: Sequence[int],
                      per_class: bool) -> Dict[str, float]:
    """Metrics from a confusion matrix (a torch tensor; rows: true class, columns: predicted):
    loss, accuracy, balanced accuracy, macro-F1, optionally per class, and accuracy on the classes
    ``reduced`` (cut down by data.class_fraction) against the rest."""
    import torch

    seen = int(confusion.sum())
    support = confusion.sum(1)
    tp = confusion.diag().double()
    recall = tp / support.clamp(min=1)
    precision = tp / confusion.sum(0).clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(tp))
    present = support > 0
    out = {
        key(split, LOSS): loss_sum / max(seen, 1),
        key(split, ACC): float(tp.sum()) / max(seen, 1),
        key(split, BALANCED_ACC): float(recall[present].mean()) if present.any() else 0.0,
        key(split, MACRO_F1): float(f1[present].mean()) if present.any() else 0.0,
    }
    if per_class:
        for c, name in enumerate(classes):
            if present[c]:
                out[f"{split}/acc_per_class/{name}"] = float(recall[c])
    if reduced:
        mask = torch.zeros(len(classes), dtype=torch.bool)
        mask[list(reduced)] = True
        for label, m in (("reduced", mask), ("rest", ~mask)):
            n = int(support[m].sum())
            if n:
                out[f"{split}/acc_{label}"] = float(tp[m].sum()) / n
    return out
