import json

import pytest
import torch

from lmedit.errors import LMEditError
from lmedit.hooks import capture
from lmedit.stats import CorpusSpec, StatsCache, corpus_sequences, key_second_moment, sample_sequences, stdlib_docstrings
from lmedit.testing import TINY_CORPUS, tiny_lm
from lmedit.tokens import pad_batch
from lmedit.types import Site


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(TINY_CORPUS * 10))
    return path


def test_second_moment_matches_direct_computation(tmp_path, corpus_file):
    lm = tiny_lm("gpt2")
    spec = CorpusSpec(source=f"file:{corpus_file}", n_tokens=600, seq_len=32)
    stats = key_second_moment(lm, [1, 3], spec, cache=StatsCache(tmp_path / "cache"), batch_size=4)
    seqs = corpus_sequences(lm, spec)
    assert sum(len(s) for s in seqs) >= 600
    batch = pad_batch(lm, seqs)
    with torch.no_grad(), capture(lm, [Site("mlp.key", 1), Site("mlp.key", 3)]) as acts:
        lm.model(**batch.model_inputs())
    mask = batch.attention_mask.bool()
    for layer in (1, 3):
        keys = acts[Site("mlp.key", layer)][mask].double()
        torch.testing.assert_close(stats[layer], keys.T @ keys / keys.shape[0])
    # cached: read back (float32 on disk) without running the model
    cached = key_second_moment(lm, [3], spec, cache=StatsCache(tmp_path / "cache"))
    torch.testing.assert_close(cached[3], stats[3].float().double())
    files = sorted(p.name for p in (tmp_path / "cache").rglob("*.safetensors"))
    assert files == ["layer1-n600.safetensors", "layer3-n600.safetensors"]


def test_one_layer_alone_equals_several_in_one_pass(corpus_file):
    lm = tiny_lm("llama")
    spec = CorpusSpec(source=f"file:{corpus_file}", n_tokens=300, seq_len=32)
    both = key_second_moment(lm, [0, 2], spec)
    alone = key_second_moment(lm, [2], spec)
    torch.testing.assert_close(both[2], alone[2])


def test_sampled_corpus_is_seeded_and_cached(tmp_path):
    lm = tiny_lm("llama")
    a = sample_sequences(lm, 3, 8, seed=1, batch_size=2)
    b = sample_sequences(lm, 3, 8, seed=1, batch_size=2)
    c = sample_sequences(lm, 3, 8, seed=2, batch_size=2)
    assert a == b and a != c and all(len(s) == 8 for s in a)
    spec = CorpusSpec(source="sampled", n_tokens=32, seq_len=8, seed=1)
    cache = StatsCache(tmp_path)
    seqs = corpus_sequences(lm, spec, cache)
    assert cache.corpus_path(lm, spec).exists()
    assert json.loads(cache.corpus_path(lm, spec).read_text())["payload"] == seqs  # in lmedit.cache's envelope
    phases = []
    key_second_moment(lm, [1], spec, cache=cache, progress=lambda phase, done, total: phases.append(phase))
    assert phases and set(phases) == {"key statistics"}  # the sampled corpus came from the cache


def test_corpus_errors(tmp_path):
    with pytest.raises(ValueError, match="source"):
        CorpusSpec(source="wiki")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CorpusSpec(source=f"file:{tmp_path / 'missing.txt'}")
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(LMEditError, match="c.jsonl:2"):
        corpus_sequences(tiny_lm("llama"), CorpusSpec(source=f"file:{bad}", n_tokens=10))


def test_stdlib_docstrings_are_english_prose():
    texts = stdlib_docstrings()
    assert len(texts) > 500
    assert sum(len(t) for t in texts) > 500_000
    assert all(len(t) >= 200 for t in texts)
