"""Worker side of tl-sweep: what one trial does.

A trial receives a plain config dict (sections ``data``, ``model``, ``strategy``, ``train``,
plus ``metric`` and ``mode``); nothing here imports ``orchestrator``.
"""
