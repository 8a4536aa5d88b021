"""Shipped method settings per model, chosen like `from_pretrained` chooses weights.

Every editor has tuned settings for the built-in models in `lmedit/configs/<method>/<model>.yaml`
(package data: they travel with `pip install`). Which file applies is decided by the model's identity,
never by a directory name:

1. the built-in name the model was loaded by (`lmedit.load("gemma3-270m")`);
2. else its weights (`LM.weights_hash` or `LM.fingerprint` listed in `models.yaml`'s `fingerprints`), for the
   same weights loaded another way (a directory written by `lmedit export-model` with no edits, `LM.from_hf`
   on the converted checkpoint);
3. else its shape (model type, layers, widths, vocabulary): a fine-tuned or edited copy of a built-in
   model gets that model's settings, and the source line says its weights differ.

A model with none of these gets the method's defaults, and the source line says so.
`config=` / `--config` (a path, or a shipped file named relative to `lmedit/configs/`, e.g.
`rome/gemma3-270m.yaml` or `configs/rome/gemma3-270m.yaml`) and `--set key=value` still override.

    editor, source = resolve_editor("rome", lm)            # shipped settings for lm, when there are some
    describe(editor, lm, source)  # 'rome: layer 2; settings: shipped for gemma3-270m (lmedit/configs/rome/gemma3-270m.yaml)'
"""

from __future__ import annotations

import dataclasses
import logging
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lmedit.errors import ConfigError

if TYPE_CHECKING:
    from lmedit.editors.base import Editor
    from lmedit.models.load import LM

log = logging.getLogger(__name__)

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
_MODELS_FILE = CONFIG_ROOT / "models.yaml"


@dataclasses.dataclass(frozen=True)
class ModelIdentity:
    """Which shipped model a loaded one is, and how that was decided (`how`: name, fingerprint or shape)."""

    key: str
    how: str


@lru_cache(maxsize=1)
def _known_models() -> dict[str, dict[str, Any]]:
    data = yaml.safe_load(_MODELS_FILE.read_text()) or {}
    return {str(k): v for k, v in data.items()}


def shape_signature(lm: LM) -> str:
    """Model type, layer count, widths and vocabulary size: what makes two checkpoints interchangeable in shape."""
    c = lm.model.config
    c = getattr(c, "text_config", None) or c
    parts = [getattr(c, "model_type", "?"), lm.n_layers, getattr(c, "hidden_size", getattr(c, "n_embd", "?")),
             getattr(c, "intermediate_size", getattr(c, "n_inner", "?")), getattr(c, "vocab_size", "?")]
    return "/".join(str(p) for p in parts)


def identify(lm: LM) -> ModelIdentity | None:
    """The shipped model `lm` is (by built-in name, then weights fingerprint, then shape), or None."""
    known = _known_models()
    if lm.name in known:
        return ModelIdentity(lm.name, "name")
    for key, entry in known.items():
        # models.yaml lists exact weights hashes of the float32 weights (and may list checkpoint fingerprints).
        if {lm.fingerprint, lm.weights_hash} & set(entry.get("fingerprints") or []):
            return ModelIdentity(key, "fingerprint")
    signature = shape_signature(lm)
    for key, entry in known.items():
        if signature == entry.get("shape"):
            return ModelIdentity(key, "shape")
    return None


def shipped_path(method: str, model: str) -> Path | None:
    """`lmedit/configs/<method>/<model>.yaml` when lmedit ships it, else None."""
    path = CONFIG_ROOT / method / f"{model}.yaml"
    return path if path.is_file() else None


def config_path(value: str | Path) -> Path:
    """A `--config` value as a file: an existing path, else a shipped file named relative to lmedit/configs/.

    Raises:
        ConfigError: neither exists (the message names both places looked at).
    """
    path = Path(value).expanduser()
    if path.is_file():
        return path
    relative = Path(*[p for p in Path(value).parts[(1 if Path(value).parts[:1] == ("configs",) else 0):]])
    for candidate in (CONFIG_ROOT / relative, CONFIG_ROOT / relative.with_suffix(".yaml")):
        if candidate.is_file():
            return candidate
    if path.is_dir():
        raise ConfigError(f"config {value}: is a directory, expected a YAML file")
    raise ConfigError(f"config file {value} not found (looked at {path.resolve()} and {CONFIG_ROOT / relative})")


def _display(path: Path) -> str:
    try:
        return str(Path("lmedit") / path.resolve().relative_to(CONFIG_ROOT.parent))
    except ValueError:
        return str(path)


def shipped_settings(method: str, lm: LM) -> tuple[Path | None, str]:
    """The shipped config file for `method` on `lm` (or None), and a line saying where the settings come from."""
    identity = identify(lm)
    if identity is None:
        return None, f"method defaults: lmedit ships no {method} settings for {lm.name}"
    path = shipped_path(method, identity.key)
    if path is None:
        return None, f"method defaults: lmedit ships no {method} settings for {identity.key}"
    how = {"name": "", "fingerprint": ", recognised by its weights",
           "shape": ", a model of the same architecture and size (its weights differ)"}[identity.how]
    return path, f"shipped for {identity.key}{how} ({_display(path)})"


def resolve_editor(method: str, lm: LM | None, config: Any = None,
                   overrides: list[str] | None = None) -> tuple[Editor, str]:
    """The editor `method` with the settings that apply to `lm`, and where they came from.

    `config` (a config object, dict or path) wins over shipped settings; `overrides` (`key=value`) apply
    on top of whichever was chosen.
    """
    from lmedit.editors import get_editor
    from lmedit.editors.base import EditorConfig

    if config is not None:
        if isinstance(config, EditorConfig):
            source = "the given config object"
        elif isinstance(config, dict):
            source = "the given settings"
        else:
            config = config_path(config)
            source = f"--config {_display(config)}"
    elif lm is not None:
        config, source = shipped_settings(method, lm)
    else:
        source = "method defaults"
    editor = get_editor(method, config, overrides)
    if overrides:
        source += f", with {', '.join(overrides)}"
    if source.startswith("method defaults:"):
        log.warning("%s; using the method's defaults", source.removeprefix("method defaults: "))
    editor.settings_source = source
    return editor, source


def method_settings(method: str, lm: LM | None) -> tuple[dict[str, Any], str]:
    """The settings `lmedit.edit(lm, ..., method=method)` would use, as plain values, and where they come from.

    The dict holds every field of the method's config (shipped values for `lm` where lmedit ships a file,
    the method's defaults elsewhere); edited and passed back as `config=`, it gives the same checks as a
    `--config` file. Front ends (the web app) show it as editable settings.

    Raises:
        UnknownNameError: `method` is not a registered editor.
    """
    from lmedit.config import to_dict

    editor, source = resolve_editor(method, lm)
    return to_dict(editor.config), source


def describe(editor: Editor, lm: LM | None = None, source: str | None = None) -> str:
    """One line: method, layer(s) and where the settings came from."""
    from lmedit.registry import editors

    name = editors.name_of(editor) or type(editor).__name__
    cfg = editor.config
    where = ""
    for field in ("layer", "layers"):
        if hasattr(cfg, field):
            value = getattr(cfg, field)
            if value is None:
                where = getattr(editor, "layer_rule", "layer chosen by causal tracing")
            else:
                label = field if not isinstance(value, tuple | list) or len(value) != 1 else "layer"
                where = f"{label} {value if not isinstance(value, tuple | list) else ', '.join(map(str, value))}"
            break
    source = source or getattr(editor, "settings_source", "")
    on = f" on {lm.name}" if lm is not None else ""
    return f"{name}{on}: " + "; ".join(p for p in (where, f"settings: {source}" if source else "") if p)
