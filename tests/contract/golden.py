"""Golden edits: what each built-in editor computes, recorded as checksums, so refactors prove "behaviour unchanged".

`fingerprint(edit)` reduces an edit to, per tensor it carries (weight edits: each parameter's factors or dense
delta and its keys; wrapper and adaptor edits: `tensors()`, plus a hash of `metadata()`), its dtype and shape,
the sha256 of its bytes and a numeric signature: its norm and its projections on four fixed random unit
vectors. `matches(now, recorded)` accepts equal bytes, or else signatures within `TOLERANCE` of the recorded
norm: the same code on another CPU (other vector units, other BLAS kernels) rounds differently, and 20
optimiser steps amplify that rounding, while a changed algorithm moves an edit far more.

The golden files under tests/data/golden/ hold the edits of the code that, on the machines of the time,
matched bit for bit the edits recorded before the typed edit stack (#21) replaced the model-attribute stacks
(re-recorded with signatures on 2026-12-01, from commit 2e3137d, when a new CPU changed the bytes);
tests/contract/test_golden.py recomputes the same edits and compares.

Every golden edit is computed with one torch thread, so a multi-threaded run reads the same bits on one machine.

    cd tests/contract && python golden.py tiny     # rewrite tests/data/golden/tiny.json (only for a deliberate change)
    cd tests/contract && python golden.py gemma    # rewrite tests/data/golden/gemma3-270m.json
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
FAMILIES = ("llama", "gpt2")
# The default model: ROME and MEMIT with the shipped settings on two starter facts.
REAL_METHODS = ("rome", "memit")
REAL_CASES = ("landmark_city-0", "capital-0")


# A signature may differ from the recorded one by this fraction of the tensor's norm (see the module docstring).
TOLERANCE = 1e-3
N_PROJECTIONS = 4


def _sha(tensor: torch.Tensor) -> dict:
    t = tensor.detach().contiguous().cpu()
    flat = t.flatten().to(torch.float64)
    signature = [float(flat.norm())]
    for seed in range(N_PROJECTIONS):
        direction = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        signature.append(float(flat @ (direction / direction.norm())))
    return {"tensor": f"{t.dtype}:{tuple(t.shape)}",
            "sha256": hashlib.sha256(t.flatten().view(torch.uint8).numpy().tobytes()).hexdigest()[:24],
            "signature": signature}


def matches(now: dict, recorded: dict) -> list[str]:
    """What differs between two fingerprints beyond rounding: [] when they match (see the module docstring)."""
    problems = [f"{key}: missing" for key in recorded if key not in now]
    problems += [f"{key}: not recorded" for key in now if key not in recorded]
    for key in set(now) & set(recorded):
        a, b = now[key], recorded[key]
        if isinstance(b, str) or isinstance(a, str):  # metadata hashes: exact
            if a != b:
                problems.append(f"{key}: {a} != {b}")
            continue
        if a["tensor"] != b["tensor"]:
            problems.append(f"{key}: {a['tensor']} != {b['tensor']}")
        elif a["sha256"] != b["sha256"]:
            scale = max(abs(b["signature"][0]), 1e-30)
            worst = max(abs(x - y) for x, y in zip(a["signature"], b["signature"])) / scale
            if worst > TOLERANCE:
                problems.append(f"{key}: signature off by {worst:.2e} of its norm (tolerance {TOLERANCE:g})")
    return problems


def fingerprint(edit) -> dict[str, dict | str]:
    """Tensor name -> dtype and shape, sha256 prefix of its bytes and signature, for every tensor of `edit`."""
    from lmedit.editors import AdaptorEdit, WrapperEdit

    if isinstance(edit, WrapperEdit | AdaptorEdit):
        out = {f"tensor:{k}": _sha(v) for k, v in edit.tensors().items()}
        out["metadata"] = hashlib.sha256(json.dumps(edit.metadata(), sort_keys=True, default=str).encode()).hexdigest()[:24]
        return out
    out = {}
    for name, delta in edit.deltas.items():
        for part in ("left", "right", "dense"):
            value = getattr(delta, part)
            if value is not None:
                out[f"{name}::{part}"] = _sha(value)
    for name, keys in edit.keys.items():
        out[f"{name}::keys"] = _sha(keys)
    return out


@contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_edit(method: str, family: str, workdir: Path):
    """`method`'s edit of the contract suite's request on the tiny `family` model, with its contract settings."""
    from test_editors import REQUEST, _editor

    from lmedit.testing import tiny_lm

    with one_thread():
        return _editor(method, workdir).edit(tiny_lm(family), [REQUEST])


def real_edit(method: str, lm):
    """`method`'s edit (shipped settings) of the two starter facts on the default model `lm`."""
    from lmedit.eval.datasets.starter import starter_requests
    from lmedit.settings import resolve_editor

    editor, _ = resolve_editor(method, lm)
    with one_thread():
        return editor.edit(lm, starter_requests(*REAL_CASES))


def tiny_methods() -> list[str]:
    from test_editors import TINY_CONFIGS

    return sorted([*TINY_CONFIGS, "noop"])


def _record(which: str) -> None:
    GOLDEN.mkdir(parents=True, exist_ok=True)
    if which == "tiny":
        out = {}
        for method in tiny_methods():
            for family in FAMILIES:
                with tempfile.TemporaryDirectory() as tmp:
                    if method == "noop":
                        from lmedit.editors import get_editor
                        from lmedit.testing import tiny_lm
                        from test_editors import REQUEST
                        edit = get_editor("noop").edit(tiny_lm(family), [REQUEST])
                    else:
                        edit = tiny_edit(method, family, Path(tmp))
                out[f"{method}/{family}"] = fingerprint(edit)
        (GOLDEN / "tiny.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    elif which == "gemma":
        import lmedit

        lm = lmedit.load("gemma3-270m")
        out = {m: fingerprint(real_edit(m, lm)) for m in REAL_METHODS}
        (GOLDEN / "gemma3-270m.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    else:
        raise SystemExit("usage: python golden.py tiny|gemma (from tests/contract)")


if __name__ == "__main__":
    _record(sys.argv[1] if len(sys.argv) > 1 else "")
