"""Saved edits are checked on load: every malformed file raises an `EditFileError` naming the file and the problem.

A valid edit is made once by ROME (weight edit) and once by SERAC with the lexical encoder (wrapper edit) on
the tiny Llama, saved, then corrupted: truncated, random bytes, metadata rewritten (missing keys, unknown
format or version, empty fingerprint, malformed JSON), tensors renamed, reshaped, retyped or made NaN. Each
load is refused and the model the user would have applied it to keeps its weights bit for bit. Also: an edit
without a base fingerprint cannot be saved, the CLI reports a bad edit file as one `error:` line, and a
ledger patch whose edit file (or manifest) is malformed is refused before anything is imported.
"""

from __future__ import annotations

import json
import os
import zipfile

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from safetensors.torch import save as save_bytes

import lmedit
from lmedit.cli.main import main
from lmedit.editors import WeightEdit, WrapperEdit, load_edit
from lmedit.editors.rome import RomeConfig, RomeEditor
from lmedit.editors.serac import SeracConfig, SeracEditor
from lmedit.errors import EditFileError, LMEditError, MissingFileError
from lmedit.ledger import Ledger
from lmedit.ledger.store import LedgerError
from lmedit.stats import StatsCache
from lmedit.testing import TINY_CORPUS, tiny_lm

REQUEST = lmedit.EditRequest("Where is {}", "The Eiffel Tower", "Rome", "Paris")
MESSI = lmedit.EditRequest("{} plays the sport of", "Lionel Messi", "tennis", "soccer")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One valid ROME edit and one valid SERAC edit of the tiny Llama, saved; and the model's fingerprint."""
    root = tmp_path_factory.mktemp("edits")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(TINY_CORPUS * 40))
    lm = tiny_lm("llama")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMEDIT_CACHE", str(root / "cache"))
        config = RomeConfig(layer=1, corpus=f"file:{corpus}", corpus_tokens=2000, prefixes_short=2, prefixes_long=1)
        rome = RomeEditor(config, cache=StatsCache(root / "stats")).edit(lm, [REQUEST])
    serac = SeracEditor(SeracConfig(encoder="lexical", threshold=0.5)).edit(lm, [REQUEST, MESSI])
    return {"weight": rome.save(root / "rome.safetensors"), "wrapper": serac.save(root / "serac.safetensors"),
            "fingerprint": lm.fingerprint}


@pytest.fixture
def lm():
    return tiny_lm("llama")


def _snapshot(lm) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def _read(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    return load_file(str(path)), meta


def _rewrite(source, target, *, tensors=None, meta=None):
    """A copy of the saved edit `source` at `target`, with `tensors(dict)` / `meta(dict)` applied in place."""
    data, metadata = _read(source)
    if tensors is not None:
        tensors(data)
    if meta is not None:
        meta(metadata)
    save_file(data, str(target), metadata=metadata)
    return target


def _only(data: dict[str, torch.Tensor], part: str) -> str:
    return next(k for k in data if k.endswith(f"::{part}"))


def _refused(path, lm, match: str, error: type[Exception] = EditFileError) -> None:
    """Loading `path` raises `error` matching `match` and naming the file; the user's model is untouched."""
    before = _snapshot(lm)
    with pytest.raises(error, match=match) as info:
        load_edit(path).apply(lm)
    assert str(path) in str(info.value)
    after = _snapshot(lm)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_valid_files_load(saved, lm):
    weight, wrapper = load_edit(saved["weight"]), load_edit(saved["wrapper"])
    assert isinstance(weight, WeightEdit) and weight.base_fingerprint == saved["fingerprint"] == lm.fingerprint
    assert isinstance(wrapper, WrapperEdit) and wrapper.base_fingerprint == lm.fingerprint
    with weight.applied(lm):
        pass  # the apply-time checks pass too


# ---- not a safetensors file --------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated end", "truncated header", "random bytes", "empty", "header only"])
def test_not_a_safetensors_file(saved, lm, tmp_path, damage):
    data = saved["weight"].read_bytes()
    content = {"truncated end": data[:-10], "truncated header": data[:20], "random bytes": os.urandom(4096),
               "empty": b"", "header only": data[:8 + int.from_bytes(data[:8], "little")]}[damage]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    _refused(path, lm, "is not a safetensors edit file, or it is truncated")
    with pytest.raises(EditFileError, match="truncated"):
        WeightEdit.load(path)


def test_missing_file_and_directory(lm, tmp_path):
    with pytest.raises(MissingFileError, match="no edit file at"):
        load_edit(tmp_path / "none.safetensors")
    (tmp_path / "folder.safetensors").mkdir()
    _refused(tmp_path / "folder.safetensors", lm, "is a directory")


# ---- metadata ----------------------------------------------------------------------------------------------


def _drop(key):
    def change(m):
        del m[key]
    return change


def _set(key, value):
    return lambda m: m.update({key: value})


METADATA_CASES = {
    "missing info": (_drop("info"), "lacks 'info'"),
    "missing requests": (_drop("requests"), "lacks 'requests'"),
    "missing fingerprint": (_drop("base_fingerprint"), "lacks 'base_fingerprint'"),
    "missing format": (_drop("format"), "format=None"),
    "unknown format": (_set("format", "lmedit.something_else"), "format='lmedit.something_else'"),
    "version 999": (_set("version", "999"), "format version '999'"),
    "version non-numeric": (_set("version", "one"), "format version 'one'"),
    "version float": (_set("version", "1.0"), "format version '1.0'"),
    "version empty": (_set("version", ""), "format version ''"),
    "empty fingerprint": (_set("base_fingerprint", ""), "'base_fingerprint' is ''"),
    "blank fingerprint": (_set("base_fingerprint", "  "), "'base_fingerprint' is '  '"),
    "info not JSON": (_set("info", "{not json"), "metadata 'info' is not valid JSON"),
    "config a list": (_set("config", "[1, 2]"), "metadata 'config' must be a JSON object, got list"),
    "requests an object": (_set("requests", "{}"), "metadata 'requests' must be a JSON array, got dict"),
    "request not a request": (_set("requests", json.dumps([{"prompt": 5, "subject": "A", "target_new": "B"}])),
                              r"metadata 'requests'\[0\] is not a valid edit request"),
}


@pytest.mark.parametrize("case", sorted(METADATA_CASES))
def test_bad_weight_edit_metadata(saved, lm, tmp_path, case):
    change, match = METADATA_CASES[case]
    _refused(_rewrite(saved["weight"], tmp_path / "bad.safetensors", meta=change), lm, match)


def test_format_is_named_for_the_kind_asked_for(saved, tmp_path):
    with pytest.raises(EditFileError, match="is not an lmedit weight edit"):
        WeightEdit.load(saved["wrapper"])
    with pytest.raises(EditFileError, match="is not an lmedit wrapper edit"):
        WrapperEdit.load(saved["weight"])


# ---- tensors -----------------------------------------------------------------------------------------------


def _rename(part, new):
    def change(data):
        key = _only(data, part)
        data[new(key)] = data.pop(key)
    return change


def _replace(part, fn):
    def change(data):
        key = _only(data, part)
        data[key] = fn(data[key])
    return change


def _nan(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def _inf(t):
    t = t.clone()
    t.view(-1)[-1] = float("inf")
    return t


TENSOR_CASES = {
    "no part": (_rename("left", lambda k: k.rpartition("::")[0]), "is not named '<parameter>::<part>'"),
    "unknown part": (_rename("left", lambda k: k.replace("::left", "::middle")), "is not named"),
    "path-like name": (_rename("left", lambda k: "../../etc/passwd::left"), "is not named"),
    "left without right": (lambda d: d.pop(_only(d, "right")), r"has parts \['left'\]"),
    "keys only": (lambda d: d.update({"model.layers.0.mlp.down_proj.weight::keys": torch.ones(4, 1)}), "keys only"),
    "dense and factors": (lambda d: d.update({_only(d, "left").replace("::left", "::dense"): torch.zeros(64, 128)}),
                          "has parts"),
    "rank mismatch": (_replace("right", lambda t: torch.cat([t, t], dim=1)), "factors of .* do not fit"),
    "1-d factor": (_replace("left", lambda t: t[:, 0].contiguous()), "factors of .* do not fit"),
    "empty dimension": (_replace("left", lambda t: t[:, :0].contiguous()), "every dimension must be >= 1"),
    "integer dtype": (_replace("left", lambda t: t.to(torch.int32)), "has dtype torch.int32"),
    "bool dtype": (_replace("right", lambda t: t > 0), "has dtype torch.bool"),
    "NaN": (_replace("left", _nan), "holds NaN or infinite values"),
    "inf": (_replace("right", _inf), "holds NaN or infinite values"),
}


@pytest.mark.parametrize("case", sorted(TENSOR_CASES))
def test_bad_weight_edit_tensors(saved, lm, tmp_path, case):
    change, match = TENSOR_CASES[case]
    _refused(_rewrite(saved["weight"], tmp_path / "bad.safetensors", tensors=change), lm, match)


def test_apply_time_shape_check_stays(saved, lm, tmp_path):
    """A consistent edit of the wrong size loads (it could fit another model) and is refused on apply."""
    def grow(data):
        for part in ("left", "right"):
            key = _only(data, part)
            data[key] = torch.cat([data[key], data[key]], dim=0)
    edit = load_edit(_rewrite(saved["weight"], tmp_path / "wide.safetensors", tensors=grow))
    before = _snapshot(lm)
    with pytest.raises(LMEditError, match="has shape"):
        edit.apply(lm)
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in before.items())


# ---- wrapper edits (SERAC) ---------------------------------------------------------------------------------


def _wrapper_meta(fn):
    def change(meta):
        data = json.loads(meta["wrapper_meta"])
        fn(data)
        meta["wrapper_meta"] = json.dumps(data)
    return change


WRAPPER_CASES = {
    "unknown wrapper": ({"meta": _set("wrapper", "nope")}, "holds a 'nope' wrapper edit"),
    "missing wrapper_meta": ({"meta": _drop("wrapper_meta")}, "lacks 'wrapper_meta'"),
    "wrapper_meta not JSON": ({"meta": _set("wrapper_meta", "[1,")}, "metadata 'wrapper_meta' is not valid JSON"),
    "wrapper_meta a string": ({"meta": _set("wrapper_meta", '"x"')}, "must be a JSON object, got str"),
    "version 999": ({"meta": _set("version", "999")}, "format version '999'"),
    "empty fingerprint": ({"meta": _set("base_fingerprint", "")}, "'base_fingerprint' is ''"),
    "NaN key": ({"tensors": lambda d: d.update(keys=_nan(d["keys"]))}, "tensor 'keys' holds NaN"),
    "integer key": ({"tensors": lambda d: d.update(keys=d["keys"].to(torch.int64))}, "has dtype torch.int64"),
    "odd tensor name": ({"tensors": lambda d: d.update({"a b": torch.zeros(1)})}, "is not a dotted identifier"),
    "missing head tensor": ({"tensors": lambda d: d.pop("head.bias")}, "a SERAC edit has"),
    "extra tensor": ({"tensors": lambda d: d.update({"head.extra": torch.zeros(1)})}, "a SERAC edit has"),
    "keys 1-d": ({"tensors": lambda d: d.update(keys=d["keys"][0].contiguous())}, "expected \\(n_entries, dim\\)"),
    "keys rows vs entries": ({"tensors": lambda d: d.update(keys=d["keys"][:1].contiguous())},
                             "has 2 entries but tensor 'keys' has 1 rows"),
    "bias of two values": ({"tensors": lambda d: d.update({"head.bias": torch.zeros(2)})}, "expected one value"),
    "attribute in template": ({"meta": _wrapper_meta(lambda m: m.update(template="{input.__class__} {edit}"))},
                              "may only use {edit} and {input}"),
    "format spec in template": ({"meta": _wrapper_meta(lambda m: m.update(template="{edit:>99999999}{input}"))},
                                "may only use"),
    "template without input": ({"meta": _wrapper_meta(lambda m: m.update(descriptor_template="{edit}"))},
                               "must contain {input}"),
    "template not a string": ({"meta": _wrapper_meta(lambda m: m.update(template=3))}, "must be a string"),
    "unknown encoder": ({"meta": _wrapper_meta(lambda m: m.update(encoder="bert"))}, "metadata 'encoder'"),
    "unknown view": ({"meta": _wrapper_meta(lambda m: m.update(view="middle"))}, "metadata 'view'"),
    "entries not a list": ({"meta": _wrapper_meta(lambda m: m.update(entries={}))}, "metadata 'entries'"),
    "entry without statement": ({"meta": _wrapper_meta(lambda m: m["entries"][0].pop("statement"))},
                                r"'entries'\[0\] must be an object"),
    "entry request without kind": ({"meta": _wrapper_meta(lambda m: m["entries"][1]["request"].pop("kind"))},
                                   r"'entries'\[1\].request is not a valid request"),
    "entry request malformed": ({"meta": _wrapper_meta(lambda m: m["entries"][0]["request"].update(prompt=7))},
                                r"'entries'\[0\].request is not a valid request"),
}


@pytest.mark.parametrize("case", sorted(WRAPPER_CASES))
def test_bad_wrapper_edit(saved, lm, tmp_path, case):
    change, match = WRAPPER_CASES[case]
    _refused(_rewrite(saved["wrapper"], tmp_path / "bad.safetensors", **change), lm, match)


# ---- saving, the CLI, ledger patches -----------------------------------------------------------------------


def test_an_edit_without_fingerprint_is_not_saved(saved, tmp_path):
    edit = load_edit(saved["weight"])
    edit.base_fingerprint = ""
    with pytest.raises(LMEditError, match="no base_fingerprint"):
        edit.save(tmp_path / "anonymous.safetensors")
    assert not list(tmp_path.iterdir())


def test_cli_reports_a_bad_edit_file_in_one_line(saved, model_dir, tmp_path, capsys):
    bad = _rewrite(saved["weight"], tmp_path / "v999.safetensors", meta=_set("version", "999"))
    assert main(["generate", "--model", str(model_dir), "--edit", str(bad), "hi"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "v999.safetensors has format version '999'" in lines[-1]
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in "\n".join(lines)


def _patch(saved, tmp_path, lm):
    """A ledger with the ROME edit recorded (audit thresholds off) and exported; returns the patch file."""
    from lmedit.ledger.audit import CHECKS, AuditConfig

    lenient = AuditConfig(**{f"{c.name}_{level}": None for c in CHECKS for level in ("warn", "refuse")},
                          generation_tokens=0)
    ledger = Ledger(tmp_path / "source", audit_config=lenient)
    ledger.record(lm, load_edit(saved["weight"]), force=True)
    return ledger.export_patch(tmp_path / "edits.lmpatch")


def _rebuild(patch, target, *, manifest=None, member=None):
    """A copy of `patch` with its manifest changed by `manifest(dict)` and its edit file's bytes by `member(bytes)`.
    The manifest's sha256 follows the new bytes, so only the load checks can catch the damage."""
    import hashlib

    with zipfile.ZipFile(patch) as archive:
        data = json.loads(archive.read("manifest.json"))
        files = {name: archive.read(name) for name in archive.namelist() if name != "manifest.json"}
    if member is not None:
        name = data["edits"][0]["file"]
        files[name] = member(files[name])
        data["edits"][0]["sha256"] = hashlib.sha256(files[name]).hexdigest()
    if manifest is not None:
        data = manifest(data) or data  # a change edits the manifest in place, or returns a whole new one
    with zipfile.ZipFile(target, "w") as archive:
        archive.writestr("manifest.json", json.dumps(data))
        for name, content in files.items():
            archive.writestr(name, content)
    return target


def _edit_bytes(saved, **change) -> bytes:
    """The bytes of the saved ROME edit with `tensors=[fn]` / `meta=[fn]` changes applied."""
    data, metadata = _read(saved["weight"])
    for fn in change.get("tensors", ()):
        fn(data)
    for fn in change.get("meta", ()):
        fn(metadata)
    return save_bytes(data, metadata=metadata)


PATCH_CASES = {
    "edit file version 999": ({"member": lambda b, s: _edit_bytes(s, meta=[_set("version", "999")])},
                              "format version '999'"),
    "edit file NaN": ({"member": lambda b, s: _edit_bytes(s, tensors=[_replace("left", _nan)])}, "holds NaN"),
    "edit file empty fingerprint": ({"member": lambda b, s: _edit_bytes(s, meta=[_set("base_fingerprint", "")])},
                                    "'base_fingerprint' is ''"),
    "edit file truncated": ({"member": lambda b, s: b[:-16]}, "truncated"),
    "edit of another model": ({"member": lambda b, s: _edit_bytes(s, meta=[_set("base_fingerprint", "0123abcd")])},
                              "was made on the model with fingerprint 0123abcd"),
    "kind differs": ({"manifest": lambda m: m["edits"][0].update(kind="wrapper")}, "the manifest says 'wrapper'"),
    "manifest version 999": ({"manifest": lambda m: m.update(version=999)}, "patch format version 999"),
    "manifest version text": ({"manifest": lambda m: m.update(version="1")}, "patch format version '1'"),
    "manifest without base": ({"manifest": _drop("base_fingerprint")}, "'base_fingerprint'"),
    "manifest empty base": ({"manifest": lambda m: m.update(base_fingerprint="")}, "'base_fingerprint'"),
    "edits not a list": ({"manifest": lambda m: m.update(edits={})}, "'edits' must be a non-empty list"),
    "no edits": ({"manifest": lambda m: m.update(edits=[])}, "'edits' must be a non-empty list"),
    "edit entry a string": ({"manifest": lambda m: m.update(edits=["x"])}, r"'edits\[1\]' must be an object"),
    "edit file missing": ({"manifest": lambda m: _drop("file")(m["edits"][0])}, r"'edits\[1\].file'"),
    "edit file outside": ({"manifest": lambda m: m["edits"][0].update(file="../x.edit")}, r"'edits\[1\].file'"),
    "sha256 a number": ({"manifest": lambda m: m["edits"][0].update(sha256=5)}, r"'edits\[1\].sha256'"),
    "config a list": ({"manifest": lambda m: m["edits"][0].update(config=[])}, r"'edits\[1\].config' must be an object"),
    "method missing": ({"manifest": lambda m: _drop("method")(m["edits"][0])}, r"'edits\[1\].method'"),
    "verdict a number": ({"manifest": lambda m: m["edits"][0].update(verdict=3)}, r"'edits\[1\].verdict'"),
    "probes malformed": ({"manifest": lambda m: m["edits"][0].update(probes=[{"case_id": "x"}])},
                         r"'edits\[1\].probes\[0\]' must be an audit record"),
    "probe prompt a number": ({"manifest": lambda m: m["edits"][0]["probes"][0]["paraphrases"][0].update(prompt=5)},
                              r"'edits\[1\].probes\[0\]' must be an audit record of strings"),
    "audit malformed": ({"manifest": lambda m: m["edits"][0].update(audit={"verdict": "keep"})},
                        r"'edits\[1\].audit' must be an audit report"),
    "base_params malformed": ({"manifest": lambda m: m.update(base_params={"w": {"shape": "[2,"}})},
                              "'base_params.w'"),
    "manifest empty": ({"manifest": lambda m: m.clear()}, "format=None"),
    "manifest a list": ({"manifest": lambda m: [m]}, "holds a JSON list, not an object"),
}


@pytest.mark.parametrize("case", sorted(PATCH_CASES))
def test_bad_patch_is_refused_before_anything_is_imported(saved, lm, tmp_path, case):
    patch = _patch(saved, tmp_path, lm)
    change, match = PATCH_CASES[case]
    member = change.get("member")
    bad = _rebuild(patch, tmp_path / "bad.lmpatch", manifest=change.get("manifest"),
                   member=(lambda b: member(b, saved)) if member else None)
    fresh = tiny_lm("llama")
    before = _snapshot(fresh)
    target = Ledger(tmp_path / "target")
    with pytest.raises(LedgerError, match=match) as info:
        target.import_patch(bad, fresh)
    assert "bad.lmpatch" in str(info.value)
    assert target.entries() == [] and list((target.path / "patches").iterdir()) == []
    assert all(torch.equal(v, fresh.model.state_dict()[k]) for k, v in before.items())


def test_valid_patch_imports(saved, lm, tmp_path):
    patch = _patch(saved, tmp_path, lm)
    fresh = tiny_lm("llama")
    assert Ledger(tmp_path / "target").import_patch(_rebuild(patch, tmp_path / "same.lmpatch"), fresh) == [1]
