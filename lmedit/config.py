"""Typed configs from YAML: `load_config(RomeConfig, "configs/rome/gemma3-270m.yaml", overrides=["v_lr=0.3"])`.

Values are converted with the dataclass field types (so `5e-1` is a float and `[4, 5]` a tuple of
ints); unknown keys are rejected with a suggestion. Validation lives in each config's `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


def _convert(value: Any, hint: Any, field: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, field)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ValueError(f"config field {field!r}: {value!r} matches none of {hint}")
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"config field {field!r} must be one of {args}, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str | int | float):
            value = [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], field) for v in value)
        return tuple(_convert(v, a, field) for v, a in zip(value, args, strict=True))
    if hint is bool:
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            raise ValueError(f"config field {field!r} expects a bool, got {value!r}")
        return bool(value)
    if hint in (int, float, str):
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"config field {field!r} expects an int, got {value!r}")
        return hint(value)
    return value


def from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Build config `cls` from a plain dict, converting types and rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown {cls.__name__} field {key!r}.{hint} Fields: {', '.join(names)}")
        kwargs[key] = _convert(value, hints[key], key)
    return cls(**kwargs)


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Load a config dataclass from a YAML file (optional) plus `key=value` overrides (YAML-parsed values)."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config file must be a YAML mapping, got {type(loaded).__name__}")
        data.update(loaded)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form key=value")
        data[key.strip()] = yaml.safe_load(raw)
    return from_dict(cls, data)


def to_dict(config: Any) -> dict[str, Any]:
    """A config as plain JSON/YAML-friendly values (tuples become lists)."""
    def plain(v: Any) -> Any:
        return [plain(x) for x in v] if isinstance(v, tuple | list) else v
    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
