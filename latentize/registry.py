"""Small name -> component registries (encoders, sources, sinks, crops).

Components are looked up by the name written in the config; an unknown name raises a
:class:`~latentize.errors.ConfigError` that lists the valid ones, so a typo is fixed in one go.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from latentize.errors import ConfigError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """A named mapping from strings to components of one kind.

    Args:
        kind: what the registry holds, used in error messages (``"encoder"``).
        config_key: the config key that selects a component (``"encoder.type"``).
    """

    def __init__(self, kind: str, *, config_key: str) -> None:
        self.kind = kind
        self.config_key = config_key
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name``; names are unique."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> T:
        """Registers ``obj`` under ``name`` (non-decorator form)."""
        return self.register(name)(obj)

    def get(self, name: str) -> T:
        """Returns the component called ``name`` or raises a ConfigError listing the valid names."""
        try:
            return self._items[name]
        except KeyError:
            valid = ", ".join(sorted(self._items)) or "(none registered)"
            raise ConfigError(f"unknown {self.kind} {name!r} for {self.config_key}; valid values: {valid}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
