"""Shipping edits: a patch file of the applied edits, importing it onto the same base, and a plain HF model.

A patch file is a zip archive (stored, not compressed: the tensors do not compress) of
    manifest.json      format, base model hash and name, the base sha256 of every touched parameter,
                       and per edit: kind, method, config, requests, audit probes, latest audit report
    edits/NNN.edit     each patch as its `Edit.save()` wrote it (sha256 in the manifest)
Only applied edits go in, in order. Importing refuses a ledger or a model with another base hash, checks
every manifest field's type, every patch's sha256 and every patch as `load_edit` does (format version,
base fingerprint, tensor names, shapes, dtypes, finiteness) before anything is written, and skips patches
the ledger already holds (importing twice changes nothing).

`export_model` writes base + applied edits with `save_pretrained` (safetensors, config, tokenizer), so
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads it without lmedit.

Not handled: exporting wrapper or adaptor edits (GRACE's codebook) as a plain model: they are not weights.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO

from lmedit.cache import atomic_write
from lmedit.editors import load_edit
from lmedit.errors import LMEditError, MissingFileError
from lmedit.ledger.audit import AuditReport
from lmedit.ledger.ledger import param_sha256
from lmedit.ledger.probes import record_from_dict
from lmedit.ledger.store import IMPORT_PREFIX, LedgerError, file_sha256, new_patch_name, now
from lmedit.models.load import weights_fingerprint
from lmedit.models.params import read
from lmedit.types import request_from_dict

if TYPE_CHECKING:
    from lmedit.ledger.ledger import Ledger
    from lmedit.models.load import LM

log = logging.getLogger(__name__)

PATCH_FORMAT = "lmedit.ledger_patch"
PATCH_VERSION = 1                       # what export_patch writes
KNOWN_PATCH_VERSIONS = frozenset({1})   # what read_manifest reads
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MEMBER = re.compile(r"edits/[0-9]{3,}\.edit")


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

    def write(f: BinaryIO) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.writestr("manifest.json", json.dumps(manifest, indent=1, default=str))
            for row, item in zip(rows, edits):
                _add_path(archive, ledger.store.patch_path(row.patch, row.id), item["file"])

    atomic_write(file, write)
    return file


def read_manifest(file: str | Path) -> dict[str, Any]:
    """The manifest of a patch file, with every field checked (`_check_manifest`).

    Raises:
        MissingFileError: no file at `file`.
        LedgerError: not an lmedit patch file (not a zip, no manifest.json, not JSON), an unknown format or
            version, or a manifest field that is missing or of the wrong type (named in the message).
    """
    file = Path(file)
    if not file.exists():
        raise MissingFileError(f"no patch file at {file}")
    try:
        with zipfile.ZipFile(file) as archive:
            manifest = json.loads(archive.read("manifest.json"))
    # zipfile raises many types for damaged or hostile archives (bad CRC, unknown compression, encryption...)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, KeyError, OSError, EOFError, RuntimeError,
            NotImplementedError, ValueError, RecursionError) as exc:
        raise LedgerError(f"{file} is not an lmedit patch file ({type(exc).__name__}: {exc})") from None
    _check_manifest(file, manifest)
    return manifest


def _check_manifest(file: Path, manifest: Any) -> None:
    """Refuse a manifest whose fields are missing or of the wrong type; stored text is later shown, never formatted."""
    def fail(field: str, expected: str, value: Any) -> LedgerError:
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:80] + "..."
        return LedgerError(f"{file}: manifest field {field!r} must be {expected}, got {shown}; nothing was imported")

    if not isinstance(manifest, dict):
        raise LedgerError(f"{file} is not an lmedit patch file (its manifest.json holds a JSON "
                          f"{type(manifest).__name__}, not an object)")
    if manifest.get("format") != PATCH_FORMAT:
        raise LedgerError(f"{file} is not an lmedit patch file (format={manifest.get('format')!r})")
    version = manifest.get("version")
    if type(version) is not int or version not in KNOWN_PATCH_VERSIONS:
        raise LedgerError(f"{file} has patch format version {version!r}; this lmedit reads version(s) "
                          f"{', '.join(map(str, sorted(KNOWN_PATCH_VERSIONS)))}")
    base = manifest.get("base_fingerprint")
    if not isinstance(base, str) or not base.strip():
        raise fail("base_fingerprint", "the base model's hash (a non-empty string)", base)
    if not isinstance(manifest.get("model"), (str, type(None))):
        raise fail("model", "a string", manifest.get("model"))
    params = manifest.get("base_params", {})
    if not isinstance(params, dict):
        raise fail("base_params", "an object", params)
    for name, p in params.items():
        if not isinstance(p, dict) or not isinstance(p.get("dtype"), str) or not isinstance(p.get("sha256"), str) \
                or not _SHA256.fullmatch(p["sha256"]) or not _is_shape(p.get("shape")):
            raise fail(f"base_params.{name}", "an object with 'shape' (a JSON list of sizes), 'dtype' and 'sha256'", p)
    edits = manifest.get("edits")
    if not isinstance(edits, list) or not edits:
        raise fail("edits", "a non-empty list", edits)
    for i, item in enumerate(edits, 1):
        _check_item(item, f"edits[{i}]", fail)


def _is_shape(text: Any) -> bool:
    try:
        shape = json.loads(text) if isinstance(text, str) else None
    except (ValueError, RecursionError):
        return False
    return isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)


def _check_item(item: Any, where: str, fail: Callable[[str, str, Any], LedgerError]) -> None:
    """One manifest edit entry: types of every field, and its requests, probes and audit readable."""
    if not isinstance(item, dict):
        raise fail(where, "an object", item)
    expected: dict[str, tuple[tuple[type, ...], str]] = {
        "file": ((str,), "a member name 'edits/NNN.edit'"), "sha256": ((str,), "64 hex digits"),
        "kind": ((str,), "an edit kind"), "method": ((str,), "a string"), "config": ((dict,), "an object"),
        "requests": ((list,), "a list"), "verdict": ((str, type(None)), "a string or null"),
        "probes": ((list, type(None)), "a list or null"), "info": ((dict, type(None)), "an object or null"),
        "audit": ((dict, type(None)), "an object or null"), "created": ((str, type(None)), "a string or null"),
        "source_id": ((int, str, type(None)), "an id or null"),
    }
    optional = {"verdict", "probes", "info", "audit", "created", "source_id"}
    for key, (types, text) in expected.items():
        if key not in item and key in optional:
            continue
        value = item.get(key)
        if key not in item or not isinstance(value, types) or isinstance(value, bool):
            raise fail(f"{where}.{key}", text, value)
    if not _MEMBER.fullmatch(item["file"]):
        raise fail(f"{where}.file", "a member name 'edits/NNN.edit'", item["file"])
    if not _SHA256.fullmatch(item["sha256"]):
        raise fail(f"{where}.sha256", "64 hex digits", item["sha256"])
    for j, request in enumerate(item["requests"]):  # stored requests are rendered later: refuse bad ones now
        try:
            request_from_dict(request)
        except LMEditError as exc:
            raise LedgerError(f"{where} has an invalid request ({where}.requests[{j}]: {exc}); "
                              "nothing was imported") from None
    for j, probe in enumerate(item.get("probes") or []):
        try:
            record = record_from_dict(probe)
        except (LMEditError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise fail(f"{where}.probes[{j}]", f"an audit record ({type(exc).__name__}: {exc})", probe) from None
        texts = [t for p in (*record.paraphrases, *record.neighborhood, *record.implications)
                 for t in (p.prompt, p.target, p.foil if p.foil is not None else "", p.kind)]
        if not all(isinstance(t, str) for t in (*texts, *record.generation_prompts)) \
                or not isinstance(record.case_id, (str, int)) or not isinstance(record.relation, (str, type(None))):
            raise fail(f"{where}.probes[{j}]", "an audit record of strings (prompts, targets, foils)", probe)
    if item.get("audit") is not None:
        _check_audit(item["audit"], f"{where}.audit", fail)


def _check_audit(audit: dict[str, Any], where: str, fail: Callable[[str, str, Any], LedgerError]) -> None:
    """An audit report as `AuditReport.to_dict` writes it (shown later by `ledger show` and `lmedit audit`)."""
    number = (int, float, type(None))
    try:
        report = AuditReport.from_dict(audit)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise fail(where, f"an audit report ({type(exc).__name__}: {exc})", audit) from None
    if not all(isinstance(v, str) for v in (report.verdict, report.reference, report.model, report.fingerprint,
                                            report.created)):
        raise fail(where, "an audit report with string verdict, reference, model, fingerprint and created", audit)
    if "efficacy" not in report.checks:  # `AuditReport.holds` reads it
        raise fail(f"{where}.checks", "an object with an 'efficacy' check", sorted(report.checks))
    for name, check in report.checks.items():
        if not isinstance(check.name, str) or not isinstance(check.level, (str, type(None))) \
                or not all(isinstance(v, number) and not isinstance(v, bool)
                           for v in (check.value, check.reference, check.warn, check.refuse)):
            raise fail(f"{where}.checks.{name}", "a check with numbers (or null) and a level", audit["checks"][name])
    if not isinstance(report.metrics, dict) or not all(isinstance(m, dict) for m in report.metrics.values()):
        raise fail(f"{where}.metrics", "an object of objects", report.metrics)
    if not isinstance(report.probes, list) or not all(isinstance(p, dict) for p in report.probes):
        raise fail(f"{where}.probes", "a list of objects", report.probes)


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


def _check_patch(file: str | Path, item: dict[str, Any], target: Path, base: str) -> None:
    """Load one extracted patch as `load_edit` does (all its checks) and compare it with its manifest entry."""
    label = f"{item['file']} in {file}"
    try:
        edit = load_edit(target, label=label)
    except LMEditError as exc:
        raise LedgerError(f"{exc}; nothing was imported") from None
    if edit.kind != item["kind"]:
        raise LedgerError(f"{label} is a {edit.kind} edit, but the manifest says {item['kind']!r}; nothing was imported")
    made_on = edit.base_fingerprint or None
    if made_on != base:
        raise LedgerError(f"{label} was made on the model with fingerprint {made_on}, but the patch file is for base "
                          f"{base}; nothing was imported")


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
        ledger.detach(lm)
        if not lm.is_checkpoint(base) or weights_fingerprint(lm.model) != lm.weights_hash:
            raise LedgerError(f"model hash mismatch: {file} holds edits of base model {base} ({manifest.get('model')}), "
                              f"but {lm.name!r} has hash {lm.fingerprint}; load that base model, or replay the "
                              "requests with `lmedit ledger replay`")
        params = dict(lm.model.named_parameters())
        for name, expected in manifest.get("base_params", {}).items():
            if name not in params or param_sha256(read(lm.model, name)) != expected["sha256"]:
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
                _check_patch(file, item, target, base)
                staged.append((item, target))
            ledger.store.set_base(base, manifest.get("model") or (lm.name if lm is not None else ""))
            base_params = {name: (json.loads(p["shape"]), p["dtype"], p["sha256"])
                           for name, p in manifest.get("base_params", {}).items()}
            for item, target in staged:
                name = new_patch_name()
                names.append(name)
                target.replace(ledger.store.begin_patch(name))
                edit_id = ledger.store.insert_edit(
                    name, kind=item["kind"], method=item["method"], config=item["config"], requests=item["requests"],
                    base_fingerprint=base, verdict=item.get("verdict"), probes=item.get("probes"),
                    info=item.get("info") or {}, source=f"import:{Path(file).name}#{item.get('source_id')}",
                    new_params=base_params)
                if item.get("audit"):
                    audit = AuditReport.from_dict(item["audit"])  # checked: a malformed report is refused here
                    ledger.store.add_audit(edit_id, "import", audit.verdict, audit.to_dict())
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
        why = {"wrapper": "a wrapper edit changes what the model reads, not its weights",
               "adaptor": f"an adaptor edit ({', '.join(sorted({r.method for r in rows if r.kind == 'adaptor'}))}) is "
                          "a codebook consulted at every forward (a lookup of the layer's input), which no weight "
                          "change reproduces, so it cannot be merged into the weights"}
        reasons = "; ".join(why[k] for k in sorted({r.kind for r in rows}) if k in why)
        raise LedgerError(f"edits {', '.join(other)} are not weight edits and cannot be written into plain weights "
                          f"({reasons}); revert them, or ship the ledger's patch file instead")
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
