"""Shipping edits on tiny models: patch file round trips, plain-transformers export, replay onto another model."""

import json
import zipfile
from types import SimpleNamespace

import pytest
import torch
import transformers
from ledger_helpers import LENIENT, REQUESTS, random_edit, same_weights, snapshot

from lmedit.ledger import Ledger, LedgerError
from lmedit.testing import tiny_lm

PROMPTS = ["Where is The Eiffel Tower", "The Louvre is located in the city of", "Michael Jordan plays"]


def _logits(lm):
    with torch.no_grad():
        return lm.model(**lm.encode(PROMPTS)).logits


def _ledger(tmp_path, lm, n=3, name="ledger"):
    ledger = Ledger(tmp_path / name, audit_config=LENIENT)
    for i in range(n):
        ledger.record(lm, random_edit(lm, REQUESTS[i], seed=i, layer=i % 2))
    return ledger


def test_export_import_round_trip_gives_identical_outputs(tmp_path, lm):
    ledger = _ledger(tmp_path, lm)
    ledger.revert(2, lm, audit=False)
    ledger.apply(lm)
    patch = ledger.export_patch(tmp_path / "edits.lmpatch")
    with zipfile.ZipFile(patch) as archive:
        manifest = json.loads(archive.read("manifest.json"))
    assert manifest["base_fingerprint"] == lm.fingerprint
    assert [e["source_id"] for e in manifest["edits"]] == [1, 3]  # only the applied patches
    assert patch.stat().st_size < 100_000

    fresh = tiny_lm("llama")  # stands for another process: a fresh copy of the base model
    copy = Ledger(tmp_path / "copy", audit_config=LENIENT)
    ids = copy.import_patch(patch, fresh)
    assert ids == [1, 2] and copy.base_fingerprint == lm.fingerprint
    assert same_weights(snapshot(fresh), snapshot(lm))
    assert torch.equal(_logits(fresh), _logits(lm))
    assert [r.requests for r in copy.entries()] == [ledger.entry(1).requests, ledger.entry(3).requests]
    assert copy.latest_report(1) is not None and copy.reports(1)[-1][0] == "import"
    assert copy.import_patch(patch, fresh) == []  # importing again adds nothing


def test_import_refuses_another_base(tmp_path, lm):
    patch = _ledger(tmp_path, lm, n=1).export_patch(tmp_path / "edits.lmpatch")
    with pytest.raises(LedgerError, match="model hash mismatch"):
        Ledger(tmp_path / "other").import_patch(patch, tiny_lm("llama", seed=1))
    other = tiny_lm("llama", seed=1)
    elsewhere = Ledger(tmp_path / "elsewhere", audit_config=LENIENT)
    elsewhere.record(other, random_edit(other, REQUESTS[0], seed=0))
    with pytest.raises(LedgerError, match="model hash mismatch"):
        elsewhere.import_patch(patch)
    assert len(elsewhere.entries()) == 1


def test_damaged_patch_file_is_refused(tmp_path, lm):
    patch = _ledger(tmp_path, lm, n=1).export_patch(tmp_path / "edits.lmpatch")
    with zipfile.ZipFile(patch) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        data = archive.read(manifest["edits"][0]["file"])
    bad = tmp_path / "bad.lmpatch"
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr("manifest.json", json.dumps(manifest))
        archive.writestr(manifest["edits"][0]["file"], data[:-4] + b"\0\0\0\0")
    target = Ledger(tmp_path / "target")
    with pytest.raises(LedgerError, match="damaged"):
        target.import_patch(bad)
    assert target.entries() == [] and list((target.path / "patches").iterdir()) == []
    (tmp_path / "not-a-patch").write_text("hello")
    with pytest.raises(LedgerError, match="not an lmedit patch file"):
        target.import_patch(tmp_path / "not-a-patch")


def test_exported_model_loads_with_plain_transformers(tmp_path, lm):
    ledger = _ledger(tmp_path, lm)
    out = ledger.export_model(lm, tmp_path / "edited")
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert json.loads((out / "lmedit-ledger.json").read_text())["base_fingerprint"] == lm.fingerprint
    # Plain transformers, as a user without lmedit would load it (tests/slow runs it in a separate process).
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        logits = model(**tokenizer(PROMPTS, return_tensors="pt", padding=True)).logits
    ledger.apply(lm)
    assert torch.equal(logits, _logits(lm))
    with pytest.raises(LedgerError, match="not empty"):
        ledger.export_model(lm, out)


def test_replay_reruns_the_requests_on_another_model(tmp_path, lm, rome_config):
    source = Ledger(tmp_path / "source", audit_config=LENIENT)
    for request in REQUESTS[:2]:
        source.edit(lm, request, "rome", config=rome_config)
    source.revert(1, lm, audit=False)
    source.edit(lm, REQUESTS[2], "rome", config=rome_config)
    configs = tmp_path / "configs"
    (configs / "rome").mkdir(parents=True)
    (configs / "rome" / "tiny-other.yaml").write_text("\n".join(f"{k}: {v}" for k, v in rome_config.items()))
    other = tiny_lm("llama", seed=1)
    other.name = "tiny-other"

    result = source.replay(other, into=tmp_path / "other", config_dir=configs)
    assert [i.source_id for i in result.items] == [2, 3]  # the applied edits, in order
    assert all(i.settings.endswith("tiny-other.yaml") for i in result.items)
    assert all(i.carried_over and i.report.checks["efficacy"].value == 1.0 for i in result.items)
    target = Ledger(tmp_path / "other")
    assert target.base_fingerprint == other.fingerprint != source.base_fingerprint
    assert [r.requests for r in target.entries()] == [source.entry(2).requests, source.entry(3).requests]
    assert target.entries()[0].source.startswith("replay:")
    # the weights are new edits computed on the other model, not the source's deltas
    (name, replayed), = target.load_edit(1).deltas.items()
    assert not torch.equal(replayed.left, source.load_edit(2).deltas[name].left)


def test_replay_without_a_config_file_takes_the_traced_layer(tmp_path, lm, rome_config, monkeypatch):
    source = Ledger(tmp_path / "source", audit_config=LENIENT)
    source.edit(lm, REQUESTS[0], "rome", config=rome_config)
    monkeypatch.setattr("lmedit.tracing.suggest_layer", lambda model: SimpleNamespace(layer=2))
    other = tiny_lm("llama", seed=1)
    other.name = "tiny-untraced"
    before = snapshot(other)
    result = source.replay(other, config_dir=tmp_path / "no-configs")
    (item,) = result.items
    assert item.settings == "recorded config, layer 2 from suggest_layer"
    assert item.report is not None and item.new_id == 1
    assert result.into is None and same_weights(before, snapshot(other))  # report only: other left unedited


def test_replay_reports_an_edit_that_cannot_be_made(tmp_path, lm, rome_config):
    source = Ledger(tmp_path / "source", audit_config=LENIENT)
    source.edit(lm, REQUESTS[0], "rome", config=rome_config)
    configs = tmp_path / "configs"
    (configs / "rome").mkdir(parents=True)
    (configs / "rome" / "tiny-small.yaml").write_text("layer: 9\n")  # the other model has 4 layers
    other = tiny_lm("llama", seed=1)
    other.name = "tiny-small"
    (item,) = source.replay(other, config_dir=configs).items
    assert not item.carried_over and "layer=9" in item.message
