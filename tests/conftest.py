"""Shared fixtures: tiny random models of each family (fast) and the real built-in models (slow, one per session).

The tests never touch the user's lmedit cache: before anything is collected, `LMEDIT_CACHE` points at
`$LMEDIT_TEST_CACHE` (default `~/.cache/lmedit-test`), where the converted built-in models and their key
statistics stay between test runs (a fresh one costs a few minutes, once).
"""

from __future__ import annotations

import os

import pytest

from lmedit.testing import TINY_CORPUS, TINY_FAMILIES, tiny_lm


@pytest.fixture(params=TINY_FAMILIES)
def tiny_family_lm(request):
    """One tiny random model per supported family."""
    return tiny_lm(request.param)


@pytest.fixture
def tiny_llama():
    return tiny_lm("llama")


@pytest.fixture
def tiny_gpt2():
    return tiny_lm("gpt2")


@pytest.fixture
def rome_config(tmp_path, monkeypatch):
    """Quick ROME settings for tiny models (text-file statistics, few prefixes), with a private cache."""
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TINY_CORPUS * 40))
    return {"layer": 1, "corpus": f"file:{corpus}", "corpus_tokens": 2000, "prefixes_short": 2, "prefixes_long": 1}


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    """The tiny Llama saved as a local HF directory, loaded by path (`--model DIR`), with a private cache."""
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path / "cache"))
    lm = tiny_lm("llama")
    path = tmp_path / "tiny-llama"
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


_REAL: dict[str, object] = {}


def _real(name: str):
    import lmedit

    if name not in _REAL:
        _REAL[name] = lmedit.load(name)
    return _REAL[name]


@pytest.fixture
def gemma():
    """The default model, loaded once per test session (converted and cached on first use)."""
    return _real("gemma3-270m")


@pytest.fixture
def smollm():
    return _real("smollm2-135m")


@pytest.fixture(scope="session")
def gemma_eiffel_edit():
    """The README's edit (Eiffel Tower -> Rome) by ROME on the default model with the shipped settings, made once
    per session, unapplied: tests that look at the same edit from different sides share it."""
    import lmedit

    request = lmedit.EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
    return lmedit.edit(_real("gemma3-270m"), request, apply=False)


def _share_the_cores() -> None:
    """Under pytest-xdist (`make test` runs one worker per core), each worker and the processes it starts use
    their share of the cores: torch's default (a thread per core in every worker) oversubscribes the machine and
    slows every worker down several times."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def pytest_configure(config):
    _share_the_cores()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    test_cache = os.environ.get("LMEDIT_TEST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lmedit-test")
    os.environ["LMEDIT_CACHE"] = test_cache


# The slowest test files, slowest first, by their seconds in `make test` (2 workers, warm cache, 2026-12-01).
# `make test` schedules whole files on the workers (--dist loadfile) in collection order
# (--no-loadscope-reorder): starting the longest files first keeps one worker from running a two-minute file
# alone at the end while the other waits. Files not listed follow in their usual order.
SLOWEST_FILES = (
    "tests/slow/test_ledger_real.py",        # ~190 s
    "tests/slow/test_web_real.py",           # ~120 s
    "tests/slow/test_eval_real.py",          # ~52 s
    "tests/slow/test_device_map_real.py",    # ~24 s
    "tests/unit/test_eval_ray.py",           # ~16 s
    "tests/slow/test_rome_real.py",          # ~45 s
    "tests/slow/test_kn_real.py",            # ~31 s
    "tests/unit/web/test_web_browser.py",    # ~31 s
    "tests/contract/test_golden.py",         # ~30 s
    "tests/slow/test_mass_real.py",          # ~29 s
    "tests/unit/eval/test_eval_harness.py",  # ~24 s
    "tests/slow/test_serac_real.py",         # ~21 s
    "tests/unit/test_tracing.py",
    "tests/slow/test_ft_real.py",
    "tests/slow/test_tracing_real.py",
    "tests/unit/test_cache_checks.py",
    "tests/unit/editors/test_mend.py",
    "tests/slow/test_mend_real.py",
    "tests/unit/ledger/test_ledger_integrity.py",
    "tests/slow/test_ike_real.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(SLOWEST_FILES)}
    order = {id(item): i for i, item in enumerate(items)}

    def key(item):
        path = item.nodeid.split("::", 1)[0]
        return rank.get(path, len(rank)), order[id(item)]

    items.sort(key=key)
