"""Name -> builder tables, one per kind of component, with a loud miss."""
from __future__ import annotations

from typing import Callable, Dict, Generic, TypeVar

T = TypeVar("T")


class UnknownComponentError(KeyError, ValueError):
    """An unknown name was asked of a registry; the message lists the valid names.

    A ValueError too, so that spec validation reports it with its key path."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    """An ordered table of builders for one kind of component (datasets, optimizers, ...)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._table: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(builder: T) -> T:
            if name in self._table:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._table[name] = builder
            return builder

        return deco

    def get(self, name: str) -> T:
        try:
            return self._table[name]
        except KeyError:
            raise UnknownComponentError(
                f"unknown {self.kind} {name!r}; valid choices: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return list(self._table)

    def __contains__(self, name: object) -> bool:
        return name in self._table
