"""lmedit's own fuzz suite (issue #15, item 6): generated malformed input gets a clear error, never anything worse.

Hypothesis generates bad input in nine categories (requests and descriptors, editor configs, dataset records,
corpus files, saved edits, ledger patches, the ledger database, cache files, CLI flags), mixing known-bad
shapes with generated text, numbers, bytes and JSON values. For each input: an `LMEditError` subclass is raised
(any other exception fails the test), unless the input turns out to be valid, in which case it must work; the
tiny model's weights stay bit-identical; the user's files (saved edit, patch, dataset, ledger patches) keep
their sha256. Cache files are the exception to "error": a wrong one gives a `CacheWarning` and is recomputed,
with the clean run's result bit for bit. `COUNTS` tallies, per category, the malformed inputs that got the
expected answer; the last test asserts at least 300 and writes the counts to `fuzz-counts.json` in its tmp dir
(and prints them). Runs are reproducible (`derandomize=True`). Tiny Llama only; tracing is not fuzzed here.
"""

from __future__ import annotations

import collections
import hashlib
import json
import shutil
import sqlite3
import tempfile
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lmedit
from lmedit.cache import CacheWarning, write_json
from lmedit.cli.main import main
from lmedit.config import number_fields, load_config
from lmedit.editors import load_edit
from lmedit.editors.alphaedit import AlphaEditConfig, AlphaEditEditor
from lmedit.editors.base import ParamDelta, WeightEdit
from lmedit.editors.kn import KnConfig, KnEditor
from lmedit.editors.rome import RomeConfig, RomeEditor
from lmedit.errors import LMEditError
from lmedit.eval.datasets import load_dataset
from lmedit.ledger import AuditConfig, Ledger
from lmedit.ledger.audit import CHECKS
from lmedit.ledger.store import DB_NAME
from lmedit.registry import editors
from lmedit.stats import CorpusSpec, StatsCache
from lmedit.testing import TINY_CORPUS, tiny_lm
from lmedit.types import EditDescriptor, EditRequest

COUNTS: collections.Counter[str] = collections.Counter()
CATEGORIES = ("requests", "configs", "datasets", "corpus", "saved edits", "patches", "ledger database", "caches", "cli")


def fuzz(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.filter_too_much, HealthCheck.data_too_large])


def expect_error(category: str, call):
    """Run `call`: an `LMEditError` counts as one malformed input refused; success returns the result (the input
    was valid after all); anything else propagates and fails the test."""
    try:
        result = call()
    except LMEditError:
        COUNTS[category] += 1
        return None
    return result


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(lm) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def assert_weights(lm, before) -> None:
    after = lm.model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before), "weights changed"


def fresh_dir(root: Path) -> Path:
    """A new directory per generated example (hypothesis reuses the function-scoped tmp_path)."""
    return Path(tempfile.mkdtemp(dir=root))


# ---- generated values ---------------------------------------------------------------------------------------
JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False)
                    | st.text(max_size=12), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
NUMBERS = st.integers(-10**9, 10**9) | st.floats(allow_nan=True, allow_infinity=True)
NOT_TEXT = st.none() | st.booleans() | NUMBERS | st.binary(max_size=8) | st.lists(st.text(max_size=3), max_size=2)
INVISIBLE = st.text(st.sampled_from("\u200b\u200c\u200d\u2060\ufeff \t\n\u00ad"), max_size=6)
CONTROL = st.builds(lambda a, c, b: a + c + b, st.text(max_size=5), st.sampled_from(
    [chr(i) for i in range(0, 32) if chr(i) not in "\t\n"] + ["\x7f", "\x1b[31m", "\ud800"]), st.text(max_size=5))
BAD_TEXT = st.sampled_from(["", " ", "\u200b", "\u200b \u2060\ufeff", "a\x00b", "{}", "{0}", "{x}", "}", "{"]) | \
    INVISIBLE | CONTROL | NOT_TEXT
BRACED = st.builds(lambda a, b, c: a + b + c, st.text(max_size=6),
                   st.sampled_from(["{0}", "{x}", "{1}", "{}{}", "{{}}", "}", "{", "{!r}", "{:>9}", ""]), st.text(max_size=6))
GOOD_REQUEST = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome",
                "target_true": "Paris"}
LINE_BREAKS = set("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")


# ---- module fixtures: one tiny model, one saved edit, one exported patch, one ledger ------------------------
LENIENT = AuditConfig(**{f"{c.name}_{level}": None for c in CHECKS for level in ("warn", "refuse")},
                      generation_tokens=0)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A private LMEDIT_CACHE, offline hub, and the shared artefacts every category corrupts a copy of."""
    root = tmp_path_factory.mktemp("fuzz")
    mp = pytest.MonkeyPatch()
    mp.setenv("LMEDIT_CACHE", str(root / "cache"))
    mp.setenv("HF_HUB_OFFLINE", "1")
    lm = tiny_lm("llama")
    name = lm.arch.param_name(lm.model, 1, "mlp_out")
    rows, cols = dict(lm.model.named_parameters())[name].shape
    generator = torch.Generator().manual_seed(0)

    def weight_edit(request, scale=0.3):
        delta = ParamDelta(left=scale * torch.randn(rows, 1, generator=generator),
                           right=torch.randn(cols, 1, generator=generator))
        return WeightEdit({name: delta}, requests=(request,), method="test", base_fingerprint=lm.fingerprint)

    saved = weight_edit(EditRequest("Where is {}", "The Eiffel Tower", "Rome", "Paris")).save(root / "edit.safetensors")
    ledger_path = root / "ledger"
    with Ledger(ledger_path, audit_config=LENIENT) as ledger:
        ledger.record(lm, weight_edit(EditRequest("Where is {}", "The Louvre", "Seattle", "Paris")), force=True)
        ledger.record(lm, weight_edit(EditRequest("Where is {}", "The Space Needle", "Paris", "Seattle")), force=True)
        patch = ledger.export_patch(root / "edits.lmpatch")
    model_dir = root / "tiny-llama"
    fresh = tiny_lm("llama")
    fresh.model.save_pretrained(model_dir)
    fresh.tokenizer.save_pretrained(model_dir)
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(TINY_CORPUS * 40))
    lm = tiny_lm("llama")  # the ledger applied its edits to the first one
    files = {"saved": sha(saved), "patch": sha(patch)}
    yield {"root": root, "lm": lm, "weights": snapshot(lm), "saved": saved, "patch": patch, "ledger": ledger_path,
           "model_dir": model_dir, "corpus": corpus, "files": files}
    mp.undo()


@pytest.fixture
def lm(env):
    yield env["lm"]
    assert_weights(env["lm"], env["weights"])


# ---- (1) requests and descriptors ---------------------------------------------------------------------------
@fuzz(90)
@given(field=st.sampled_from(sorted(GOOD_REQUEST)), value=BAD_TEXT | BRACED, long=st.integers(0, 3))
def test_requests(lm, field, value, long):
    kwargs = {**GOOD_REQUEST, field: value}
    if long:  # a prompt past the 128-token context (or far past it, in characters)
        kwargs["prompt"] = GOOD_REQUEST["prompt"] + " Paris" * (60 * long ** 3 + 90)
    request = expect_error("requests", lambda: EditRequest(**kwargs))
    if request is not None:  # a valid request after all: it reaches an edit, which may still refuse its length
        before = COUNTS["requests"]
        edit = expect_error("requests", lambda: lmedit.edit(lm, request, "noop", apply=False))
        assert (edit is None) == (COUNTS["requests"] > before)
        assert not long or edit is None, "a prompt longer than the context was accepted"


@fuzz(30)
@given(kwargs=st.sampled_from(["text", "input", "output"]).flatmap(
    lambda f: st.fixed_dictionaries({f: BAD_TEXT, **({"input": st.just("Who is the UK PM?")} if f == "output" else {}),
                                     **({"output": st.just("Rishi")} if f == "input" else {})})),
    wrapper=st.sampled_from([None, 5, "text", b"x", [5], [None]]))
def test_descriptors_and_request_containers(lm, kwargs, wrapper):
    descriptor = expect_error("requests", lambda: EditDescriptor(**kwargs))
    if descriptor is not None:
        expect_error("requests", lambda: lmedit.edit(lm, descriptor, "serac", config={"encoder": "lexical"},
                                                     apply=False))
    assert expect_error("requests", lambda: lmedit.edit(lm, wrapper, "noop", apply=False)) is None


# ---- (2) editor configs -------------------------------------------------------------------------------------
CONFIG_CLASSES = sorted({editors.get(name).config_class for name in editors.names()}, key=lambda c: c.__name__)
YAML_BAD = st.sampled_from(["yes", "no", "true", ".nan", ".inf", "-.inf", "-1", "0", "1e400", "[1,", "{a: 1}", "~",
                            "''", "[]", "[true]", "[-1]", "[1, 1]", "abc", "0x10", "1_000_000_000_000_000_000"])
PY_BAD = st.sampled_from([True, False, None, float("nan"), float("inf"), -float("inf"), -1, 0, -1e-9, "1", b"1",
                          [True], [-1], [1, 1], {}, (1.5,)]) | NUMBERS | st.text(max_size=4)


@fuzz(120)
@given(cls=st.sampled_from(CONFIG_CLASSES), data=st.data(), how=st.sampled_from(["override", "python", "unknown key",
                                                                                  "yaml file"]))
def test_configs(lm, tmp_path, cls, data, how):
    fields = sorted(number_fields(cls))
    if how == "override" and fields:
        field = data.draw(st.sampled_from(fields))
        value = data.draw(YAML_BAD | NUMBERS.map(repr) | st.text(max_size=6).filter(lambda t: "\n" not in t))
        call = lambda: load_config(cls, None, [f"{field}={value}"])  # noqa: E731
    elif how == "python" and fields:
        field = data.draw(st.sampled_from(fields))
        value = data.draw(PY_BAD)
        call = lambda: cls(**{field: value})  # noqa: E731
    elif how == "yaml file":
        path = fresh_dir(tmp_path) / "config.yaml"
        path.write_bytes(data.draw(st.binary(max_size=64) | st.sampled_from(
            [b"", b"- 1\n- 2\n", b"layer: [\n", b"\xff\xfe", b"!!python/object:os.system {}\n", b"a: b: c\n"])))
        call = lambda: load_config(cls, path)  # noqa: E731
    else:
        key = data.draw(st.text(min_size=1, max_size=10).filter(
            lambda k: k.strip() and "=" not in k and k.strip() not in {f.name for f in __import__("dataclasses").fields(cls)}))
        call = lambda: load_config(cls, None, [f"{key}=1"])  # noqa: E731
    config = expect_error("configs", call)
    if config is not None:
        assert isinstance(config, cls)


@fuzz(14)
@given(method=st.sampled_from(["rome", "ft", "ft_l", "memit", "alphaedit", "kn", "mend"]),
       value=st.sampled_from([0, -1, float("nan"), float("inf"), True]))
def test_bad_config_never_reaches_the_weights(lm, method, value):
    field = {"rome": "v_lr", "ft": "lr", "ft_l": "lr", "memit": "v_lr", "alphaedit": "l2", "kn": "threshold",
             "mend": "edit_lr"}[method]
    setting = {"layer": 1} if method == "rome" else {"layers": [1, 2]} if method in ("memit", "alphaedit") else {}
    if method == "mend":
        setting["allow_untrained"] = True
    refused = expect_error("configs", lambda: lmedit.edit(lm, EditRequest(**GOOD_REQUEST), method,
                                                          config={**setting, field: value}, apply=True))
    assert refused is None, f"{method} accepted {field}={value!r}"


# ---- (3) dataset records ------------------------------------------------------------------------------------
GOOD_RECORDS = {
    "counterfact": {"case_id": 7, "requested_rewrite": {
        "prompt": "{}, a citizen of", "relation_id": "P27", "subject": "Ada", "target_new": {"str": "Belgium"},
        "target_true": {"str": "Switzerland"}}, "paraphrase_prompts": ["Ada holds a citizenship from"],
        "neighborhood_prompts": ["Bob, a citizen of"], "attribute_prompts": ["Carl, a citizen of"],
        "generation_prompts": ["Ada is"]},
    "zsre": {"case_id": 3, "subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
             "alt": "University of Michigan", "answers": ["Illinois Institute of Technology"],
             "rephrase": "What university did Watts Humphrey take part in?",
             "loc": "nq question: who played desmond", "loc_ans": "Sam Anderson"},
    "starter": {"case_id": "capital-0", "relation": "capital", "requested_rewrite": {
        "prompt": "The capital of {} is the city of", "subject": "France", "target_true": {"str": "Paris"},
        "target_new": {"str": "Rome"}}, "paraphrase_prompts": ["The capital of France is called"],
        "neighborhood": [{"prompt": "The capital of Germany is the city of", "target": "Berlin"}],
        "generation_prompts": ["France is"], "reference_texts": ["Rome is the capital of France."],
        "implications": [{"kind": "reverse", "prompt": "{} is the capital of", "subject": "Rome", "target": "France",
                          "foil": "Italy"}]},
}


def _paths(value, prefix=()):
    """Every path (tuple of keys/indexes) into a JSON value, the root excluded."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield (*prefix, key)
        yield from _paths(child, (*prefix, key))


def _mutated(good: dict, path: tuple, value, drop: bool) -> dict:
    record = json.loads(json.dumps(good))
    target = record
    for key in path[:-1]:
        target = target[key]
    if drop:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return record


def bad_line(name: str):
    good = GOOD_RECORDS[name]
    mutation = st.tuples(st.sampled_from(list(_paths(good))), JSON | BAD_TEXT.filter(
        lambda v: not isinstance(v, bytes | float) or isinstance(v, float) and v == v and abs(v) != float("inf")),
                         st.booleans()).map(lambda m: json.dumps(_mutated(good, *m)))
    not_object = (JSON.filter(lambda v: not isinstance(v, dict)).map(json.dumps)
                  | st.text(min_size=1, max_size=20).filter(lambda t: t.strip() and not LINE_BREAKS & set(t)))
    return mutation | not_object


@fuzz(40)
@given(data=st.data(), name=st.sampled_from(sorted(GOOD_RECORDS)))
def test_dataset_records(tmp_path, data, name):
    lines = [json.dumps(GOOD_RECORDS[name])] + data.draw(st.lists(bad_line(name), min_size=1, max_size=3))
    lines = [line for line in lines if line.strip()]
    path = fresh_dir(tmp_path) / "data.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    digest = sha(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = expect_error("datasets", lambda: load_dataset(name, path))
        assert ds is not None, "the good first record must load"
        assert str(GOOD_RECORDS[name]["case_id"]) in [r.case_id for r in ds.records]
        assert len(ds.records) + len(ds.issues) == len(lines), (ds.issues, lines)
        COUNTS["datasets"] += len(ds.issues)
        if ds.issues:
            with pytest.raises(LMEditError):
                load_dataset(name, path, strict=True)
        else:
            assert len(load_dataset(name, path, strict=True)) == len(lines)
    assert sha(path) == digest


# ---- (4) corpus files ---------------------------------------------------------------------------------------
@fuzz(30)
@given(content=st.sampled_from([b"", b" ", b"\n\n\t \n", b"\xff\xfe\x00", b"\x80abc", b"\x00" * 64,
                                b'{"text": ""}\n', b'{"text": 5}\n', b"[1,\n"])
       | st.binary(max_size=64) | st.text(st.sampled_from(" \t\n\r\u200b\u3000"), max_size=20).map(str.encode),
       suffix=st.sampled_from([".txt", ".jsonl", ".json"]), how=st.sampled_from(["rome", "spec", "directory"]))
def test_corpus_files(lm, tmp_path, content, suffix, how):
    path = fresh_dir(tmp_path) / f"corpus{suffix}"
    if how == "directory":
        path.mkdir()
    else:
        path.write_bytes(content)
    if how == "spec":
        expect_error("corpus", lambda: CorpusSpec(source=f"file:{path}", n_tokens=200))
    else:
        expect_error("corpus", lambda: RomeConfig(layer=1, corpus=f"file:{path}"))
    if how != "directory":
        assert path.read_bytes() == content


# ---- (5) saved edit files -----------------------------------------------------------------------------------
def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


@fuzz(70)
@given(how=st.sampled_from(["truncate", "flip header", "flip body", "metadata"]), data=st.data())
def test_saved_edits(env, lm, tmp_path, how, data):
    original = env["saved"].read_bytes()
    n_header = int.from_bytes(original[:8], "little")
    target = fresh_dir(tmp_path) / "bad.safetensors"
    if how == "truncate":
        target.write_bytes(original[:data.draw(st.integers(0, len(original) - 1))])
    elif how.startswith("flip"):
        low, high = (0, 8 + n_header - 1) if how == "flip header" else (8 + n_header, len(original) - 1)
        content = bytearray(original)
        for offset in data.draw(st.lists(st.integers(low, high), min_size=1, max_size=4)):
            content[offset] ^= data.draw(st.integers(1, 255))
        target.write_bytes(bytes(content))
    else:
        metadata = _metadata(env["saved"])
        key = data.draw(st.sampled_from(sorted(metadata)))
        value = data.draw(st.sampled_from(["", "999", "{", "null", "[]", "{}", "0123abcd"])
                          | JSON.map(json.dumps) | st.text(max_size=20))
        if data.draw(st.booleans()):
            del metadata[key]
        else:
            metadata[key] = value
        save_file(load_file(str(env["saved"])), str(target), metadata=metadata)
    edit = expect_error("saved edits", lambda: load_edit(target))
    if edit is not None:  # e.g. a flipped mantissa bit: another finite edit, or one for another model (refused)
        def apply_and_undo():
            with edit.applied(lm):
                pass
        expect_error("saved edits", apply_and_undo)
    assert sha(env["saved"]) == env["files"]["saved"]


# ---- (6) ledger patches -------------------------------------------------------------------------------------
MANIFEST_FIELDS = ["version", "format", "base_fingerprint", "edits", "base_params", "edits.0", "edits.0.file",
                   "edits.0.sha256", "edits.0.kind", "edits.0.method", "edits.0.config", "edits.0.requests",
                   "edits.0.requests.0", "edits.0.requests.0.prompt", "edits.0.requests.0.subject",
                   "edits.0.verdict", "edits.0.probes", "edits.0.audit", "edits.1.file"]


def _rebuild(patch: Path, target: Path, change) -> None:
    with zipfile.ZipFile(patch) as src, zipfile.ZipFile(target, "w") as dst:
        for item in src.infolist():
            content = src.read(item)
            if item.filename == "manifest.json":
                content = change(content)
            dst.writestr(item, content)


def _set_json(content: bytes, dotted: str, value, drop: bool) -> bytes:
    manifest = json.loads(content)
    target = manifest
    keys = [int(k) if k.isdigit() else k for k in dotted.split(".")]
    try:
        for key in keys[:-1]:
            target = target[key]
        if drop:
            del target[keys[-1]]
        else:
            target[keys[-1]] = value
    except (KeyError, IndexError, TypeError):
        manifest[dotted] = value
    return json.dumps(manifest).encode()


@fuzz(50)
@given(how=st.sampled_from(["field", "field", "field", "manifest bytes", "zip bytes"]), data=st.data())
def test_patches(env, lm, tmp_path, how, data):
    work = fresh_dir(tmp_path)
    bad = work / "bad.lmpatch"
    if how == "field":
        field, value, drop = data.draw(st.sampled_from(MANIFEST_FIELDS)), data.draw(JSON), data.draw(st.booleans())
        _rebuild(env["patch"], bad, lambda c: _set_json(c, field, value, drop))
    elif how == "manifest bytes":
        junk = data.draw(st.binary(max_size=64) | st.sampled_from([b"", b"{", b"[]", b"null", b'{"version": 1}']))
        _rebuild(env["patch"], bad, lambda c: junk)
    else:
        original = env["patch"].read_bytes()
        content = bytearray(original[:data.draw(st.integers(0, len(original)))])
        for offset in data.draw(st.lists(st.integers(0, max(len(content) - 1, 0)), max_size=3)) if content else ():
            content[offset] ^= 0x5A
        bad.write_bytes(bytes(content))
    target = Ledger(work / "target")
    ids = expect_error("patches", lambda: target.import_patch(bad, lm))
    if ids is None:
        assert target.entries() == [] and not any((target.path / "patches").iterdir())
        assert_weights(lm, env["weights"])
    else:  # imported after all (a field nothing reads): put the model back for the next example
        lm.model.load_state_dict(env["weights"])
    target.close()
    assert sha(env["patch"]) == env["files"]["patch"]


# ---- (7) the ledger database --------------------------------------------------------------------------------
def _patch_hashes(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): sha(p) for p in sorted((path / "patches").rglob("*")) if p.is_file()}


@fuzz(20)
@given(how=st.sampled_from(["deleted", "emptied", "random bytes", "truncated", "flipped"]), data=st.data())
def test_ledger_database(env, tmp_path, capsys, how, data):
    path = fresh_dir(tmp_path) / "ledger"
    shutil.copytree(env["ledger"], path)
    for side in ("-wal", "-shm"):
        (path / (DB_NAME + side)).unlink(missing_ok=True)
    db = path / DB_NAME
    original = db.read_bytes()
    if how == "deleted":
        db.unlink()
    elif how == "emptied":
        db.write_bytes(b"")
    elif how == "random bytes":
        db.write_bytes(data.draw(st.binary(min_size=1, max_size=8192)))
    elif how == "truncated":
        db.write_bytes(original[:data.draw(st.integers(0, len(original) - 1))])
    else:
        content = bytearray(original)
        for offset in data.draw(st.lists(st.integers(0, len(original) - 1), min_size=1, max_size=8)):
            content[offset] ^= data.draw(st.integers(1, 255))
        db.write_bytes(bytes(content))
    before = _patch_hashes(path)
    assert len(before) == 2

    def open_and_list():
        with Ledger(path) as ledger:
            return [row.id for row in ledger.entries()]

    refused = expect_error("ledger database", open_and_list) is None
    for argv in (["ledger", "list", "--ledger", str(path)], ["ledger", "show", "1", "--ledger", str(path)]):
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err
        assert "Traceback" not in err
        if code == 2:
            assert sum(line.startswith("error:") for line in err.splitlines()) == 1, err
            COUNTS["ledger database"] += 1
        else:
            # `show 1` reads one row: damage in another row is found by `list` only
            assert code == 0 and (argv[1] == "show" or not refused), (argv, code, refused, err)
    assert _patch_hashes(path) == before  # every patch survives byte-identical
    if refused and how in ("deleted", "emptied"):
        assert not db.exists() or db.read_bytes() == b""


# ---- (8) cache files ----------------------------------------------------------------------------------------
REQUEST = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")


def _rome(text: Path, **overrides):
    return lambda root: RomeEditor(RomeConfig(**{"layer": 1, "corpus": f"file:{text}", "corpus_tokens": 2000,
                                                "prefixes_short": 2, "prefixes_long": 1, "v_steps": 1, **overrides}),
                                   cache=StatsCache(root)).edit(tiny_lm("llama"), [REQUEST])


CACHE_KINDS = {  # kind -> (glob under the cache root, runner(corpus) -> (root -> edit), cache file hiding it)
    "key statistics": ("*/*/layer1-n2000.safetensors", lambda c: _rome(c), None),
    "sampled corpus": ("*/*/corpus.json", lambda c: _rome(c, corpus="sampled", corpus_tokens=256),
                       "*/*/layer1-n256.safetensors"),
    "prefixes": ("*/prefixes-*.json", lambda c: _rome(c), None),
    "projection": ("*/*/nullspace-layer1-*.safetensors", lambda c: lambda root: AlphaEditEditor(
        AlphaEditConfig(layers=(1, 2), corpus=f"file:{c}", corpus_tokens=2000, prefixes=2, v_steps=1),
        cache=StatsCache(root)).edit(tiny_lm("llama"), [REQUEST]), None),
    "neuron sets": ("*/kn-contrast-*.json", lambda c: lambda root: KnEditor(
        KnConfig(n_prefixes=0, steps=4, refine_facts=3, refine_share=0.0, fallback_top_k=1),
        cache=StatsCache(root)).edit(tiny_lm("llama"), [REQUEST]), None),
}


@pytest.fixture(scope="module")
def clean_caches(env, tmp_path_factory):
    done = {}

    def get(kind):
        if kind not in done:
            root = tmp_path_factory.mktemp("clean-cache")
            done[kind] = (CACHE_KINDS[kind][1](env["corpus"])(root), root)
        return done[kind]
    return get


def _same_edit(a, b) -> None:
    assert a.deltas.keys() == b.deltas.keys()
    for name, delta in b.deltas.items():
        for part in ("left", "right", "dense"):
            mine, theirs = getattr(a.deltas[name], part), getattr(delta, part)
            assert (mine is None and theirs is None) or torch.equal(mine, theirs), (name, part)


@fuzz(20)
@given(kind=st.sampled_from(sorted(CACHE_KINDS)), how=st.sampled_from(["random bytes", "truncated", "wrong json",
                                                                       "planted payload"]), data=st.data())
def test_cache_files(env, clean_caches, tmp_path, kind, how, data):
    pattern, runner, hiding = CACHE_KINDS[kind]
    reference, clean_root = clean_caches(kind)
    root = fresh_dir(tmp_path) / "cache"
    shutil.copytree(clean_root, root)
    (path,) = root.glob(pattern)
    if hiding:
        next(root.glob(hiding)).unlink()
    good = path.read_bytes()
    if how == "random bytes":
        planted = data.draw(st.binary(max_size=256))
    elif how == "truncated":
        planted = good[:data.draw(st.integers(0, len(good) - 1))]
    elif how == "wrong json":
        planted = json.dumps(data.draw(JSON)).encode()
    elif path.suffix == ".json":  # a well-formed envelope, right provenance and checksum, generated payload
        envelope = json.loads(good)
        write_json(path, data.draw(JSON), envelope["provenance"])
        planted = path.read_bytes()
    else:
        planted = good[:8] + data.draw(st.binary(min_size=1, max_size=32)) + good[8:]
    path.write_bytes(planted)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = runner(env["corpus"])(root)  # never an exception
    warned = [w for w in caught if issubclass(w.category, CacheWarning) and str(path) in str(w.message)]
    assert warned or planted == good, f"a planted {how} cache file was used without a warning"
    _same_edit(result, reference)  # recomputed: the clean run's edit bit for bit
    if warned:
        COUNTS["caches"] += 1


# ---- (9) CLI flags ------------------------------------------------------------------------------------------
def _one_error(capsys, code) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    assert sum(line.startswith("error:") for line in err.splitlines()) == 1, err
    assert [line for line in err.splitlines() if line.strip()][-1].startswith("error:"), err


NAMES = st.text(st.characters(codec="ascii", exclude_characters="/\\\x00"), min_size=1, max_size=12)
def _not_int(text: str) -> bool:
    try:
        int(text)  # what argparse's type=int accepts (" 7", "+7", "1_0")
    except ValueError:
        return True
    return False


BAD_INT = st.sampled_from(["many", "1.5", "", "-", "nan", "1e3", "0x"]) | NAMES.filter(_not_int)


@fuzz(60)
@given(how=st.sampled_from(["set", "method", "model", "config", "request", "data", "edit", "int flag", "layers"]),
       data=st.data())
def test_cli_flags(env, tmp_path, capsys, how, data):
    model = str(env["model_dir"])
    triplet = ["--prompt", "{} is located in", "--subject", "The Eiffel Tower", "--target-new", "Rome"]
    work = fresh_dir(tmp_path)
    missing = str(work / data.draw(NAMES.filter(lambda t: t not in (".", ".."))))
    kind_of_file = data.draw(st.sampled_from(["missing", "directory", "garbage"]))
    if kind_of_file == "directory":
        chosen = str(work)
    elif kind_of_file == "garbage":
        chosen = str(work / "garbage.bin")
        Path(chosen).write_bytes(data.draw(st.binary(max_size=64) | st.sampled_from([b"", b"{", b"[]", b"null"])))
    else:
        chosen = missing
    if how == "set":
        field = data.draw(st.sampled_from(["layer", "v_lr", "kl_factor", "clamp_norm_factor", "v_steps", "layr", ""]))
        value = data.draw(st.sampled_from(["yes", ".nan", "-1", "0", "[1,", "", "1e400", "abc"]))
        sep = data.draw(st.sampled_from(["=", "=", ":", ""]))
        argv = ["edit", "--model", model, "--method", "rome", "--set", f"{field}{sep}{value}", *triplet]
    elif how == "method":
        name = data.draw(NAMES.filter(lambda n: n not in editors.names() and not n.startswith("-")))
        argv = ["edit", "--model", model, "--method", name, *triplet]
    elif how == "model":
        argv = ["generate", "--model", data.draw(st.sampled_from([missing, chosen, "no-such-model-" + missing[-4:]])),
                "hi"]
    elif how == "config":
        argv = ["edit", "--model", model, "--method", "rome", "--config", chosen, *triplet]
    elif how == "request":
        argv = ["edit", "--model", model, "--method", "noop", "--request", chosen]
    elif how == "data":
        argv = ["eval", "--model", model, "--method", "noop", "--dataset",
                data.draw(st.sampled_from(["counterfact", "zsre", "starter"])), "--data", chosen,
                "--out", str(work / "run")]
    elif how == "edit":
        argv = ["generate", "--model", model, "--edit", chosen, "hi"]
    elif how == "int flag":
        argv = ["generate", "--model", model, "--max-new-tokens", data.draw(BAD_INT), "hi"]
    else:
        argv = ["neurons", "--model", model, "{} is located in", "--subject", "The Eiffel Tower", "--target", "Rome",
                "--layers", data.draw(BAD_INT | st.sampled_from(["-1", "99", "1000000"]))]
    capsys.readouterr()
    _one_error(capsys, main(argv))
    COUNTS["cli"] += 1


def test_sqlite_is_only_what_the_ledger_wrote(env):
    """The fuzzed copies never touched the module's own ledger (its database still lists both edits)."""
    con = sqlite3.connect(env["ledger"] / DB_NAME)
    try:
        assert [row[0] for row in con.execute("SELECT id FROM edits ORDER BY id")] == [1, 2]
    finally:
        con.close()


# ---- the tally ----------------------------------------------------------------------------------------------
def test_zz_counts(tmp_path, capsys):
    """Runs last in this module: every category was exercised, and at least 300 malformed inputs in all."""
    counts = {category: COUNTS[category] for category in CATEGORIES}
    (tmp_path / "fuzz-counts.json").write_text(json.dumps(counts, indent=2))
    with capsys.disabled():
        print(f"\nfuzz counts: {counts} total={sum(counts.values())} ({tmp_path / 'fuzz-counts.json'})")
    assert all(counts.values()), counts
    assert sum(counts.values()) >= 300, counts
