import pytest
import torch

import lmedit
from lmedit.editors.alphaedit import (AlphaEditConfig, AlphaEditEditor, alphaedit_solve, alphaedit_solve_in_basis,
                                     null_space_basis, null_space_projection)
from lmedit.stats import StatsCache
from lmedit.testing import TINY_CORPUS, tiny_lm

FIRST = lmedit.EditRequest("Where is {}", "The Eiffel Tower", "Rome", "Paris")
SECOND = lmedit.EditRequest("Who leads {}", "the orchestra", "cats", None)


def _spectrum(d: int = 32, seed: int = 0) -> torch.Tensor:
    """A C with 12 large and 20 tiny eigenvalues: 20 null-space directions."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    values = torch.cat([torch.linspace(1.0, 5.0, 12, dtype=torch.float64), torch.full((d - 12,), 1e-6, dtype=torch.float64)])
    return Q @ torch.diag(values) @ Q.T, Q[:, :12]


def test_projection_spans_the_small_eigenvalues():
    C, kept = _spectrum()
    P = null_space_projection(C, 1e-3)
    assert round(float(P.trace())) == 20
    torch.testing.assert_close(P @ P, P)
    assert (P @ kept).abs().max() < 1e-10


def test_update_is_orthogonal_to_the_preserved_keys():
    C, kept = _spectrum()
    P = null_space_projection(C, 1e-3)
    torch.manual_seed(1)
    K, D = torch.randn(3, 32, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    K_prev = torch.randn(32, 2, dtype=torch.float64)
    left, right = alphaedit_solve(P, K, D, alpha=1e-3, K_prev=K_prev)
    delta = left @ right.T
    # Δ k₀ = 0 for every preserved key k₀ in C's span
    assert (delta @ kept).norm() / delta.norm() < 1e-8
    # the edit keys still reach their targets through their null-space part
    assert ((delta @ K.T) - D.T).norm() / D.norm() < 0.05
    # earlier edits' keys are protected too: much less disturbed than without K_prev
    left0, right0 = alphaedit_solve(P, K, D, alpha=1e-3)
    assert (delta @ K_prev).norm() < 0.5 * ((left0 @ right0.T) @ K_prev).norm()


@pytest.mark.parametrize("n_prev", [None, 0, 2, 40])
def test_solve_in_the_basis_equals_the_paper_form(n_prev):
    # eq. 15 with P inside (alphaedit_solve) against the r-dimensional form the editor runs
    C, _ = _spectrum()
    U = null_space_basis(C, 1e-3)
    assert U.shape == (32, 20)
    torch.testing.assert_close(U.T @ U, torch.eye(20, dtype=torch.float64))
    g = torch.Generator().manual_seed(n_prev or 0)
    K, D = torch.randn(3, 32, generator=g, dtype=torch.float64), torch.randn(3, 8, generator=g, dtype=torch.float64)
    K_prev = None if n_prev is None else torch.randn(32, n_prev, generator=g, dtype=torch.float64)
    for alpha in (1e-3, 0.7):
        left, right = alphaedit_solve(U @ U.T, K, D, alpha, K_prev)
        left_b, right_b = alphaedit_solve_in_basis(U, K, D, alpha, K_prev)
        assert torch.equal(left, left_b)
        torch.testing.assert_close(right_b, right, rtol=1e-9, atol=1e-12)
        assert right_b.abs().max() > 1e-3  # not a vacuous match of two zero updates


def test_solve_in_an_empty_null_space_changes_nothing():
    K, D = torch.randn(2, 32, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    left, right = alphaedit_solve_in_basis(torch.zeros(32, 0, dtype=torch.float64), K, D, 0.5, torch.randn(32, 3))
    assert left.shape == (8, 2) and right.shape == (32, 2) and not right.any()


def _editor(tmp_path, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TINY_CORPUS * 40))
    cfg = AlphaEditConfig(**{"layers": (1, 2), "corpus": f"file:{corpus}", "corpus_tokens": 3000, "prefixes": 2,
                             "clamp_norm_factor": 4.0, **kw})
    return AlphaEditEditor(cfg, cache=StatsCache(tmp_path / "stats"))


def test_projection_is_cached_per_model_layer_corpus_and_threshold(tmp_path):
    lm, other = tiny_lm("llama"), tiny_lm("llama", seed=1)
    editor = _editor(tmp_path)
    editor.edit(lm, [FIRST])
    paths = {layer: editor.projection_path(lm, layer) for layer in (1, 2)}
    assert all(p.exists() for p in paths.values())
    assert lm.weights_hash in str(paths[1]) and "layer1" in paths[1].name and "t0.01" in paths[1].name
    assert editor.projection_path(other, 1) != paths[1]
    assert _editor(tmp_path, nullspace_threshold=0.1).projection_path(lm, 1) != paths[1]
    # the cached basis is the eigenvectors of C below the threshold; its rank is in the edit's notes
    C = editor.covariances(lm, (1,))[1]
    cached = editor.projection(lm, 1, C)
    torch.testing.assert_close(cached @ cached.T, null_space_projection(C, 0.01), rtol=0, atol=1e-6)
    # a cached projection gives the same edit as a fresh one
    again = editor.edit(lm, [FIRST])
    assert again.info["per_layer"][0]["nullspace_dim"] == cached.shape[1] > 0
    fresh = _editor(tmp_path / "fresh").edit(lm, [FIRST])
    for name in again.deltas:
        torch.testing.assert_close(again.deltas[name].full(), fresh.deltas[name].full(), rtol=1e-5, atol=1e-7)


def test_sequential_edits_preserve_the_earlier_edit_keys(tmp_path):
    lm = tiny_lm("llama")
    editor = _editor(tmp_path)
    first = editor.edit(lm, [FIRST]).apply(lm)
    try:
        second = editor.edit(lm, [SECOND])
        blind = editor.edit(tiny_lm("llama"), [SECOND])  # same request, no applied edit to preserve
    finally:
        first.undo()
    assert all(item["preserved_edit_keys"] == 1 for item in second.info["per_layer"])
    assert all(item["preserved_edit_keys"] == 0 for item in blind.info["per_layer"])
    for name, keys in first.keys.items():
        kept = (second.deltas[name].full(torch.float64) @ keys.double()).norm()
        ignored = (blind.deltas[name].full(torch.float64) @ keys.double()).norm()
        assert kept < 0.5 * ignored, name


def test_bad_threshold_is_refused():
    with pytest.raises(ValueError, match="nullspace_threshold"):
        AlphaEditConfig(nullspace_threshold=1.5)
    with pytest.raises(ValueError, match="l2"):
        AlphaEditConfig(l2=0)


def test_edit_from_targets_reproduces_edit(tmp_path):
    # The mass-editing base gives AlphaEdit MEMIT's split at the expensive step: targets once, then the solve.
    lm = tiny_lm("llama")
    editor = _editor(tmp_path)
    whole = editor.edit(lm, [FIRST, SECOND])
    split = editor.edit_from_targets(lm, [FIRST, SECOND], editor.optimize_targets(lm, [FIRST, SECOND]))
    assert whole.method == split.method == "alphaedit"
    assert whole.deltas.keys() == split.deltas.keys()
    for name in whole.deltas:
        assert torch.equal(whole.deltas[name].full(torch.float64), split.deltas[name].full(torch.float64))
    assert [item["nullspace_dim"] for item in split.info["per_layer"]] == \
        [item["nullspace_dim"] for item in whole.info["per_layer"]]
