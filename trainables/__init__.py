"""Worker side of tl-sweep: what one trial does.

A trial receives a plain config dict (trainables/config.py defines it, with its defaults);
nothing here imports ``orchestrator``, and importing this package imports no torch.
``check(configs)`` runs the checks that need the data or the model, where trials run.
"""
from typing import Any, Dict, Iterable, List


def check(configs: Iterable[Any]) -> List[Dict[str, Any]]:
    """Build each config's data, backbone and strategy as a trial would (trainables/check.py)."""
    from trainables.check import check as _check

    return _check(configs)
