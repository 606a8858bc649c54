"""Numbers as a person reads them: ``lr 3.2e-4``, not 0.00031622776601683794. What is stored
for re-running (exported YAML, trial_spec.yaml) keeps the exact value."""
from __future__ import annotations

import re
from typing import Any

# Short names for the fields sweeps vary most, for run names and plot labels.
SHORT = {
    "strategy.unfreeze_last": "l", "train.lr": "lr", "train.weight_decay": "wd", "train.optimizer": "opt",
    "train.batch_size": "bs", "train.epochs": "epochs", "data.label_fraction": "labels", "semi.method": "semi",
    "strategy.bn": "bn", "model.name": "model", "strategy.unfreeze_every": "every", "strategy.lr_decay": "decay",
    "train.scheduler": "sched", "train.schedule_scope": "scope", "train.seed": "seed",
}


def num(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` significant digits; very small or large ones in short scientific
    form (3.2e-4); integers as they are; anything else as str."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if value == 0:
        return "0"
    if abs(value) < 1e-2 or abs(value) >= 1e5:
        mantissa, exp = f"{value:.{digits - 1}e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exp)}"
    return f"{value:.{digits}g}"


def metric(value: Any) -> str:
    """A metric: four significant digits."""
    return num(value, 4)


def short(key: str) -> str:
    if key.startswith("phases."):  # phases.1.train.lr: as train.lr
        key = key.split(".", 2)[-1]
    parts = key.split(".")
    if len(parts) == 3 and parts[0] == "losses" and parts[2] == "weight":  # losses.l2sp.weight: l2sp
        return parts[1]
    return SHORT.get(key, parts[-1])


def param(text: str) -> str:
    """A param as MLflow stores it (a string): numbers in it shortened."""
    try:
        v = float(text)
    except (TypeError, ValueError):
        return re.sub(r"\d+\.\d{5,}(e-?\d+)?", lambda m: num(float(m.group(0))), str(text))
    return num(int(v) if v.is_integer() and "." not in str(text) and "e" not in str(text).lower() else v)
