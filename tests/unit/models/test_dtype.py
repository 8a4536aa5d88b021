"""Half-precision models (bfloat16, float16) on tiny random models: edits land and undo bit-exactly, the maths runs in
float32/float64, the checkpoint fingerprint is dtype-independent (a saved edit crosses dtypes, another checkpoint is
still refused) while caches stay keyed by the exact weights, and `--dtype` on the command line."""

from __future__ import annotations

import pytest
import torch

import lmedit
from lmedit.cli.main import main
from lmedit.editors import get_editor, load_edit
from lmedit.errors import LMEditError
from lmedit.hooks import patch
from lmedit.models.load import checkpoint_fingerprint, resolve_dtype, weights_fingerprint
from lmedit.scoring import next_token_logprobs
from lmedit.stats import CorpusSpec, StatsCache, key_second_moment
from lmedit.testing import TINY_CORPUS, tiny_lm
from lmedit.tokens import target_ids
from lmedit.types import Site

REQUEST = lmedit.EditRequest("Where is {}", "The Eiffel Tower", "Rome", "Paris")
HALF = [torch.bfloat16, torch.float16]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(TINY_CORPUS * 20))
    return f"file:{path}"


def _settings(method: str, corpus: str) -> dict:
    return {"rome": {"layer": 1, "corpus": corpus, "corpus_tokens": 1000, "prefixes_short": 1, "prefixes_long": 1},
            "memit": {"layers": [1, 2], "corpus": corpus, "corpus_tokens": 1000, "prefixes": 1, "mom2_weight": 100.0,
                      "clamp_norm_factor": 4.0},
            "ft": {"layers": [1], "lr": 1e-2, "steps": 10}}[method]


def _editor(method: str, corpus: str, tmp_path):
    editor = get_editor(method, _settings(method, corpus))
    if hasattr(editor, "cache"):
        editor.cache = StatsCache(tmp_path / "stats")
    return editor


def _half(dtype: torch.dtype, seed: int = 0) -> lmedit.LM:
    lm = tiny_lm("llama", seed=seed)
    lm.model.to(dtype)
    return lmedit.LM.from_hf(lm.model, lm.tokenizer)


def _snapshot(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def _identical(lm, snap) -> bool:
    return all(v.dtype == snap[k].dtype and torch.equal(snap[k], v) for k, v in lm.model.state_dict().items())


def test_the_checkpoint_fingerprint_is_the_same_in_every_dtype_and_the_weights_hash_is_not():
    lm = tiny_lm("llama")
    copies = [_half(dtype) for dtype in HALF]
    assert all(c.fingerprint == lm.fingerprint == checkpoint_fingerprint(lm.model) for c in copies)
    assert len({lm.weights_hash, *(c.weights_hash for c in copies)}) == 3
    assert lm.weights_hash == weights_fingerprint(lm.model)
    # Back to float32 after rounding: another exact hash, the same checkpoint.
    back = copies[0].model.to(torch.float32)
    assert checkpoint_fingerprint(back) == lm.fingerprint != weights_fingerprint(back)


def test_other_checkpoints_have_other_fingerprints():
    prints = {tiny_lm(family).fingerprint for family in ("llama", "mistral", "gemma", "gpt2")}
    assert len(prints) == 4  # llama, mistral and gemma share names, shapes and random signs: the family tells them apart
    assert tiny_lm("llama", seed=1).fingerprint != tiny_lm("llama").fingerprint


def test_patch_functions_compute_in_float32_on_a_half_precision_model():
    lm = _half(torch.bfloat16)
    site = Site("mlp.out", 1)
    seen = []

    def add(activation, _site):
        seen.append(activation.dtype)
        return activation + torch.full_like(activation, 1e-3)

    enc = lm.encode(["The Eiffel Tower"])
    with patch(lm, {site: add}):
        patched = lm.model(**enc).logits
    assert seen == [torch.float32] and patched.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("method", ["rome", "memit", "ft"])
def test_a_half_precision_edit_lands_and_undo_is_bit_exact(method, dtype, corpus, tmp_path):
    # rome and memit add their float32 δ to half-precision activations: `lmedit.hooks.patch` upcasts for them.
    lm = _half(dtype)
    snap = _snapshot(lm)
    new = target_ids(lm, REQUEST.target_new)[0]
    before = float(next_token_logprobs(lm, [REQUEST.text])[0][new])
    edit = _editor(method, corpus, tmp_path).edit(lm, [REQUEST])
    assert _identical(lm, snap)
    parts = [t for d in edit.deltas.values() for t in (d.dense, d.left, d.right) if t is not None]
    assert all(t.dtype == torch.float32 for t in parts)  # computed in float32/64 and stored so, not in `dtype`
    edit.apply(lm)
    after = float(next_token_logprobs(lm, [REQUEST.text])[0][new])
    assert after > before + 1.0, (before, after)
    assert all(p.dtype == dtype for p in lm.model.parameters())
    edit.undo()
    assert _identical(lm, snap)


@pytest.mark.parametrize("source, target", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                            (torch.float32, torch.float16)], ids=str)
def test_a_saved_edit_applies_to_another_dtype_of_the_same_checkpoint(source, target, corpus, tmp_path):
    made_on = tiny_lm("llama") if source == torch.float32 else _half(source)
    edit = _editor("rome", corpus, tmp_path).edit(made_on, [REQUEST])
    loaded = load_edit(edit.save(tmp_path / "edit.safetensors"))
    lm = tiny_lm("llama") if target == torch.float32 else _half(target)
    snap = _snapshot(lm)
    new = target_ids(lm, REQUEST.target_new)[0]
    before = float(next_token_logprobs(lm, [REQUEST.text])[0][new])
    with loaded.applied(lm):
        after = float(next_token_logprobs(lm, [REQUEST.text])[0][new])
        # The delta is added in float64 and rounded once to the model's dtype.
        (name, delta), = loaded.deltas.items()
        param = dict(lm.model.named_parameters())[name]
        expected = (snap[name].to(torch.float64) + delta.full(torch.float64)).to(target)
        assert param.dtype == target and torch.equal(param, expected)
    assert after > before + 1.0
    assert _identical(lm, snap)


def test_another_checkpoint_is_still_refused_in_any_dtype(corpus, tmp_path):
    edit = load_edit(_editor("rome", corpus, tmp_path).edit(tiny_lm("llama"), [REQUEST]).save(tmp_path / "e.safetensors"))
    for other in (tiny_lm("llama", seed=1), _half(torch.bfloat16, seed=1)):
        snap = _snapshot(other)
        with pytest.raises(LMEditError, match="fingerprint"):
            edit.apply(other)
        assert _identical(other, snap)


def test_an_edit_saved_with_the_old_exact_fingerprint_applies_to_the_same_weights_only(corpus, tmp_path):
    lm = tiny_lm("llama")
    edit = _editor("rome", corpus, tmp_path).edit(lm, [REQUEST])
    edit.base_fingerprint = lm.weights_hash  # what lmedit recorded before fingerprints were dtype-independent
    old = load_edit(edit.save(tmp_path / "old.safetensors"))
    with old.applied(tiny_lm("llama")):
        pass
    with pytest.raises(LMEditError, match="fingerprint"):
        old.apply(_half(torch.bfloat16))  # the exact hash names the float32 weights only


def test_key_statistics_of_a_bfloat16_model_are_float64_and_cached_apart(corpus, tmp_path):
    lm = _half(torch.bfloat16)
    cache = StatsCache(tmp_path / "stats")
    spec = CorpusSpec(source=corpus, n_tokens=300, seq_len=32)
    C = key_second_moment(lm, [1], spec, cache=cache)[1]
    assert C.dtype == torch.float64
    # The same mean of k kᵀ, accumulated in float64 from the bfloat16 keys (stored as float32).
    site = Site("mlp.key", 1)
    from lmedit.hooks import capture
    from lmedit.stats import corpus_sequences
    from lmedit.tokens import pad_batch

    batch = pad_batch(lm, corpus_sequences(lm, spec))
    with capture(lm, [site]) as acts:
        lm.model(**batch.model_inputs(), use_cache=False)
    keys = acts[site][batch.attention_mask.bool()].to(torch.float64)
    assert torch.allclose(C, (keys.T @ keys / len(keys)).to(torch.float32).to(torch.float64), rtol=1e-5, atol=1e-7)
    assert cache.path(lm, spec, 1).is_file() and lm.weights_hash in str(cache.path(lm, spec, 1))
    assert not cache.path(tiny_lm("llama"), spec, 1).exists()  # the float32 weights have their own statistics


def test_resolve_dtype_names_and_refusals():
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype(torch.float16) is torch.float16
    assert resolve_dtype(None) is torch.float32
    for bad in ("float8", "int8", torch.float64):
        with pytest.raises(LMEditError, match="unknown dtype"):
            resolve_dtype(bad)


def test_cli_dtype(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--dtype", "bfloat17", "The Eiffel Tower is"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown dtype 'bfloat17'") and "\n" not in err
    assert main(["generate", "--model", str(model_dir), "--dtype", "bfloat16", "--max-new-tokens", "2",
                 "The Eiffel Tower is"]) == 0


def test_a_ledger_refuses_another_dtype_by_name(tmp_path):
    from lmedit.ledger import Ledger, LedgerError
    from lmedit.ledger.audit import CHECKS, AuditConfig

    lenient = AuditConfig(**{f"{c.name}_{level}": None for c in CHECKS for level in ("warn", "refuse")},
                          generation_tokens=0)
    lm = tiny_lm("llama")
    name = lm.arch.param_name(lm.model, 1, "mlp_out")
    delta = lmedit.editors.ParamDelta(left=torch.randn(64, 1, generator=torch.Generator().manual_seed(0)) * 0.1,
                                      right=torch.randn(128, 1, generator=torch.Generator().manual_seed(1)) * 0.1)
    ledger = Ledger(tmp_path / "ledger", audit_config=lenient)
    ledger.record(lm, lmedit.editors.WeightEdit({name: delta}, requests=(REQUEST,), method="test"))
    assert ledger.base_fingerprint == lm.fingerprint
    half = _half(torch.bfloat16)
    snap = _snapshot(half)
    with pytest.raises(LedgerError, match="rebuilds its base in torch.float32"):
        ledger.apply(half)
    assert _identical(half, snap)
    ledger.apply(tiny_lm("llama"))  # the float32 weights are its base


def test_causal_tracing_on_a_half_precision_model_matches_float32():
    # Tracing's patches (noise, restored states, the recorded final state) run through `patch`'s float32 upcast.
    def traced(lm):
        result = lmedit.trace(lm, "The Eiffel Tower is located in the city of", subject="The Eiffel Tower", samples=2)
        return torch.tensor(result.scores, dtype=torch.float64), result.corrupted_prob

    reference, corrupted = traced(tiny_lm("llama"))
    for dtype in HALF:
        scores, half_corrupted = traced(_half(dtype))
        assert torch.allclose(scores, reference, rtol=0.05, atol=1e-4)
        assert half_corrupted == pytest.approx(corrupted, rel=0.05)
