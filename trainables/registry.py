"""Name -> builder tables, one per kind of component, with a loud miss.

A registry entry may bring its own config model (a pydantic model that subclasses the kind's
base config): a strategy, a data set or a loss then declares its own fields next to its code,
and a config section is validated by the model its ``name`` picks (``Registry.section``).
Nothing here imports torch: validating a spec must stay cheap.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable, Dict, Generic, Iterable, Optional, TypeVar

T = TypeVar("T")


class UnknownComponentError(KeyError, ValueError):
    """An unknown name was asked of a registry; the message lists the valid names.

    A ValueError too, so that spec validation reports it with its key path."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    """An ordered table of builders for one kind of component (data sets, optimizers, ...)."""

    def __init__(self, kind: str, config_base: Optional[type] = None):
        self.kind = kind
        self.config_base = config_base
        self._table: Dict[str, T] = {}
        self._configs: Dict[str, type] = {}

    def register(self, name: str, config: Optional[type] = None) -> Callable[[T], T]:
        """Decorator: ``name`` builds with the decorated object; ``config`` is its config model."""
        if config is not None and self.config_base is not None and not issubclass(config, self.config_base):
            raise TypeError(f"the config of {self.kind} {name!r} must subclass {self.config_base.__name__}")

        def deco(builder: T) -> T:
            if name in self._table:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._table[name] = builder
            if config is not None:
                self._configs[name] = config
            if isinstance(builder, type):
                builder.registered_name = name  # a class knows its own name (to read a plain dict config)
            return builder

        return deco

    def unregister(self, name: str) -> None:
        """Drop an entry (tests that register a component of their own clean up with this)."""
        self._table.pop(name, None)
        self._configs.pop(name, None)

    def get(self, name: str) -> T:
        try:
            return self._table[name]
        except KeyError:
            raise self._miss(name) from None

    def config(self, name: str) -> type:
        """The config model of ``name`` (the kind's base model when it declares none)."""
        if name not in self._table:
            raise self._miss(name)
        return self._configs.get(name, self.config_base)

    def check(self, name: str) -> str:
        """``name`` if registered, else a ValueError listing the choices (a field validator)."""
        if name not in self._table:
            raise self._miss(name)
        return name

    def names(self) -> list[str]:
        return list(self._table)

    def __contains__(self, name: object) -> bool:
        return name in self._table

    def _miss(self, name: str) -> UnknownComponentError:
        return UnknownComponentError(f"unknown {self.kind} {name!r}; valid choices: {', '.join(self.names())}")

    def section(self, default: str) -> Callable[[Any], Any]:
        """A pydantic 'before' validator for a config section keyed by its ``name``: the mapping
        is validated by the model that ``name`` (or ``default``) selects, so every entry's own
        fields are checked and unknown keys are errors with their key path."""

        def pick(value: Any) -> Any:
            if self.config_base is not None and isinstance(value, self.config_base):
                return value
            if not isinstance(value, dict):
                return value  # the field's type reports it
            name = value.get("name", default)
            if not isinstance(name, str) or name not in self._table:
                # reported at the section's ``name`` key, with the choices
                from pydantic_core import ValidationError

                miss = ValueError(f"{self.kind} name must be a string, got {name!r}") if not isinstance(name, str) \
                    else self._miss(name)
                raise ValidationError.from_exception_data(self.kind, [
                    {"type": "value_error", "loc": ("name",), "input": name, "ctx": {"error": miss}}])
            return self.config(name).model_validate({**value, "name": name})

        return pick


def import_all(package: str, path: Iterable[str]) -> None:
    """Import every module of a package (its components register themselves on import), so a
    new strategy, loss or phase kind is one new file. Such modules import no torch at module
    level: spec validation imports them."""
    for info in pkgutil.iter_modules(list(path)):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
