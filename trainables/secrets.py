"""Credentials a trial needs (object-store keys for its checkpoints), handed to it in memory.

The driver puts the credentials it was given into a ``SecretBroker`` actor of the sweep; a
trial asks that actor for them when it starts. They never go through a file, a log, Ray's
runtime environment (whose agent logs it) or the trial's config (which Tune writes to disk).
"""
from __future__ import annotations

import os
from typing import Dict, Optional


class SecretBroker:
    """A Ray actor (made with ``ray.remote``) that holds environment values in memory."""

    def __init__(self) -> None:
        self._values: Dict[str, str] = {}

    def put(self, values: Dict[str, str]) -> None:
        self._values = dict(values)

    def get(self) -> Dict[str, str]:
        return dict(self._values)


def apply(broker: Optional[str]) -> None:
    """Set this process's environment from the sweep's broker (named ``broker``), if any."""
    if not broker:
        return
    import ray

    try:
        actor = ray.get_actor(broker)
    except ValueError:  # no such actor: the driver had nothing to hand over
        return
    os.environ.update(ray.get(actor.get.remote()))
