"""Fixtures for the ledger tests: tiny models and quick ROME settings (helpers live in ledger_helpers.py)."""

from __future__ import annotations

import pytest

from lmedit.testing import tiny_lm


@pytest.fixture
def lm():
    return tiny_lm("llama")
