"""Shipping edits: a patch file of the applied edits, importing it onto the same base, and a plain HF model.

A patch file is a zip archive (stored, not compressed: the tensors do not compress) of
    manifest.json      format, base model hash and name, the base sha256 of every touched parameter,
                       and per edit: kind, method, config, requests, audit probes, latest audit report
    edits/NNN.edit     each patch as its `Edit.save()` wrote it (sha256 in the manifest)
Only applied edits go in, in order. Importing refuses a ledger or a model with another base hash, checks
every patch's sha256, and skips patches the ledger already holds (importing twice changes nothing).

`export_model` writes base + applied edits with `save_pretrained` (safetensors, config, tokenizer), so
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads it without lmedit.

Not handled: exporting wrapper edits as a plain model (they are modules around the model, not weights).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import uuid
import zipfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from lmedit.errors import LMEditError, MissingFileError
from lmedit.ledger.audit import AuditReport
from lmedit.ledger.ledger import param_sha256
from lmedit.ledger.store import IMPORT_PREFIX, LedgerError, file_sha256, new_patch_name, now
from lmedit.models.load import weights_fingerprint
from lmedit.types import request_from_dict

if TYPE_CHECKING:
    from lmedit.ledger.ledger import Ledger
    from lmedit.models.load import LM

log = logging.getLogger(__name__)

PATCH_FORMAT = "lmedit.ledger_patch"
PATCH_VERSION = 1


def _add_path(archive: zipfile.ZipFile, source: Path, name: str) -> None:
    if source.is_dir():
        for file in sorted(p for p in source.rglob("*") if p.is_file()):
            archive.write(file, f"{name}/{file.relative_to(source).as_posix()}")
    else:
        archive.write(source, name)


def export_patch(ledger: Ledger, file: str | Path) -> Path:
    """Write the ledger's applied edits to one patch file (atomically: temporary file, then rename).

    Raises:
        LedgerError: the ledger has no applied edits.
    """
    rows = ledger.entries("applied")
    if not rows:
        raise LedgerError(f"the ledger {ledger.path} has no applied edits to export")
    file = Path(file)
    edits = []
    for i, row in enumerate(rows, 1):
        ledger.load_edit(row.id)  # checks the patch's sha256 before shipping it
        report = ledger.latest_report(row.id)
        edits.append({"file": f"edits/{i:03d}.edit", "sha256": row.patch_sha256, "kind": row.kind,
                      "method": row.method, "config": row.config, "requests": row.requests, "verdict": row.verdict,
                      "probes": row.probes, "info": row.info, "source_id": row.id, "created": row.created,
                      "audit": report.to_dict() if report else None})
    manifest = {"format": PATCH_FORMAT, "version": PATCH_VERSION, "created": now(),
                "base_fingerprint": ledger.base_fingerprint, "model": ledger.model,
                "base_params": ledger.store.base_params(), "edits": edits}
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.writestr("manifest.json", json.dumps(manifest, indent=1, default=str))
            for row, item in zip(rows, edits):
                _add_path(archive, ledger.store.patch_path(row.patch, row.id), item["file"])
        tmp.replace(file)
    finally:
        tmp.unlink(missing_ok=True)
    return file


def read_manifest(file: str | Path) -> dict[str, Any]:
    """The manifest of a patch file. Raises LedgerError for files that are not lmedit patch files."""
    file = Path(file)
    if not file.exists():
        raise MissingFileError(f"no patch file at {file}")
    try:
        with zipfile.ZipFile(file) as archive:
            manifest = json.loads(archive.read("manifest.json"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as exc:
        raise LedgerError(f"{file} is not an lmedit patch file ({exc})") from None
    if manifest.get("format") != PATCH_FORMAT:
        raise LedgerError(f"{file} is not an lmedit patch file (format={manifest.get('format')!r})")
    if int(manifest.get("version", 0)) > PATCH_VERSION:
        raise LedgerError(f"{file} has patch format version {manifest['version']}; this lmedit reads {PATCH_VERSION}")
    for i, item in enumerate(manifest.get("edits") or [], 1):  # stored requests are rendered later: refuse bad ones now
        for request in item.get("requests") or []:
            try:
                request_from_dict(request)
            except LMEditError as exc:
                raise LedgerError(f"edit {i} in {file} has an invalid request ({exc}); nothing was imported") from None
    return manifest


def _extract(archive: zipfile.ZipFile, name: str, target: Path) -> None:
    """Extract one edit (a file, or a directory of files) to `target`."""
    members = [m for m in archive.namelist() if m == name or m.startswith(name + "/")]
    if not members:
        raise LedgerError(f"the patch file lacks {name}")
    for member in members:
        relative = PurePosixPath(member).relative_to(name) if member != name else None
        if relative is not None and (".." in relative.parts or relative.is_absolute()):
            raise LedgerError(f"unsafe path {member!r} in the patch file")
        out = target if relative is None else target / Path(*relative.parts)
        out.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(member) as src, out.open("wb") as dst:
            shutil.copyfileobj(src, dst)


def import_patch(ledger: Ledger, file: str | Path, lm: LM | None = None) -> list[int]:
    """Add a patch file's edits to `ledger` (new, or one with the same base). Returns the new edit ids.

    Args:
        ledger: the receiving ledger.
        file: a file written by `export_patch`.
        lm: the base model; when given, its hash (and the touched parameters' bits) must match the patch's
            base, and it is left as base + every applied edit (so a broken patch fails here, not later).

    Raises:
        LedgerError: hash mismatch with the ledger or the model, a damaged patch (sha256), not a patch file.
    """
    manifest = read_manifest(file)
    base = manifest["base_fingerprint"]
    if ledger.base_fingerprint is not None and ledger.base_fingerprint != base:
        raise LedgerError(f"model hash mismatch: {file} holds edits of base model {base} ({manifest.get('model')}), "
                          f"but the ledger {ledger.path} is for base {ledger.base_fingerprint} ({ledger.model})")
    if lm is not None:
        ledger._to_base(lm)
        actual = weights_fingerprint(lm.model)
        if actual != base:
            raise LedgerError(f"model hash mismatch: {file} holds edits of base model {base} ({manifest.get('model')}), "
                              f"but {lm.name!r} has hash {actual}; load that base model, or replay the requests "
                              "with `lmedit ledger replay`")
        params = dict(lm.model.named_parameters())
        for name, expected in manifest.get("base_params", {}).items():
            if name not in params or param_sha256(params[name]) != expected["sha256"]:
                raise LedgerError(f"model hash mismatch: {lm.name!r}'s {name} differs from the base the patch was "
                                  f"made on ({file})")
    held = {r.patch_sha256 for r in ledger.entries()}
    new_ids: list[int] = []
    names: list[str] = []
    try:
        # Under the write lock: the scratch directory is swept by openers only while nobody holds the lock.
        with zipfile.ZipFile(file) as archive, ledger.store.write(), \
                tempfile.TemporaryDirectory(prefix=IMPORT_PREFIX, dir=ledger.store.root) as scratch:
            staged = []
            for i, item in enumerate(manifest["edits"]):
                if item["sha256"] in held:
                    continue
                target = Path(scratch) / f"{i}"
                _extract(archive, item["file"], target)
                if file_sha256(target) != item["sha256"]:
                    raise LedgerError(f"{item['file']} in {file} is damaged: its sha256 differs from the manifest's")
                staged.append((item, target))
            ledger._init_base(base, manifest.get("model") or (lm.name if lm is not None else ""))
            base_params = {name: (json.loads(p["shape"]), p["dtype"], p["sha256"])
                           for name, p in manifest.get("base_params", {}).items()}
            for item, target in staged:
                name = new_patch_name()
                names.append(name)
                target.replace(ledger.store.begin_patch(name))
                edit_id = ledger._insert(
                    name, kind=item["kind"], method=item["method"], config=item["config"], requests=item["requests"],
                    base_fingerprint=base, verdict=item.get("verdict"), probes=item.get("probes"),
                    info=item.get("info") or {}, source=f"import:{Path(file).name}#{item.get('source_id')}",
                    new_params=base_params)
                if item.get("audit"):
                    ledger._add_audit(edit_id, "import", AuditReport.from_dict(item["audit"]))
                new_ids.append(edit_id)
    except BaseException:
        if names:  # rolled back: the moved patches belong to no row; the next writer removes them (markers kept)
            log.warning("import of %s failed; its %d partial patch file(s) are removed by the next ledger write",
                        file, len(names))
        raise
    for name in names:
        ledger.store.end_patch(name)
    if lm is not None:
        ledger.apply(lm)
    return new_ids


def export_model(ledger: Ledger, lm: LM, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write `lm` as base + the ledger's applied edits to a Hugging Face directory, atomically.

    The directory holds model.safetensors, config.json, the tokenizer files and lmedit-ledger.json (which
    edits it contains); plain `transformers` loads it. GGUF-converted models drop their quantizer marker
    for the save (the weights are already dequantized), as `lmedit.models.load` does for its cache.

    Raises:
        LedgerError: an applied edit is not a weight edit, or `out_dir` is not empty (without `overwrite`).
    """
    rows = ledger.entries("applied")
    other = [f"{r.id} ({r.kind})" for r in rows if r.kind != "weight"]
    if other:
        raise LedgerError(f"edits {', '.join(other)} are not weight edits and cannot be written into plain weights; "
                          "revert them, or ship the ledger's patch file instead")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise LedgerError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) or another directory")
    ledger.apply(lm)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    model = lm.model
    quantizer = getattr(model, "hf_quantizer", None)
    quant_config = getattr(model.config, "quantization_config", None)
    try:
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        provenance = {"exported": now(), "ledger": str(ledger.path), "model": ledger.model,
                      "base_fingerprint": ledger.base_fingerprint, "fingerprint": weights_fingerprint(model),
                      "edits": [{"id": r.id, "method": r.method, "requests": r.requests} for r in rows]}
        (tmp / "lmedit-ledger.json").write_text(json.dumps(provenance, indent=1))
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    finally:
        model.hf_quantizer = quantizer
        if quant_config is not None:
            model.config.quantization_config = quant_config
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
