"""Name -> class registries for attacks, defenses, models and datasets.

A plugin (a :class:`~bench.core.plugin.Plugin` subclass) registers itself with a decorator
(``@ATTACKS.register("badnets")``) and is built from its name and parameters by
:meth:`Registry.create`, which validates the parameters first. Third-party
packages add plugins without touching this repository through the entry-point groups
``bench.attacks``, ``bench.defenses``, ``bench.models`` and ``bench.datasets``: each entry
point names a module (or object) whose import runs the decorators.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Mapping
from importlib import metadata
from typing import Any, Callable, Generic, Iterator, TypeVar

from bench.core.errors import UnknownNameError
from bench.core.plugin import Plugin

T = TypeVar("T")


class Registry(Generic[T]):
    """A case-sensitive mapping from plugin names to plugin classes."""

    def __init__(
        self, kind: str, entry_point_group: str | None = None, builtins: str | None = None
    ) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self.builtins = builtins
        self._items: dict[str, T] = {}
        self._entry_points_loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers the plugin class ``obj`` under ``name``; a duplicate name is a bug."""

        def decorator(obj: T) -> T:
            if not (isinstance(obj, type) and issubclass(obj, Plugin)):
                raise TypeError(f"{self.kind} {name!r} must be a subclass of bench.core.plugin.Plugin, got {obj!r}")
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            if "name" not in vars(obj) or not obj.name:  # a subclass does not inherit its parent's name
                obj.name = name  # type: ignore[misc]
            return obj

        return decorator

    def unregister(self, name: str) -> None:
        """Remove a plugin (tests and notebooks that register throw-away plugins)."""
        self._items.pop(name, None)

    def create(self, name: str, params: Mapping[str, Any] | None = None, **context: Any) -> Any:
        """Instantiate plugin ``name`` with validated ``params`` (one-line error when they are bad).

        ``context`` holds what the plugin needs beyond its parameters (a model's class count and
        input channels); it is never part of the parameters.
        """
        cls: Any = self.get(name)
        return cls(params=cls.parse_params(params), **context)

    def _load_entry_points(self) -> None:
        """Import the built-in plugin package and third-party entry points, once."""
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        if self.builtins:
            importlib.import_module(self.builtins)
        if self.entry_point_group:
            for entry_point in metadata.entry_points(group=self.entry_point_group):
                entry_point.load()

    def get(self, name: str) -> T:
        """Return the plugin called ``name`` or raise an error that lists the valid names."""
        self._load_entry_points()
        try:
            return self._items[name]
        except KeyError:
            valid = sorted(self._items)
            close = difflib.get_close_matches(str(name), valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{hint} Valid {self.kind}s: {', '.join(valid)}"
            ) from None

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        for name in self.names():
            yield name, self._items[name]

    def __contains__(self, name: Any) -> bool:
        self._load_entry_points()
        return name in self._items


def summary(obj: Any) -> str:
    """First line of a plugin's docstring: the one-line description shown by ``list``."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


ATTACKS: Registry = Registry("attack", "bench.attacks", builtins="attacks")
DEFENSES: Registry = Registry("defense", "bench.defenses", builtins="defenses")
MODELS: Registry = Registry("model", "bench.models", builtins="bench.core.models")
DATASETS: Registry = Registry("dataset", "bench.datasets", builtins="bench.core.data")
