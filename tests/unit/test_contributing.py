"""CONTRIBUTING.md's walk-through, run: its example editor passes the contract suite, so the walk-through stays true.

The ```python contributing-example block (the whole editor module) is executed as a fresh module, with its
registry key replaced by a test-only name, and unregistered afterwards. The contract suite's own test
functions (tests/contract/test_editors.py, loaded from its file) then run on it with the settings of the
```python contributing-tiny-config block: top-1 flip on tiny Llama and GPT-2, weights untouched by edit(),
fingerprint and save/load, bit-exact undo, YAML round trip, same seed same edit. The
```yaml contributing-config block (a shipped settings file) must load into the example's config class.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest

from lmedit.config import load_config
from lmedit.editors import get_editor
from lmedit.errors import ConfigError, UnknownNameError
from lmedit.registry import Registry, editors

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "CONTRIBUTING.md"
NAME = "rank_one"                         # the example's registry key in CONTRIBUTING.md
TEST_NAME = "contributing_example_rank_one"  # what it registers as here: never a built-in's name
MODULE = "lmedit_contributing_example"      # not under lmedit.: the contract suite counts it as test-only


def _block(info: str) -> tuple[str, int]:
    """The one fenced block of CONTRIBUTING.md whose info string is `info`, and the line its code starts on."""
    text = GUIDE.read_text()
    found = [m for m in re.finditer(rf"^```{re.escape(info)}\n(.*?)^```$", text, re.M | re.S)]
    assert len(found) == 1, f"CONTRIBUTING.md must hold exactly one ```{info} block, found {len(found)}"
    return found[0].group(1), text.count("\n", 0, found[0].start(1)) + 1


def _contract_suite() -> types.ModuleType:
    """tests/contract/test_editors.py as a module of its own (its TINY_CONFIGS can then be patched here alone)."""
    spec = importlib.util.spec_from_file_location("contract_suite_for_contributing",
                                                  ROOT / "tests" / "contract" / "test_editors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    """The example editor module, registered as TEST_NAME for this module's tests only."""
    source, line = _block("python contributing-example")
    assert source.count(f'NAME = "{NAME}"') == 1, f'the example should define NAME = "{NAME}" once'
    source = source.replace(f'NAME = "{NAME}"', f'NAME = "{TEST_NAME}"')
    module = types.ModuleType(MODULE)
    sys.modules[MODULE] = module  # dataclasses look their module up while building the config class
    try:
        # Padded so that a traceback names the line of CONTRIBUTING.md.
        exec(compile("\n" * (line - 1) + source, str(GUIDE), "exec"), module.__dict__)
        assert editors.get(TEST_NAME) is module.RankOneEditor
        yield module
    finally:
        if TEST_NAME in editors.names():
            editors.unregister(TEST_NAME)
        del sys.modules[MODULE]


@pytest.fixture(scope="module")
def contract():
    return _contract_suite()


@pytest.fixture
def with_tiny_config(contract, monkeypatch):
    """The contract suite with the walk-through's TINY_CONFIGS entry added under the test-only name."""
    block, _ = _block("python contributing-tiny-config")
    entries = ast.literal_eval("{" + block + "}")
    assert list(entries) == [NAME]
    monkeypatch.setitem(contract.TINY_CONFIGS, TEST_NAME, entries[NAME])
    return contract


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_example_flips_top1_leaves_weights_until_applied_and_undoes_exactly(example, with_tiny_config, family,
                                                                           tmp_path):
    with_tiny_config.test_edit_flips_top1_and_undo_is_exact(TEST_NAME, family, tmp_path)


def test_example_config_round_trips_and_same_seed_gives_same_edit(example, with_tiny_config, tmp_path):
    with_tiny_config.test_config_round_trips_through_yaml(TEST_NAME, tmp_path)
    with_tiny_config.test_same_seed_same_edit(TEST_NAME, tmp_path)


def test_example_records_its_method_and_refuses_a_missing_layer_before_work(example, with_tiny_config, tmp_path):
    from lmedit.testing import tiny_lm

    lm = tiny_lm("llama")
    edit = get_editor(TEST_NAME, {"layer": 1}).edit(lm, [with_tiny_config.REQUEST])
    assert edit.method == TEST_NAME and edit.deltas and all(d.rank == 1 for d in edit.deltas.values())
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    with pytest.raises(ConfigError, match="RankOneConfig.layer=4"):
        get_editor(TEST_NAME, {"layer": 4}).edit(lm, [with_tiny_config.REQUEST])
    with pytest.raises(ConfigError, match="v_lr"):
        get_editor(TEST_NAME, {"v_lr": 0})
    assert all((before[k] == v).all() for k, v in lm.model.state_dict().items())


def test_a_built_in_editor_without_a_tiny_config_fails_the_contract_suite(example, contract, monkeypatch):
    # As lmedit/editors/rank_one.py it would be a built-in: the walk-through's step 4 is then required.
    monkeypatch.setattr(example.RankOneEditor, "__module__", "lmedit.editors.rank_one")
    with pytest.raises(AssertionError, match=TEST_NAME):
        contract.test_every_editor_has_a_tiny_config()
    monkeypatch.setitem(contract.TINY_CONFIGS, TEST_NAME, {"layer": 1})
    contract.test_every_editor_has_a_tiny_config()


def test_shipped_config_example_loads(example, tmp_path):
    block, _ = _block("yaml contributing-config")
    assert block.startswith("# lmedit edit "), "a shipped config begins with the command that uses it"
    path = tmp_path / "gemma3-270m.yaml"
    path.write_text(block)
    config = load_config(example.RankOneConfig, path)
    assert (config.layer, config.clamp_norm_factor) != (example.RankOneConfig().layer,
                                                        example.RankOneConfig().clamp_norm_factor)


def test_unregister_removes_an_entry_and_refuses_an_unknown_one():
    registry: Registry[object] = Registry("thing")
    registry.register("a", paper="x")(object)
    registry.unregister("a")
    assert "a" not in registry.names()
    registry.register("a")(int)  # the name is free again
    assert registry.get("a") is int and registry.meta("a") == {}
    with pytest.raises(UnknownNameError, match="unknown thing 'b'"):
        registry.unregister("b")
