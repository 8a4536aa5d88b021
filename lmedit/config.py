"""Typed configs from YAML: `load_config(RomeConfig, "configs/rome/gemma3-270m.yaml", overrides=["v_lr=0.3"])`.

Values are converted with the dataclass field types (so `5e-1` is a float and `[4, 5]` a tuple of
ints; a YAML bool is never taken for a number); unknown keys are rejected with a suggestion. Validation
lives in each config's `__post_init__`, declared with `check_ranges` (types, finiteness and ranges of
number fields). Every problem raises `ConfigError` (a `ValueError`) naming the file or override and the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lmedit.errors import ConfigError

C = TypeVar("C")

_TYPE_NAMES = {int: "an int", float: "a number", str: "a string", bool: "a bool (true/false)"}


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
        expected = " or ".join("null" if a is type(None) else _TYPE_NAMES.get(a, str(a)) for a in args)
        raise ConfigError(f"config field {field!r} expects {expected}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"config field {field!r} must be one of {args}, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str | int | float):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config field {field!r} expects a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], field) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"config field {field!r} expects a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, field) for v, a in zip(value, args))
    if hint is bool:
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            raise ConfigError(f"config field {field!r} expects a bool, got {value!r}")
        return bool(value)
    if hint in (int, float, str):
        if hint in (int, float) and (isinstance(value, bool) or not isinstance(value, int | float | str)):
            # YAML reads `yes`/`no`/`on`/`true` as bools: `layer: yes` is a mistake, not layer 1.
            raise ConfigError(f"config field {field!r} expects {_TYPE_NAMES[hint]}, got {value!r}")
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"config field {field!r} expects an int, got {value!r}")
        try:
            return hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config field {field!r} expects {_TYPE_NAMES[hint]}, got {value!r}") from None
    return value


def from_dict(cls: type[C], data: dict[str, Any], *, origins: dict[str, str] | None = None) -> C:
    """Build config `cls` from a plain dict, converting types and rejecting unknown keys.

    Args:
        origins: where each key's value came from (a file name, `override 'k=v'`), put in front of messages.

    Raises:
        ConfigError: unknown field, a value of the wrong type, or one the config's validation rejects.
    """
    origins = origins or {}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs = {}
    for key, value in data.items():
        where = f"{origins[key]}: " if key in origins else ""
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}unknown {cls.__name__} field {key!r}.{hint} Fields: {', '.join(names)}")
        try:
            kwargs[key] = _convert(value, hints[key], key)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}{exc}") from None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a config's __post_init__ validation
        sources = ", ".join(dict.fromkeys(origins[k] for k in kwargs if k in origins))
        raise ConfigError(f"{sources}: {exc}" if sources else str(exc)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory, expected a YAML file")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {path}: invalid YAML{at}: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read ({exc})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path}: a config file must be a YAML mapping (key: value lines), "
                          f"got {type(loaded).__name__}")
    return loaded


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Load a config dataclass from a YAML file (optional) plus `key=value` overrides (YAML-parsed values).

    Raises:
        ConfigError: missing or malformed file, a malformed override, an unknown field or a bad value; the
            message names the file or the override, and the field.
    """
    data: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if path is not None:
        path = Path(path).expanduser()
        data.update(_read_yaml(path))
        origins.update({key: f"config file {path}" for key in data})
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            data[key] = yaml.safe_load(raw)
        except yaml.YAMLError:
            data[key] = raw  # e.g. `[1,` : the field's type check reports it
        origins[key] = f"override {item!r}"
    return from_dict(cls, data, origins=origins)


def to_dict(config: Any) -> dict[str, Any]:
    """A config as plain JSON/YAML-friendly values (tuples become lists)."""
    def plain(v: Any) -> Any:
        return [plain(x) for x in v] if isinstance(v, tuple | list) else v
    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


# ---- number fields: type, finiteness and range, declared once per config ---------------------------------


def check_ranges(config: Any, *, positive: Iterable[str] = (), nonnegative: Iterable[str] = (),
                 at_least_one: Iterable[str] = (), unit_interval: Iterable[str] = (),
                 intervals: Mapping[str, str] | None = None, layers: Iterable[str] = (),
                 distinct: Iterable[str] = ()) -> None:
    """Check a config dataclass's number fields; call it from the config's `__post_init__`.

        check_ranges(self, positive=("v_lr", "clamp_norm_factor"), nonnegative=("kl_factor",),
                     at_least_one=("v_steps",), intervals={"cov_shrinkage": "[0, 1)"}, layers=("layer",))

    Every field, named or not: a field typed int or float (optionally `| None`, or `tuple[int, ...]`) must
    hold numbers of that type, never a bool (`True` is not layer 1), and every float must be finite.
    Then each named field (None, "not set", is skipped; a tuple is checked entry by entry) must be:
        positive       > 0   learning rates, clamps, norm bounds
        nonnegative    >= 0  weights, factors, decays, counts that may be zero
        at_least_one   >= 1  steps, epochs, sizes
        unit_interval  in [0, 1]  probabilities and fractions
        intervals      in the interval written as `"(0, 1]"` (brackets closed, parentheses open, inf allowed)
        layers         block indices >= 0, none twice
        distinct       no entry twice (layer lists that may count from the end)

    Raises:
        ConfigError: naming the class, the field, the value and what was expected.
    """
    owner = type(config).__name__
    numbers = number_fields(type(config))
    for field in dataclasses.fields(config):
        name, value = field.name, getattr(config, field.name)
        kind, is_tuple = numbers.get(name, (None, False))
        for item in (value if isinstance(value, tuple | list) else (value,)):
            if kind is not None and item is not None:
                ok = isinstance(item, int | float) if kind is float else isinstance(item, int)
                if isinstance(item, bool) or not ok or (isinstance(value, tuple | list) != is_tuple):
                    expected = f"a list of {_TYPE_NAMES[kind].split()[-1]}s" if is_tuple else _TYPE_NAMES[kind]
                    raise ConfigError(f"{owner}.{name} expects {expected}, got {value!r}")
            if isinstance(item, float) and not math.isfinite(item):  # any float, typed or not
                raise ConfigError(f"{owner}.{name} must be a finite number, got {value!r}")
    rules: list[tuple[str, tuple[float, bool, float, bool], str]] = []
    rules += [(n, (0.0, False, math.inf, False), "> 0") for n in positive]
    rules += [(n, (0.0, True, math.inf, False), ">= 0") for n in nonnegative]
    rules += [(n, (1.0, True, math.inf, False), ">= 1") for n in at_least_one]
    rules += [(n, (0.0, True, 1.0, True), "in [0, 1]") for n in unit_interval]
    rules += [(n, _parse_interval(spec), f"in {spec}") for n, spec in (intervals or {}).items()]
    rules += [(n, (0.0, True, math.inf, False), ">= 0 (a block index)") for n in layers]
    for name, (low, low_closed, high, high_closed), expected in rules:
        value = getattr(config, name)
        for item in (value if isinstance(value, tuple | list) else (value,)):
            if item is None:
                continue
            above = item >= low if low_closed else item > low
            below = item <= high if high_closed else item < high
            if not (above and below):
                each = " (every entry)" if isinstance(value, tuple | list) else ""
                raise ConfigError(f"{owner}.{name} must be {expected}{each}, got {value!r}")
    for name in (*layers, *distinct):
        value = getattr(config, name)
        if isinstance(value, tuple | list) and len(set(value)) != len(value):
            raise ConfigError(f"{owner}.{name} has duplicates (an entry named twice), got {value!r}")


@functools.cache
def number_fields(cls: type) -> dict[str, tuple[type, bool]]:
    """Field name -> (int or float, whether a tuple of them) for the number fields of config class `cls`."""
    out: dict[str, tuple[type, bool]] = {}
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # a hint only importable under TYPE_CHECKING: no type checks, finiteness still
        return out
    for name, hint in hints.items():
        if name not in {f.name for f in dataclasses.fields(cls)}:
            continue
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
            hint = args[0]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] in (int, float):
            out[name] = (args[0], True)
        elif hint in (int, float):
            out[name] = (hint, False)
    return out


_INTERVAL = re.compile(r"([\[(])\s*([^,]+?)\s*,\s*([^,]+?)\s*([\])])")


@functools.cache
def _parse_interval(spec: str) -> tuple[float, bool, float, bool]:
    match = _INTERVAL.fullmatch(spec.strip())
    if match is None:
        raise ValueError(f"interval {spec!r} is not written like '(0, 1]'")
    left, low, high, right = match.groups()
    return float(low), left == "[", float(high), right == "]"
