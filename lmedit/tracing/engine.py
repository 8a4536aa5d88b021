"""The tracing engine: settings shared by every trace, and batched corrupted/restored runs.

Speed. Every restored run is an independent forward, so they are batched: the rows of one forward are
restorations × noise samples. A restored run equals the corrupted run everywhere before the restored
state, in both directions:
  * before the restored token (the model is causal): each restored token t runs only positions t..end,
    on top of a key/value cache of the corrupted prefix (one prefix forward per token, copied per batch);
  * below the restored layer: a restoration whose lowest site is in block l (or is block l's output)
    starts the forward there (`hooks.start_at`), from the corrupted residual stream captured once in
    the baseline run. Batches therefore group restorations by (first token, first block).
Logits are computed only at the last position.

Conventions:
  * rows of a restoration batch are sample-major: row = sample * n_restorations + restoration;
  * a restoration's "first block" is the first block that must run: l + 1 for `resid_out` at l (block
    l's output is taken from the corrupted run, then restored by the hook), j for `mlp.out`/`attn.out`
    at j.

Single traces that use it are in `lmedit.tracing.single`; the method is described in `lmedit.tracing`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from transformers import DynamicCache

from lmedit.hooks import capture, patch, start_at
from lmedit.tracing.facts import builtin_facts
from lmedit.types import Site

if TYPE_CHECKING:
    from lmedit.models.load import LM

Kind = Literal["resid", "mlp", "attn"]
KINDS: tuple[Kind, ...] = ("resid", "mlp", "attn")
SITE_KIND = {"resid": "resid_out", "mlp": "mlp.out", "attn": "attn.out"}
BUCKETS: tuple[str, ...] = ("first subject", "middle subject", "last subject", "first subsequent",
                            "further tokens", "last token")
NOISE_MULTIPLIER = 3.0  # σ = 3 × std of token embeddings (the paper's setting)
ProgressFn = Callable[[int, int], None]  # progress(done, total): restorations done so far


# --------------------------------------------------------------------------------------------------
# settings helpers


def default_window(n_layers: int) -> int:
    """MLP/attention restoration window scaled to depth: 10 layers of GPT-2 XL's 48, i.e.
    max(1, round(10 · n_layers / 48)) — 4 for Gemma 3 270M (18 layers), 6 for SmolLM2-135M (30)."""
    return max(1, round(10 * n_layers / 48))


def window_layers(center: int, window: int, n_layers: int) -> range:
    """Layers restored for a window centred on `center` (ROME's convention, clipped to the model)."""
    return range(max(0, center - window // 2), min(n_layers, center - (-window // 2)))


def max_positions(lm: LM) -> int | None:
    """The model's context length from its config (`max_position_embeddings`, GPT-2's `n_positions`)."""
    config = lm.model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


@torch.no_grad()
def embedding_noise(lm: LM, texts: Sequence[str] | None = None) -> float:
    """The default noise level: 3 × the std of the token embeddings (`Site("embed")`) of `texts`.

    Args:
        lm: the model bundle.
        texts: text whose tokens form the sample; default the subjects of the built-in facts.

    Returns:
        σ, a float (in the units of the embed site's output, which for Gemma is already scaled).
    """
    if texts is None:
        texts = [fact.subject for fact in builtin_facts()]
    ids = [i for text in texts for i in lm.tokenizer(text, add_special_tokens=False)["input_ids"]]
    site = Site("embed")
    with capture(lm, [site], stop_after=site) as acts:
        lm.model(input_ids=torch.tensor([ids], device=lm.device), use_cache=False)
    return NOISE_MULTIPLIER * acts[site].float().std().item()


# --------------------------------------------------------------------------------------------------
# the batched restoration engine


@dataclass(frozen=True)
class Restoration:
    """One restored run: set `restore`'s (site, token) states to the source's values and hold `freeze`'s
    sites at the corrupted run's values (severing). Tokens are positions in the traced prompt."""

    restore: tuple[tuple[Site, int], ...]
    freeze: tuple[Site, ...] = ()

    @property
    def start(self) -> int:
        """The first restored token: positions before it are the corrupted run's."""
        return min(pos for _, pos in self.restore)

    @property
    def first_block(self) -> int:
        """The first block that must run: blocks below it compute the corrupted run's states."""
        assert all(site.layer is not None for site, _ in self.restore)
        return min([site.layer + 1 if site.kind == "resid_out" else site.layer for site, _ in self.restore]
                   + [site.layer for site in self.freeze])  # type: ignore[operator]


@dataclass
class _Setup:
    """Everything a restoration batch needs: the corrupted input and the states to copy in."""

    ids: list[int]                         # the traced prompt's token ids
    noise: torch.Tensor                    # (samples, pos, d_model), zero outside the subject
    source: dict[Site, torch.Tensor]       # site -> (pos, d) states to restore, indexed by traced position
    frozen: dict[Site, torch.Tensor]       # site -> (samples, pos, d) corrupted states for severing
    answer_id: int
    resid: list[torch.Tensor]              # layer l -> (samples, pos, d_model) corrupted resid_out[l]


@dataclass
class _Work:
    """What a trace ran, for benchmarks: forwards, block-token-positions (token-positions × blocks run,
    summed over forwards) and rows unembedded."""

    forwards: int = 0
    block_positions: int = 0
    unembedded_rows: int = 0

    def add(self, rows: int, positions: int, blocks: int) -> None:
        self.forwards += 1
        self.block_positions += rows * positions * blocks


def _answer_probs(lm: LM, hidden: torch.Tensor, answer_id: int, chunk: int = 256) -> torch.Tensor:
    """P(answer) from final-norm outputs (n, d_model) -> (n,), unembedding `chunk` rows at a time
    (Gemma's 262k-word vocabulary makes (n, d_vocab) logits large)."""
    out = []
    # `patch` hands a half-precision model's activations to its functions as float32 (exact): back to the head's dtype.
    hidden = hidden.to(lm.arch.unembedding(lm.model).weight.dtype)
    for start in range(0, hidden.shape[0], chunk):
        logits = lm.arch.logits_from_final(lm.model, hidden[start:start + chunk]).float()  # (n, d_vocab)
        out.append(torch.exp(logits[:, answer_id] - torch.logsumexp(logits, dim=-1)))
    return torch.cat(out)


def _prefix_cache(lm: LM, setup: _Setup, start: int) -> DynamicCache | None:
    """Key/value cache of the corrupted runs' tokens before `start` (batch = samples), all layers."""
    if start == 0:
        return None
    samples = setup.noise.shape[0]
    ids = torch.tensor([setup.ids[:start]] * samples, device=lm.device)
    noise = setup.noise[:, :start]
    cache = DynamicCache(config=lm.model.config)
    fns = {Site("embed"): lambda act, site: act + noise.to(act.dtype)}
    # The cache is filled layer by layer; nothing after the last block is needed.
    with patch(lm, fns, stop_after=Site("resid_out", lm.n_layers - 1)):
        lm.model(input_ids=ids, cache=cache, use_cache=True)
    return cache


def _run_chunk(lm: LM, setup: _Setup, start: int, first_block: int, chunk: Sequence[Restoration],
               prefix: DynamicCache | None) -> torch.Tensor:
    """Final-norm outputs at the last position -> (samples, len(chunk), d_model), for restorations whose
    first restored token is `start` and whose first block is at least `first_block`. `prefix` (not
    modified) is the corrupted runs' key/value cache of the tokens before `start`."""
    samples = setup.noise.shape[0]
    n = len(chunk)
    rows = samples * n
    sample_of_row = torch.arange(rows, device=lm.device) // n  # (rows,)
    cache = None
    if prefix is not None:
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(n)  # cache rows are samples; row = sample * n + restoration

    restore: dict[Site, tuple[list[int], list[int]]] = {}   # site -> (restoration idx, position)
    freeze: dict[Site, list[int]] = {}
    for r, restoration in enumerate(chunk):
        for site, pos in restoration.restore:
            restore.setdefault(site, ([], []))[0].append(r)
            restore[site][1].append(pos)
        for site in restoration.freeze:
            freeze.setdefault(site, []).append(r)

    def restore_fn(site: Site, act: torch.Tensor) -> torch.Tensor:
        act = act.clone()
        if site in freeze:
            r = torch.tensor(freeze[site], device=act.device)
            row_idx = (torch.arange(samples, device=act.device)[:, None] * n + r[None]).reshape(-1)
            act[row_idx] = setup.frozen[site][row_idx // n, start:].to(act.dtype)
        if site in restore:
            r = torch.tensor(restore[site][0], device=act.device)
            pos = torch.tensor(restore[site][1], device=act.device)
            row_idx = (torch.arange(samples, device=act.device)[:, None] * n + r[None]).reshape(-1)
            pos_idx = pos.repeat(samples)
            act[row_idx, pos_idx - start] = setup.source[site][pos_idx].to(act.dtype)
        return act

    fns: dict[Site, Any] = {site: (lambda act, s: restore_fn(s, act)) for site in {*restore, *freeze}}
    if first_block == 0:
        noise = setup.noise[:, start:][sample_of_row]  # (rows, pos - start, d_model)
        fns[Site("embed")] = lambda act, site: act + noise.to(act.dtype)
        resid = None
    else:  # the corrupted residual stream entering `first_block` stands in for blocks 0..first_block-1
        resid = setup.resid[first_block - 1][sample_of_row, start:]  # (rows, pos - start, d_model)
    final = Site("final_norm")
    hidden: dict[str, torch.Tensor] = {}

    def record(act: torch.Tensor, site: Site) -> None:
        hidden["last"] = act[:, -1]  # (rows, d_model)

    fns[final] = record
    ids = torch.tensor([setup.ids[start:]] * rows, device=lm.device)
    with patch(lm, fns, stop_after=final), start_at(lm, first_block, resid) if resid is not None else nullcontext():
        lm.model(input_ids=ids, cache=cache, use_cache=cache is not None)
    return hidden["last"].view(samples, n, -1)


@torch.no_grad()
def _run_restorations(lm: LM, setup: _Setup, restorations: Sequence[Restoration], *, max_tokens: int = 4096,
                      unembed_rows: int = 1024, progress: ProgressFn | None = None) -> tuple[torch.Tensor, _Work]:
    """Mean P(answer) of each restoration -> ((len(restorations),), the work done).

    Restorations are grouped by (first restored token, first block), and each group runs in batches of
    at most `max_tokens` token-positions. Each first token after 0 also runs one prefix forward. The
    unembedding is deferred until `unembed_rows` final states have gathered: with a large vocabulary
    (Gemma: 262k words) it costs as much as the blocks, and small batches would re-read its weight."""
    samples = setup.noise.shape[0]
    out = torch.empty(len(restorations))
    groups: dict[tuple[int, int], list[int]] = {}
    for i, restoration in enumerate(restorations):
        groups.setdefault((restoration.start, restoration.first_block), []).append(i)
    pending_idx: list[int] = []
    pending: list[torch.Tensor] = []  # (samples, k, d_model) final states of the restorations in pending_idx

    done = 0
    work = _Work()
    n_layers = lm.n_layers

    def flush() -> None:
        nonlocal done
        hidden = torch.cat(pending, dim=1)  # (samples, n_pending, d_model)
        probs = _answer_probs(lm, hidden.reshape(-1, hidden.shape[-1]), setup.answer_id)  # sample-major rows
        out[pending_idx] = probs.view(samples, -1).mean(0).cpu()
        work.unembedded_rows += probs.shape[0]
        done += len(pending_idx)
        pending.clear()
        pending_idx.clear()
        if progress is not None:
            progress(done, len(restorations))

    prefix_start, prefix = -1, None
    for (start, first_block), idx in sorted(groups.items()):
        if start != prefix_start:
            prefix_start, prefix = start, _prefix_cache(lm, setup, start)
            if prefix is not None:
                work.add(samples, start, n_layers)
        width = len(setup.ids) - start
        per_chunk = max(1, max_tokens // (samples * width))
        for c in range(0, len(idx), per_chunk):
            part = idx[c:c + per_chunk]
            pending.append(_run_chunk(lm, setup, start, first_block, [restorations[i] for i in part], prefix))
            pending_idx.extend(part)
            work.add(samples * len(part), width, n_layers - first_block)
            if len(pending_idx) * samples >= unembed_rows:
                flush()
    if pending:
        flush()
    return out, work
