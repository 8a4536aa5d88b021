"""Users' own objects: a tiny Llama loaded with plain transformers, wrapped with `LM.from_hf`, then edited,
evaluated and recorded; `lmedit.load(model, tokenizer=...)`; the errors for bare models; `lmedit.generate`
/ `lmedit.score`; `EvalResult.to_pandas()`."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaModel

import lmedit
from lmedit.errors import LMEditError, MissingDependencyError, NotAnLMError, UnsupportedArchitectureError
from lmedit.ledger import AuditConfig
from lmedit.ledger.audit import CHECKS
from lmedit.models import ARCHS
from lmedit.testing import tiny_config, tiny_tokenizer

# Subject at the end of the prompt (a random 4-layer model barely moves information between tokens).
REQUEST = lmedit.EditRequest("Where is {}", "The Eiffel Tower", "Rome", "Paris")


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    """A tiny random Llama and its tokenizer saved as a plain HF directory (built from a LlamaConfig)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-hf")
    config = tiny_config("llama")
    assert config.model_type == "llama"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def hf(saved_dir):
    """(model, tokenizer) as a transformers user holds them: loaded with Auto* classes, nothing else."""
    return AutoModelForCausalLM.from_pretrained(saved_dir), AutoTokenizer.from_pretrained(saved_dir)


def _snapshot(lm) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- wrapping ------------------------------------------------------------------------------------------

def test_from_hf_wraps_in_place_without_moving(hf, saved_dir):
    model, tokenizer = hf
    model.train()
    lm = lmedit.LM.from_hf(model, tokenizer)
    assert lm.model is model and lm.tokenizer is tokenizer
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert lm.device == torch.device("cpu") and next(model.parameters()).dtype == torch.float32
    assert lm.name == str(saved_dir) and lm.n_layers == 4 and lm.arch is ARCHS["llama"]
    assert lm.fingerprint == lmedit.LM.from_hf(*hf).fingerprint  # same weights, same fingerprint
    assert lmedit.LM.from_hf(model, tokenizer, name="my-llama").name == "my-llama"


def test_from_hf_casts_only_when_asked(hf):
    model, tokenizer = hf
    lm = lmedit.LM.from_hf(model, tokenizer, dtype=torch.bfloat16)
    assert next(lm.model.parameters()).dtype == torch.bfloat16


def test_from_hf_sets_a_missing_pad_token_and_nothing_else(hf):
    model, tokenizer = hf
    tokenizer.pad_token = None
    side = tokenizer.padding_side
    lm = lmedit.LM.from_hf(model, tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token == "<eos>" and tokenizer.padding_side == side
    assert lm.encode(["Where is", "Where is The Eiffel Tower"])["input_ids"].shape[0] == 2


def test_load_accepts_a_model_object(hf):
    model, tokenizer = hf
    lm = lmedit.load(model, tokenizer=tokenizer)
    assert isinstance(lm, lmedit.LM) and lm.model is model and lm.tokenizer is tokenizer
    assert lm.fingerprint == lmedit.LM.from_hf(model, tokenizer).fingerprint


def test_model_object_errors_say_what_to_do(hf, saved_dir):
    model, tokenizer = hf
    with pytest.raises(NotAnLMError, match=r"needs its tokenizer.*load\(model, tokenizer=tokenizer\)"):
        lmedit.load(model)
    with pytest.raises(NotAnLMError, match="not a decoder-only causal LM"):
        lmedit.LM.from_hf(LlamaModel(model.config), tokenizer)
    with pytest.raises(NotAnLMError, match="expected a transformers causal LM"):
        lmedit.LM.from_hf(torch.nn.Linear(2, 2), tokenizer)
    with pytest.raises(LMEditError, match="goes with a model object"):
        lmedit.load(str(saved_dir), tokenizer=tokenizer)
    model.config.model_type = "no_such_family"
    with pytest.raises(UnsupportedArchitectureError, match="no_such_family"):
        lmedit.load(model, tokenizer=tokenizer)


def test_bare_model_passed_to_entry_points_is_a_type_error(hf):
    model, _ = hf
    calls = [lambda: lmedit.edit(model, REQUEST),
             lambda: lmedit.trace(model, "Where is The Eiffel Tower", "The Eiffel Tower"),
             lambda: lmedit.evaluate(model, "starter", "noop", limit=1),
             lambda: lmedit.generate(model, "Where is"),
             lambda: lmedit.score(model, "Where is", "Paris")]
    for call in calls:
        with pytest.raises(TypeError, match=r"lmedit\.LM\.from_hf\(model, tokenizer\)") as info:
            call()
        assert isinstance(info.value, NotAnLMError) and isinstance(info.value, LMEditError)
    with pytest.raises(NotAnLMError, match=r"lmedit\.load\('gemma3-270m'\)"):
        lmedit.edit("gemma3-270m", REQUEST)


# ---- the wrapped model through the toolkit -----------------------------------------------------------

def test_edit_changes_weights_and_undo_restores_them_bit_for_bit(hf, rome_config):
    lm = lmedit.LM.from_hf(*hf)
    before = _snapshot(lm)
    edit = lmedit.edit(lm, REQUEST, method="rome", config=rome_config)
    assert not _same(before, _snapshot(lm))
    edit.undo()
    assert _same(before, _snapshot(lm))


def test_evaluate_and_to_pandas(hf, rome_config):
    pd = pytest.importorskip("pandas")
    lm = lmedit.LM.from_hf(*hf)
    before = _snapshot(lm)
    result = lmedit.evaluate(lm, "starter", "rome", limit=2, editor_config=rome_config, n_bootstrap=10)
    assert _same(before, _snapshot(lm)) and len(result.rows) == 2
    assert result.summary["run"]["model"] == lm.name

    df = result.to_pandas()
    assert isinstance(df, pd.DataFrame) and len(df) == 2
    assert list(df["case_id"]) == [r["case_id"] for r in result.rows]
    for column in ("mode", "n_edits", "edit_seconds", "unedited.efficacy_score", "edited.efficacy_score",
                   "edit_info.layer", "edit_info.requests.update_norm", "edit_info.requests.delta_norm"):
        assert column in df.columns, column
    assert not [c for c in df.columns if "v_star" in c or "v_loss" in c or "generations" in c]
    bulky = [(c, v) for c in df.columns for v in df[c] if isinstance(v, list | tuple | dict | torch.Tensor)]
    assert not bulky
    assert df["edited.efficacy_score"].tolist() == [r["edited"]["efficacy_score"] for r in result.rows]


def test_to_pandas_without_pandas_says_pip_install(monkeypatch):
    import sys

    from lmedit.eval import EvalResult

    monkeypatch.setitem(sys.modules, "pandas", None)  # makes `import pandas` raise ImportError
    with pytest.raises(MissingDependencyError, match="pip install pandas"):
        EvalResult(summary={}, rows=[]).to_pandas()


def test_ledger_records_an_edit_of_a_wrapped_model(hf, rome_config, tmp_path):
    lm = lmedit.LM.from_hf(*hf)
    lenient = AuditConfig(**{f"{c.name}_{level}": None for c in CHECKS for level in ("warn", "refuse")},
                          generation_tokens=0)
    ledger = lmedit.Ledger(tmp_path / "ledger", audit_config=lenient)
    result = ledger.edit(lm, REQUEST, "rome", config=rome_config)
    assert result.recorded and ledger.applied_ids() == [1]
    assert ledger.base_fingerprint == lm.fingerprint and ledger.model == lm.name
    ledger.detach(lm)
    assert lmedit.LM.from_hf(*hf).fingerprint == lm.fingerprint  # back to the base weights


# ---- generate and score --------------------------------------------------------------------------------

def test_generate_single_string_and_list(hf):
    lm = lmedit.LM.from_hf(*hf)
    one = lmedit.generate(lm, "Where is", max_new_tokens=3)
    many = lmedit.generate(lm, ["Where is", "The Louvre is located in the city of"], max_new_tokens=3)
    assert isinstance(one, str) and isinstance(many, list) and len(many) == 2
    assert many[0] == one  # greedy, and left padding does not change a prompt's continuation


def test_score_single_pairs_and_broadcast(hf):
    lm = lmedit.LM.from_hf(*hf)
    prompt = "The Eiffel Tower is located in the city of"
    one = lmedit.score(lm, prompt, "Paris")
    assert isinstance(one, lmedit.TargetScore) and one.logprob < 0 and one.n_tokens >= 1
    assert 0.0 <= one.token_accuracy <= 1.0
    candidates = lmedit.score(lm, prompt, ["Paris", "Rome"])
    assert isinstance(candidates, list) and len(candidates) == 2
    assert math.isclose(candidates[0].logprob, one.logprob, rel_tol=1e-5, abs_tol=1e-5)
    paired = lmedit.score(lm, [prompt, "Where is"], ["Paris", "Rome"])
    assert math.isclose(paired[0].logprob, one.logprob, rel_tol=1e-5, abs_tol=1e-5)
    assert len(lmedit.score(lm, [prompt, "Where is"], "Paris")) == 2
    with pytest.raises(ValueError, match="2 prompts but 3 targets"):
        lmedit.score(lm, [prompt, "Where is"], ["a", "b", "c"])
