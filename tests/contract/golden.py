"""Golden edits: what each built-in editor computes, recorded as checksums, so refactors prove "behaviour unchanged".

`fingerprint(edit)` reduces an edit to the sha256 of every tensor it carries (weight edits: each parameter's
factors or dense delta and its keys; wrapper edits: `tensors()` and `metadata()`), bit for bit. The golden
files under tests/data/golden/ were written by this module's `__main__` before the typed edit stack (#21)
replaced the model-attribute stacks; tests/contract/test_golden.py recomputes the same edits and compares.

Every golden edit is computed with one torch thread, so a multi-threaded run reads the same bits.

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


def _sha(tensor: torch.Tensor) -> str:
    t = tensor.detach().contiguous().cpu()
    return f"{t.dtype}:{tuple(t.shape)}:" + hashlib.sha256(t.flatten().view(torch.uint8).numpy().tobytes()).hexdigest()[:24]


def fingerprint(edit) -> dict[str, str]:
    """Tensor name -> dtype, shape and sha256 prefix of its bytes, for every tensor of `edit`."""
    from lmedit.editors import WrapperEdit

    if isinstance(edit, WrapperEdit):
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
