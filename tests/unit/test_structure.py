"""The codebase's layout rules, checked (issue #21): no private name crosses a package boundary, nothing keeps
state on the transformers model object, no module grows past 600 lines.

"Package" is the directory a module lives in: `lmedit/editors/steps/value.py` may use `_helpers` of
`lmedit/editors/steps/`, not those of `lmedit/editors/` or `lmedit/ledger/`; tests and benchmarks use public
names only. A private name is one starting with `_` (not a dunder); a private module is one whose file name
starts with `_` (not `__init__`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "lmedit"
SOURCES = sorted([*PACKAGE.rglob("*.py"), *(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")])
MAX_LINES = 600


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _package_of_module(module: str) -> str:
    """Dotted module `lmedit.a.b` -> the package directory that holds it ('lmedit/a' for a module file)."""
    path = PACKAGE.parent / Path(*module.split("."))
    return str(path.relative_to(ROOT)) if path.is_dir() else str(path.parent.relative_to(ROOT))


def cross_package_private_imports(path: Path) -> list[str]:
    """'file:line: what' for every import in `path` of a private module or name from another package."""
    here = str(path.parent.relative_to(ROOT))
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmedit") and node.level == 0:
            owner = _package_of_module(node.module)
            parts = node.module.split(".")
            names = [a.name for a in node.names]
            if owner == here:
                continue
            bad = [p for p in parts if _private(p)] + [n for n in names if _private(n)]
            if bad:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module} import {', '.join(names)}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("lmedit") and any(_private(p) for p in alias.name.split(".")) \
                        and _package_of_module(alias.name) != here:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: import {alias.name}")
    return found


def test_no_private_name_is_imported_across_packages():
    found = [line for path in SOURCES for line in cross_package_private_imports(path)]
    assert not found, "private names imported across packages:\n" + "\n".join(found)


def test_the_check_sees_a_cross_package_private_import(tmp_path, monkeypatch):
    # The rule applied to a file that breaks it, so the check above cannot pass by seeing nothing.
    bad = ROOT / "tests" / "unit" / "_structure_probe.py"
    bad.write_text("from lmedit.editors.base import _check_savable\nfrom lmedit.editors.steps import value\n")
    try:
        assert cross_package_private_imports(bad) == [
            "tests/unit/_structure_probe.py:1: from lmedit.editors.base import _check_savable"]
    finally:
        bad.unlink()


def test_nothing_is_kept_on_the_model_object():
    # Which edits are applied lives in `lm.edits` (lmedit.models.applied), not in attributes of the HF model.
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_lmedit"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("_lmedit"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_is_at_most_600_lines(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES
