"""A typed name -> object registry (the lm-evaluation-harness `Registry[T]` pattern).

Editors, datasets and metrics each have one registry. An unknown name raises `KeyError` with a
"did you mean" suggestion (`UnknownNameError`, still a `KeyError`). Third-party editors register through the
`lmedit.editors` entry-point group. Each registry imports its built-in module (the one explicit list of
built-ins, e.g. `lmedit/editors/__init__.py`) on first lookup, so reading a registry never depends on what
happened to be imported before.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from lmedit.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps lowercase names to registered objects, with metadata per entry.

    Example:
        >>> editors = Registry("editor")
        >>> @editors.register("rome")
        ... class RomeEditor: ...
        >>> editors.get("rome") is RomeEditor
        True
    """

    def __init__(self, kind: str, entry_point_group: str | None = None, builtins: str | None = None) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        self._group = entry_point_group
        self._builtins = builtins          # module whose import registers the built-in entries
        self._loaded_builtins = builtins is None
        self._loaded_plugins = False

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        """Decorator registering an object under `name` (lowercase, unique)."""
        if name != name.lower() or not name:
            raise ValueError(f"{self.kind} names are lowercase and non-empty, got {name!r}")

        def decorate(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            self._meta[name] = meta
            return obj

        return decorate

    def unregister(self, name: str) -> None:
        """Remove the entry `name`: a test that registers a temporary entry takes it out again with this.

        Raises:
            UnknownNameError: nothing is registered as `name`.
        """
        self.get(name)
        del self._items[name], self._meta[name]

    def _load_plugins(self) -> None:
        if not self._loaded_builtins:
            self._loaded_builtins = True  # first, so that a lookup while the module imports does not recurse
            try:
                import_module(self._builtins)  # type: ignore[arg-type]
            except BaseException:
                self._loaded_builtins = False
                raise
        if self._loaded_plugins or self._group is None:
            return
        self._loaded_plugins = True
        for ep in entry_points(group=self._group):
            if ep.name not in self._items:
                self.register(ep.name)(ep.load())

    def get(self, name: str) -> T:
        """The object registered as `name`; `UnknownNameError` (a `KeyError`) with close matches otherwise."""
        self._load_plugins()
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._items, n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise UnknownNameError(f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(self.names())}") from None

    def name_of(self, obj: Any) -> str | None:
        """The name `obj` is registered under (or, for an instance, its class), None when it is not registered."""
        self._load_plugins()
        return next((n for n, item in self._items.items() if item is obj or item is type(obj)), None)

    def meta(self, name: str) -> dict[str, Any]:
        self.get(name)
        return dict(self._meta[name])

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


# The project's registries. Plugins register into these; nothing else keeps a list of methods.
editors: Registry[Any] = Registry("editor", entry_point_group="lmedit.editors", builtins="lmedit.editors")
datasets: Registry[Any] = Registry("dataset", builtins="lmedit.eval.datasets")
metrics: Registry[Any] = Registry("metric", builtins="lmedit.eval.metrics")
