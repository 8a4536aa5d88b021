"""Reading saved edit files: every check is done on load, before an `Edit` object exists.

A saved edit is one safetensors file (`WeightEdit.save`, `WrapperEdit.save`, `AdaptorEdit.save`). Its string metadata says
what it is (`format`, `version`), which model it belongs to (`base_fingerprint`, never empty) and how it
was made (`method`, JSON `config` and `info`); its tensors are the edit itself. `read_edit_file` refuses,
with an `EditFileError` naming the file and what is wrong: a file that is not safetensors (random bytes,
truncated), a missing metadata key, an unknown format or version, an empty fingerprint, metadata that is
not JSON of the expected type, and tensors that are not float or not finite. `weight_parts` checks a
weight edit's tensor names (`<parameter>::dense|left|right|keys`) and the shapes of its factor pairs.
Stored text is only parsed, never formatted.

Not handled here: whether the edit fits a model (fingerprint and parameter shapes are checked on apply)
and the contents of a wrapper or adaptor edit's own metadata (each `from_saved` checks its own).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from lmedit.errors import EditFileError, LMEditError, MissingFileError
from lmedit.types import EditRequest

FORMAT_VERSION = 1                 # what `save` writes
KNOWN_VERSIONS = frozenset({1})    # what `load` reads
WEIGHT_FORMAT = "lmedit.weight_edit"
WRAPPER_FORMAT = "lmedit.wrapper_edit"
ADAPTOR_FORMAT = "lmedit.adaptor_edit"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Keys every saved edit's metadata has; each kind adds its own (`requests`; `wrapper`, `wrapper_meta`;
# `adaptor`, `site`, `adaptor_meta`).
COMMON_KEYS = ("format", "version", "method", "config", "base_fingerprint", "info")
WEIGHT_PARTS = ("dense", "left", "right", "keys")
_PARAM_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")   # as in `model.named_parameters()`
_TENSOR_NAME = re.compile(r"[A-Za-z0-9_]+([.:][A-Za-z0-9_]+)*")  # a wrapper edit's tensor names
_FINGERPRINT = re.compile(r"[\x21-\x7e]{1,128}")                  # printable, no spaces (`weights_fingerprint`: 16 hex)


def read_metadata(path: Path, label: str | None = None) -> dict[str, str]:
    """The string metadata of the safetensors file at `path` (header only; the tensors are not read).

    Raises:
        MissingFileError: no file at `path`.
        EditFileError: a directory, or not a safetensors file (random bytes, truncated, empty).
    """
    from safetensors import safe_open

    where = label or str(path)
    if not path.exists():
        raise MissingFileError(f"no edit file at {where}")
    if not path.is_file():
        raise EditFileError(f"{where} is not a safetensors edit file: it is a directory")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # noqa: BLE001  (safetensors raises SafetensorError, OSError, ... for bad files)
        raise EditFileError(f"{where} is not a safetensors edit file, or it is truncated ({_reason(exc)})") from None


def read_tensors(path: Path, label: str | None = None, byte_tensors: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Every tensor of the file at `path`, each checked to be float and finite (those named in `byte_tensors`:
    uint8, e.g. a packed bit mask).

    Raises:
        EditFileError: unreadable tensor data, a tensor that is not float (float16/bfloat16/float32/float64)
            or holds NaN/inf, or a byte tensor that is not uint8.
    """
    from safetensors.torch import load_file

    where = label or str(path)
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001  (as in read_metadata)
        raise EditFileError(f"{where}: the tensor data cannot be read ({_reason(exc)})") from None
    for name, tensor in tensors.items():
        if name in byte_tensors:
            if tensor.dtype != torch.uint8:
                raise EditFileError(f"{where}: tensor {name!r} has dtype {tensor.dtype}; it is packed bits (uint8)")
            continue
        if tensor.dtype not in FLOAT_DTYPES:
            raise EditFileError(f"{where}: tensor {name!r} has dtype {tensor.dtype}; an edit's tensors are floating "
                                f"point ({', '.join(str(d).removeprefix('torch.') for d in FLOAT_DTYPES)})")
        if not bool(torch.isfinite(tensor).all()):
            raise EditFileError(f"{where}: tensor {name!r} holds NaN or infinite values")
    return tensors


def check_metadata(meta: dict[str, str], expected_format: str, extra_keys: tuple[str, ...], where: str) -> dict[str, Any]:
    """Check the metadata of a saved edit of `expected_format`; returns `config` and `info` parsed.

    Raises:
        EditFileError: another format, a missing key, an unknown version, an empty or malformed base
            fingerprint, `config`/`info` that are not JSON objects.
    """
    fmt = meta.get("format")
    if fmt != expected_format:
        raise EditFileError(f"{where} is not an lmedit {expected_format.removeprefix('lmedit.').replace('_', ' ')} "
                            f"(format={fmt!r}, expected {expected_format!r})")
    missing = [k for k in (*COMMON_KEYS, *extra_keys) if k not in meta]
    if missing:
        raise EditFileError(f"{where}: the metadata lacks {', '.join(map(repr, missing))} (a saved {expected_format} "
                            f"has {', '.join((*COMMON_KEYS, *extra_keys))})")
    version = meta["version"]
    if not (version.isascii() and version.isdigit()) or int(version) not in KNOWN_VERSIONS:
        raise EditFileError(f"{where} has format version {version!r}; this lmedit reads version(s) "
                            f"{', '.join(map(str, sorted(KNOWN_VERSIONS)))} (a newer lmedit wrote it, or it is damaged)")
    if not _FINGERPRINT.fullmatch(meta["base_fingerprint"]):
        raise EditFileError(f"{where}: 'base_fingerprint' is {meta['base_fingerprint']!r}; a saved edit must name "
                            "the weights fingerprint of the model it was made on (LM.fingerprint)")
    return {"config": json_field(meta, "config", dict, where), "info": json_field(meta, "info", dict, where)}


def json_field(meta: dict[str, str], key: str, kind: type, where: str) -> Any:
    """The metadata value `key` parsed as JSON, which must be a `kind` (dict or list).

    Raises:
        EditFileError: not valid JSON, or JSON of another type.
    """
    try:
        value = json.loads(meta[key])
    except (ValueError, RecursionError) as exc:
        raise EditFileError(f"{where}: metadata {key!r} is not valid JSON ({_reason(exc)})") from None
    if not isinstance(value, kind):
        raise EditFileError(f"{where}: metadata {key!r} must be a JSON {'object' if kind is dict else 'array'}, "
                            f"got {type(value).__name__}")
    return value


def saved_requests(raw: Any, where: str = "", *, nonempty: bool = False) -> list[EditRequest]:
    """The edit requests stored in a file's metadata 'requests' (a JSON list of `EditRequest.to_dict()`).

    Raises:
        EditFileError: not a list (or empty, with `nonempty`), or an item that is not a valid request;
            the message starts with `where` when given.
    """
    prefix = f"{where}: " if where else ""
    if not isinstance(raw, list) or (nonempty and not raw):
        raise EditFileError(f"{prefix}metadata 'requests' must be a {'non-empty ' if nonempty else ''}list, "
                            f"got {type(raw).__name__}")
    requests = []
    for i, item in enumerate(raw):
        try:
            requests.append(EditRequest.from_dict(item))
        except (LMEditError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise EditFileError(f"{prefix}metadata 'requests'[{i}] is not a valid edit request ({exc})") from None
    return requests


Parts = dict[str, dict[str, torch.Tensor]]  # parameter -> {part: tensor}


def weight_parts(tensors: dict[str, torch.Tensor], where: str) -> tuple[Parts, dict[str, torch.Tensor]]:
    """Split a weight edit's tensors into per-parameter delta parts and fitted keys, checking names and shapes.

    Returns:
        (parameter -> {"dense"} or {"left", "right"}, parameter -> keys).

    Raises:
        EditFileError: a name that is not `<parameter>::<part>`, a parameter with both or neither kinds of
            delta, factors of different rank or not 2-d, keys whose rows match neither side of the delta.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, sep, part = key.rpartition("::")
        if not sep or part not in WEIGHT_PARTS or not _PARAM_NAME.fullmatch(name):
            raise EditFileError(f"{where}: tensor {key!r} is not named '<parameter>::<part>' with part one of "
                                f"{', '.join(WEIGHT_PARTS)}")
        if tensor.ndim == 0 or 0 in tensor.shape:
            raise EditFileError(f"{where}: tensor {key!r} has shape {tuple(tensor.shape)}; every dimension must be >= 1")
        parts.setdefault(name, {})[part] = tensor
    keys = {name: p.pop("keys") for name, p in parts.items() if "keys" in p}
    for name, p in parts.items():
        if set(p) not in ({"dense"}, {"left", "right"}):
            raise EditFileError(f"{where}: parameter {name!r} has parts {sorted(p) or 'keys only'}; a delta is 'dense', "
                                "or 'left' and 'right' factors")
        if "left" in p:
            left, right = p["left"], p["right"]
            if left.ndim != 2 or right.ndim != 2 or left.shape[1] != right.shape[1]:
                raise EditFileError(f"{where}: the factors of {name!r} do not fit: left {tuple(left.shape)} and right "
                                    f"{tuple(right.shape)} must be (rows, rank) and (cols, rank) with the same rank")
        if name in keys:
            shape = (p["left"].shape[0], p["right"].shape[0]) if "left" in p else tuple(p["dense"].shape)
            k = keys[name]
            if k.ndim != 2 or len(shape) != 2 or k.shape[0] not in shape:
                raise EditFileError(f"{where}: the keys of {name!r} have shape {tuple(k.shape)}; expected (d_in, n) "
                                    f"with d_in one side of the delta's {shape}")
    return parts, keys


def check_tensor_names(tensors: dict[str, torch.Tensor], where: str) -> None:
    """A wrapper edit's tensor names: dotted identifiers (what each wrapper expects is checked by `from_saved`)."""
    for key in tensors:
        if not _TENSOR_NAME.fullmatch(key):
            raise EditFileError(f"{where}: tensor name {key!r} is not a dotted identifier")


def _reason(exc: BaseException) -> str:
    """An exception's message on one line, kept short (it may quote the file's bytes)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."
