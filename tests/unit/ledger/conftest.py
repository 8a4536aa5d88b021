"""Fixtures for the ledger tests: tiny models and quick ROME settings (helpers live in ledger_helpers.py)."""

from __future__ import annotations

import pytest

from lmedit.testing import _CORPUS, tiny_lm


@pytest.fixture
def rome_config(tmp_path, monkeypatch):
    """Quick ROME settings for tiny models (text-file statistics, few prefixes), with a private cache."""
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(_CORPUS * 40))
    return {"layer": 1, "corpus": f"file:{corpus}", "corpus_tokens": 2000, "prefixes_short": 2, "prefixes_long": 1}


@pytest.fixture
def lm():
    return tiny_lm("llama")
