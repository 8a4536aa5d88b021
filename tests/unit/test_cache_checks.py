"""Cache files are data, checked (`lmedit.cache`; issue #15 part 4).

For each kind of cache file (key statistics, sampled corpus, context prefixes, AlphaEdit projections, KN
neuron sets, suggested layer), a wrong file is planted where the clean run left its file: NaN values, a wrong
shape, another model's provenance, truncated bytes, a checksum mismatch, the old format without metadata,
a payload of the wrong type. The call that uses it must warn, recompute, give the clean run's result bit for
bit, and leave the clean file on disk. Also: empty corpora and non-finite statistics are errors that cache
nothing, directories are private, no temporary file survives a write, URL downloads are keyed by the URL.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

import lmedit
from lmedit.cache import (TMP_SUFFIX, CacheWarning, atomic_write, publish_dir, read_tensors, temp_dir, tensor_digest,
                          write_json, write_tensors)
from lmedit.editors.alphaedit import AlphaEditConfig, AlphaEditEditor
from lmedit.editors.kn import KnConfig, KnEditor
from lmedit.editors.rome import RomeConfig, RomeEditor
from lmedit.errors import CorpusError
from lmedit.stats import CorpusSpec, StatsCache, key_second_moment
from lmedit.testing import TINY_CORPUS, tiny_lm
from lmedit.tracing import Fact, LayerSuggestion, suggest_layer

REQUEST = lmedit.EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
FACTS = [Fact("{} is in downtown", "The Space Needle", "Seattle"),
         Fact("{} plays the sport of", "Michael Jordan", "basketball")]
OTHER_MODEL = "0" * 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(TINY_CORPUS * 40))
    return path


@dataclass(frozen=True)
class Kind:
    """One kind of cache file: the call that writes and reads it, and where the file lands under the cache root."""

    pattern: str                                  # glob under the cache root, matching exactly one file
    run: Callable[[Path, Path], Any]              # (cache root, corpus file) -> result (an edit or a suggestion)
    also_remove: str | None = None                # a cache file that would hide the planted one (read first)


def _rome(**overrides) -> Callable[[Path, Path], Any]:
    def run(root: Path, corpus: Path):
        config = RomeConfig(**{"layer": 1, "corpus": f"file:{corpus}", "corpus_tokens": 2000, "prefixes_short": 2,
                               "prefixes_long": 1, **overrides})
        return RomeEditor(config, cache=StatsCache(root)).edit(tiny_lm("llama"), [REQUEST])
    return run


def _alphaedit(root: Path, corpus: Path):
    config = AlphaEditConfig(layers=(1, 2), corpus=f"file:{corpus}", corpus_tokens=2000, prefixes=2)
    return AlphaEditEditor(config, cache=StatsCache(root)).edit(tiny_lm("llama"), [REQUEST])


def _kn(root: Path, corpus: Path):
    config = KnConfig(n_prefixes=0, steps=4, refine_facts=3, refine_share=0.0, fallback_top_k=1)
    return KnEditor(config, cache=StatsCache(root)).edit(tiny_lm("llama"), [REQUEST])


def _suggestion(root: Path, corpus: Path):
    return suggest_layer(tiny_lm("llama"), FACTS, samples=2, noise=0.5, cache=root / "tracing")


KINDS = {
    "key statistics": Kind("*/*/layer1-n2000.safetensors", _rome()),
    "sampled corpus": Kind("*/*/corpus.json", _rome(corpus="sampled", corpus_tokens=256),
                           also_remove="*/*/layer1-n256.safetensors"),
    "prefixes": Kind("*/prefixes-*.json", _rome()),
    "projection": Kind("*/*/nullspace-layer1-*.safetensors", _alphaedit),
    "neuron sets": Kind("*/kn-contrast-*.json", _kn),
    "suggested layer": Kind("tracing/*/suggest_layer-*.json", _suggestion),
}


def _find(root: Path, pattern: str) -> Path:
    (path,) = root.glob(pattern)
    return path


def _assert_same(result: Any, reference: Any) -> None:
    """Bit for bit: torch.equal on every factor of the edit's deltas, or equal suggestions (floats included)."""
    if isinstance(reference, LayerSuggestion):
        assert result == reference
        return
    assert result.deltas.keys() == reference.deltas.keys()
    for name, delta in reference.deltas.items():
        for part in ("left", "right", "dense"):
            mine, theirs = getattr(result.deltas[name], part), getattr(delta, part)
            assert (mine is None and theirs is None) or torch.equal(mine, theirs), (name, part)


@pytest.fixture(scope="module")
def clean(tmp_path_factory, corpus):
    """Per kind, computed once: the clean-cache result and the cache directory it left."""
    done: dict[str, tuple[Any, Path]] = {}

    def get(kind: str) -> tuple[Any, Path]:
        if kind not in done:
            root = tmp_path_factory.mktemp("clean")
            done[kind] = (KINDS[kind].run(root, corpus), root)
        return done[kind]
    return get


def _content(path: Path) -> Any:
    """What a cache file holds: a safetensors file's metadata and tensor bytes (its header's key order is not
    fixed), or the parsed JSON."""
    data = path.read_bytes()
    if path.suffix != ".safetensors":
        return json.loads(data)
    metadata = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    return metadata, {name: (t.dtype, t.shape, t.numpy().tobytes()) for name, t in load_safetensors(data).items()}


# --- planting wrong files ---------------------------------------------------------------------------
def _plant_tensors(path: Path, how: str) -> None:
    data = path.read_bytes()
    metadata = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    provenance = json.loads(metadata["provenance"])
    tensors = load_safetensors(data)
    (name,) = tensors
    good = tensors[name]
    if how == "nan":  # with a matching checksum and provenance: only the finiteness check catches it
        bad = good.clone()
        bad[0, 0] = float("nan")
        path.write_bytes(save_safetensors({name: bad}, metadata={**metadata, "sha256": tensor_digest({name: bad})}))
    elif how == "wrong shape":
        write_tensors(path, {name: good[:-1, :-1].contiguous()}, provenance)
    elif how == "other model":
        write_tensors(path, tensors, {**provenance, "model": OTHER_MODEL})
    elif how == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif how == "checksum":
        path.write_bytes(save_safetensors({name: good * 2}, metadata=metadata))
    elif how == "old format":  # what lmedit wrote before its cache files carried provenance and a checksum
        path.write_bytes(save_safetensors(tensors, metadata={"model": provenance["model"]}))
    else:
        raise AssertionError(how)


def _plant_json(path: Path, how: str) -> None:
    envelope = json.loads(path.read_text())
    payload, provenance = envelope["payload"], envelope["provenance"]
    if how == "nan":
        if isinstance(payload, dict):
            envelope["payload"] = {**payload, "curve": [float("nan"), *payload["curve"][1:]]}
        else:
            envelope["payload"] = [*payload[:-1], float("nan")]
        path.write_text(json.dumps(envelope))
    elif how == "wrong shape":  # the right types, the wrong lengths
        if isinstance(payload, dict):
            bad = {**payload, "curve": payload["curve"][:-1]}
        elif all(isinstance(item, list) and item and isinstance(item[0], int) for item in payload):
            bad = [sequence[:-1] for sequence in payload]
        else:
            bad = payload[:-1]
        write_json(path, bad, provenance)
    elif how == "wrong type":  # a JSON object where a list is expected (a list where an object is expected)
        write_json(path, [payload] if isinstance(payload, dict) else {"payload": payload}, provenance)
    elif how == "other model":
        write_json(path, payload, {**provenance, "model": OTHER_MODEL})
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    elif how == "checksum":
        envelope["payload"] = {**payload, "layer": 0} if isinstance(payload, dict) else [*payload, payload[-1]]
        if isinstance(payload, dict) and payload["layer"] == 0:
            envelope["payload"]["layer"] = 1
        path.write_text(json.dumps(envelope))
    elif how == "old format":
        path.write_text(json.dumps(payload))
    else:
        raise AssertionError(how)


REASONS = {"nan": "non-finite", "wrong shape": r"expected torch\.float32 \(|(expected|is not) (a list of )?\d+ ",
           "wrong type": "the payload is", "other model": f"computed for model='{OTHER_MODEL}'",
           "truncated": "truncated", "checksum": "checksum mismatch", "old format": "older lmedit"}
CASES = [(kind, how) for kind in KINDS
         for how in ("nan", "wrong shape", "other model", "truncated", "checksum", "old format",
                     *(() if KINDS[kind].pattern.endswith(".safetensors") else ("wrong type",)))]


@pytest.mark.parametrize(("kind", "how"), CASES, ids=[f"{k}-{h}" for k, h in CASES])
def test_a_wrong_cache_file_is_recomputed_with_a_warning(kind, how, clean, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path / "unused"))
    reference, clean_root = clean(kind)
    root = tmp_path / "cache"
    shutil.copytree(clean_root, root)
    path = _find(root, KINDS[kind].pattern)
    good = _content(path)
    if KINDS[kind].also_remove:
        _find(root, KINDS[kind].also_remove).unlink()
    (_plant_tensors if path.suffix == ".safetensors" else _plant_json)(path, how)
    assert path.read_bytes() != _find(clean_root, KINDS[kind].pattern).read_bytes()

    with pytest.warns(CacheWarning) as caught:
        result = KINDS[kind].run(root, corpus)
    messages = [str(w.message) for w in caught if issubclass(w.category, CacheWarning)]
    assert any(str(path) in m and re.search(REASONS[how], m) and "recomputing" in m for m in messages), messages
    _assert_same(result, reference)
    assert _content(path) == good  # rewritten (atomically) with what the clean run wrote
    assert not list(root.rglob(f"*{TMP_SUFFIX}"))


def test_a_clean_cache_is_read_back_without_warnings(clean, corpus, tmp_path, recwarn):
    for kind in ("key statistics", "prefixes", "suggested layer"):
        reference, clean_root = clean(kind)
        root = tmp_path / kind.replace(" ", "-")
        shutil.copytree(clean_root, root)
        before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
        _assert_same(KINDS[kind].run(root, corpus), reference)
        assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before  # read, not rewritten
    assert not [w for w in recwarn if issubclass(w.category, CacheWarning)]


# --- statistics that must never be cached ----------------------------------------------------------
@pytest.mark.parametrize(("name", "text"), [("empty.txt", ""), ("blank.txt", "  \n\n \t\n\n"),
                                            ("blank.jsonl", '{"text": "   "}\n\n{"text": ""}\n')])
def test_an_empty_corpus_file_is_a_clear_error_and_caches_nothing(name, text, tmp_path, corpus):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(CorpusError, match=f"corpus file {path} has no text"):
        RomeConfig(layer=1, corpus=f"file:{path}")  # before any model work
    # emptied after the settings were checked: the statistics refuse it too, and nothing is written
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TINY_CORPUS) if path.suffix == ".jsonl"
                    else "\n\n".join(TINY_CORPUS))
    editor = RomeEditor(RomeConfig(layer=1, corpus=f"file:{path}", corpus_tokens=200), cache=StatsCache(tmp_path / "c"))
    spec = CorpusSpec(source=f"file:{path}", n_tokens=200)
    path.write_text(text)
    with pytest.raises(CorpusError, match=f"corpus file {path} has no text"):
        editor.edit(tiny_lm("llama"), [REQUEST])
    with pytest.raises(CorpusError, match=f"corpus file {path} has no text"):
        key_second_moment(tiny_lm("llama"), [1], spec, cache=StatsCache(tmp_path / "c"))
    assert not [p for p in (tmp_path / "c").rglob("*") if p.is_file()]


def test_a_non_finite_statistic_is_an_error_and_is_not_cached(tmp_path, corpus):
    lm = tiny_lm("gpt2")
    lm.model.transformer.h[1].mlp.c_fc.weight.mul_(1e30)  # keys ~1e30: their second moment overflows float32
    spec = CorpusSpec(source=f"file:{corpus}", n_tokens=300, seq_len=32)
    with pytest.raises(CorpusError, match=f"over corpus file {corpus} .* not finite at layers \\[1\\]"):
        key_second_moment(lm, [0, 1], spec, cache=StatsCache(tmp_path / "c"))
    assert not [p for p in (tmp_path / "c").rglob("*") if p.is_file()]  # not even layer 0's finite one


# --- directories, temporaries, failed writes ------------------------------------------------------
def test_cache_directories_are_private_and_no_temporary_is_left(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path / "cache"))
    old_umask = os.umask(0o022)
    try:
        _rome()(tmp_path / "cache" / "stats", corpus)
        suggest_layer(tiny_lm("llama"), FACTS[:1], samples=1, noise=0.5)  # the default root: $LMEDIT_CACHE/tracing
    finally:
        os.umask(old_umask)
    directories = [tmp_path / "cache", *(p for p in (tmp_path / "cache").rglob("*") if p.is_dir())]
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert len(directories) >= 5 and len(files) >= 3
    assert {oct(stat.S_IMODE(d.stat().st_mode)) for d in directories} == {"0o700"}
    assert {oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {"0o600"}
    assert not [p for p in files if p.name.endswith((TMP_SUFFIX, ".tmp"))]


def test_atomic_write_failure_keeps_the_old_file_and_sweeps_only_stale_temporaries(tmp_path):
    path = tmp_path / "cache" / "thing.json"
    atomic_write(path, b"old")

    def broken(f):
        f.write(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_bytes() == b"old" and sorted(p.name for p in path.parent.iterdir()) == ["thing.json"]
    # a killed writer's temporary (an hour old) is swept by the next write; a fresh one may be a writer at work
    stale = path.parent / f".thing.json.123-abcd{TMP_SUFFIX}"
    fresh = path.parent / f".thing.json.456-ef01{TMP_SUFFIX}"
    unrelated = path.parent / "notes.lmedit-tmp.txt"
    for p in (stale, fresh, unrelated):
        p.write_bytes(b"x")
    os.utime(stale, (1_000_000_000, 1_000_000_000))  # 2001: long stale
    atomic_write(path.parent / "other.json", b"new")
    assert not stale.exists() and fresh.exists() and unrelated.exists()


def test_a_directory_artefact_is_published_whole_by_one_rename(tmp_path):
    # How a converted built-in model reaches the cache (lmedit.models.load): built in a private scratch directory,
    # renamed into place; the scratch directory goes away; a second publisher keeps the first one's copy.
    target = tmp_path / "cache" / "models" / "tiny-1.0"
    for content in ("first", "second"):
        with temp_dir(target.parent, "tiny") as scratch:
            assert scratch.name.endswith(TMP_SUFFIX) and stat.S_IMODE(scratch.stat().st_mode) == 0o700
            (scratch / "out").mkdir()
            atomic_write(scratch / "out" / "config.json", content.encode())
            assert publish_dir(scratch / "out", target) == (content == "first")
    assert (target / "config.json").read_text() == "first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny-1.0"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o700


def test_an_unwritable_cache_warns_and_the_result_is_unchanged(tmp_path, corpus):
    lm = tiny_lm("llama")
    spec = CorpusSpec(source=f"file:{corpus}", n_tokens=300, seq_len=32)
    reference = key_second_moment(lm, [1], spec)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache root should be")
    with pytest.warns(CacheWarning, match="could not be written"):
        result = key_second_moment(lm, [1], spec, cache=StatsCache(blocker / "stats"))
    assert torch.equal(result[1], reference[1]) and blocker.read_text().startswith("a file")


# --- URL downloads --------------------------------------------------------------------------------
def test_url_downloads_are_cached_under_a_hash_of_the_url(tmp_path, monkeypatch):
    from lmedit.eval.datasets import reading

    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LMEDIT_DATA", raising=False)
    served = {"https://a.example/x/data.json": b'[{"from": "a"}]', "https://b.example/y/data.json": b'[{"from": "b"}]'}
    calls = []

    def urlopen(url, timeout):
        calls.append(url)
        return io.BytesIO(served[url])

    monkeypatch.setattr(reading.urllib.request, "urlopen", urlopen)
    a, b = (reading.fetch(url) for url in served)
    assert a != b and a.name == b.name == "data.json"
    assert a.read_bytes() == served["https://a.example/x/data.json"] and b.read_bytes() == served["https://b.example/y/data.json"]
    assert reading.fetch("https://a.example/x/data.json") == a and len(calls) == 2  # the second time from the cache
    assert stat.S_IMODE(a.parent.stat().st_mode) == 0o700 and not list(a.parent.glob(f"*{TMP_SUFFIX}"))
    # a file that an older lmedit cached by name only is not taken for the default URL's data
    (tmp_path / "cache" / "data" / "data.json").write_bytes(b'[{"from": "elsewhere"}]')
    assert reading.resolve(None, name="x", filename="data.json", url="https://b.example/y/data.json") == b


def test_a_shape_known_only_once_computed_is_checked_on_its_other_axes(tmp_path):
    # AlphaEdit's null-space basis is (d_mlp, r) with r found by the eigendecomposition: expected (d_mlp, None)
    path, provenance = tmp_path / "basis.safetensors", {"kind": "test"}
    write_tensors(path, {"U": torch.ones(6, 4)}, provenance)
    assert read_tensors(path, provenance, {"U": ((6, None), torch.float32)})["U"].shape == (6, 4)
    for wrong in [((5, None), torch.float32), ((6, None, None), torch.float32), ((None,), torch.float32),
                  ((6, None), torch.float64)]:
        with pytest.warns(CacheWarning, match="expected"):
            assert read_tensors(path, provenance, {"U": wrong}) is None
