"""Shipped settings are chosen by model identity (name, weights fingerprint, shape), never by directory name."""

from __future__ import annotations

import logging

import pytest

import lmedit.settings as settings
from lmedit.editors import edit
from lmedit.errors import ConfigError
from lmedit.settings import config_path, describe, identify, resolve_editor, shape_signature, shipped_path
from lmedit.testing import tiny_lm
from lmedit.types import EditRequest


@pytest.fixture
def known(monkeypatch, tmp_path):
    """Pretend lmedit ships ROME settings for the tiny Llama (by fingerprint and shape) under the key 'tiny-model'."""
    lm = tiny_lm("llama")
    root = tmp_path / "configs"
    (root / "rome").mkdir(parents=True)
    (root / "rome" / "tiny-model.yaml").write_text("layer: 1\nv_steps: 3\ncorpus: docstrings\ncorpus_tokens: 200\n")
    monkeypatch.setattr(settings, "CONFIG_ROOT", root)
    monkeypatch.setattr(settings, "_known_models",
                        lambda: {"tiny-model": {"fingerprints": [lm.fingerprint], "shape": shape_signature(lm)}})
    return lm


# Built-in editors without shipped settings for every built-in model, and why.
PARTLY_SHIPPED = {"noop": set(), "serac": {"gemma3-270m"}}  # noop has nothing to tune; SERAC's head is per model


def test_the_built_in_models_have_shipped_settings_for_every_method():
    from lmedit.registry import editors

    methods = [n for n in editors.names() if editors.get(n).__module__.startswith("lmedit.")]
    assert {"rome", "memit", "alphaedit", "ft", "ft_l", "kn", "mend", "serac"} <= set(methods)
    for method in methods:
        for model in ("gemma3-270m", "smollm2-135m"):
            shipped = model in PARTLY_SHIPPED.get(method, {model})
            assert (shipped_path(method, model) is not None) == shipped, (method, model)
    assert set(settings._known_models()) == {"gemma3-270m", "smollm2-135m"}


def test_identity_by_fingerprint_then_shape(known):
    assert identify(known).how == "fingerprint"
    other = tiny_lm("llama", seed=1)                    # same shape, other weights
    assert identify(other) == settings.ModelIdentity("tiny-model", "shape")
    assert identify(tiny_lm("gpt2")) is None


def test_a_directory_name_is_not_an_identity(monkeypatch):
    lm = tiny_lm("gpt2")
    lm.name = "/somewhere/gemma3-270m"
    assert identify(lm) is None


def test_edit_without_config_uses_the_shipped_file_and_says_so(known, caplog):
    editor, source = resolve_editor("rome", known)
    assert editor.config.layer == 1 and editor.config.v_steps == 3
    assert source.startswith("shipped for tiny-model, recognised by its weights")
    assert describe(editor, known).startswith("rome on tiny-llama: layer 1; settings: shipped for tiny-model")
    result = edit(known, EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris"), apply=False)
    assert result.config["layer"] == 1 and result.config["v_steps"] == 3


def test_overrides_and_explicit_configs_win(known, tmp_path):
    editor, source = resolve_editor("rome", known, None, ["layer=2"])
    assert editor.config.layer == 2 and editor.config.v_steps == 3 and source.endswith("with layer=2")
    own = tmp_path / "mine.yaml"
    own.write_text("layer: 3\n")
    editor, source = resolve_editor("rome", known, str(own))
    assert editor.config.layer == 3 and editor.config.v_steps == 20 and "mine.yaml" in source
    editor, _ = resolve_editor("rome", known, {"layer": 0})
    assert editor.config.layer == 0


def test_no_shipped_settings_means_method_defaults_with_a_note(caplog):
    lm = tiny_lm("gpt2")
    with caplog.at_level(logging.WARNING, logger="lmedit.settings"):
        editor, source = resolve_editor("rome", lm)
    assert editor.config.layer is None and source.startswith("method defaults")
    assert any("ships no rome settings for tiny-gpt2" in r.message for r in caplog.records)
    assert "layer chosen by causal tracing" in describe(editor, lm)


def test_config_values_resolve_from_any_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    shipped = shipped_path("rome", "gemma3-270m")
    for value in ("configs/rome/gemma3-270m.yaml", "rome/gemma3-270m.yaml", "rome/gemma3-270m"):
        assert config_path(value) == shipped
    with pytest.raises(ConfigError, match="not found"):
        config_path("configs/rome/nope.yaml")


def test_describe_says_how_a_null_layer_is_chosen():
    from lmedit.editors import get_editor
    from lmedit.settings import describe

    assert "layer at 0.88 of the depth" in describe(get_editor("grace", {"layer": None}))
    assert "layer at 0.88 of the depth" in describe(get_editor("wise", {"layer": None}))
    assert "layer chosen by causal tracing" in describe(get_editor("rome", {"layer": None}))
