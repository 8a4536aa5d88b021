"""Causal tracing: which hidden states carry a fact (Meng et al. 2022, "Locating and Editing Factual
Associations in GPT", arXiv:2202.05262, §2 and Fig. 1-3).

Method. A clean run of the prompt; corrupted runs that add Gaussian noise (σ = 3 × the std of token
embeddings over the built-in facts' subject tokens, seeded) to the subject tokens' embeddings; and
restored runs, which are corrupted runs where one state is set back to its clean value. The score of a
restored run is P(answer) at the last position, averaged over `samples` noise draws; the indirect effect
(IE) of a state is P_restored − P_corrupted. Three kinds of state:
  resid  the residual stream after block l (`Site("resid_out", l)`), one layer at a time;
  mlp    MLP outputs (`Site("mlp.out", j)`) restored together over a window of layers centred on l;
  attn   attention outputs (`Site("attn.out", j)`), likewise.
Severing (Fig. 3) restores a residual state while holding later layers' MLP (or attention) outputs at
their corrupted values. Patching from another prompt uses the same machinery with the second prompt's
clean states as the source and no noise; its score is P(the second prompt's answer).

Speed. Every restored run is an independent forward, so they are batched: the rows of one forward are
restorations × noise samples. A restored run equals the corrupted run everywhere before the restored
state, in both directions:
  * before the restored token (the model is causal): each restored token t runs only positions t..end,
    on top of a key/value cache of the corrupted prefix (one prefix forward per token, copied per batch);
  * below the restored layer: a restoration whose lowest site is in block l (or is block l's output)
    starts the forward there (`hooks.start_at`), from the corrupted residual stream captured once in
    the baseline run. Batches therefore group restorations by (first token, first block).
Logits are computed only at the last position. Tokens before the first subject token are identical in
the clean and corrupted runs, so restoring them is a no-op: their grid cells are filled with the
corrupted probability without running anything.

Conventions:
  * batch item 0 of the baseline run is the clean run, items 1..samples the corrupted runs;
  * rows of a restoration batch are sample-major: row = sample * n_restorations + restoration;
  * a restoration's "first block" is the first block that must run: l + 1 for `resid_out` at l (block
    l's output is taken from the corrupted run, then restored by the hook), j for `mlp.out`/`attn.out`
    at j;
  * score grids are (pos, n_layers): one row per prompt token, one column per layer (window centre);
  * an answer of several tokens is scored by its first token only (`TraceResult.answer_n_tokens` says
    how many it has): the paper traces single-token objects, and P(first token) is what the last
    position's state decides.

Not handled: batched tracing of several prompts in one forward (facts are traced one after another),
restoring attention heads or MLP neurons individually, models without a key/value cache.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from transformers import DynamicCache

from lmedit.errors import RequestError
from lmedit.hooks import capture, patch, start_at
from lmedit.models.load import as_lm
from lmedit.scoring import next_token_logprobs
from lmedit.tokens import find_subject, prompt_ids, target_ids
from lmedit.types import Site

if TYPE_CHECKING:
    from lmedit.models.load import LM

log = logging.getLogger(__name__)

Kind = Literal["resid", "mlp", "attn"]
KINDS: tuple[Kind, ...] = ("resid", "mlp", "attn")
_SITE_KIND = {"resid": "resid_out", "mlp": "mlp.out", "attn": "attn.out"}
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


# --------------------------------------------------------------------------------------------------
# single-fact tracing


@dataclass
class TraceResult:
    """A causal trace of one prompt for one kind of state (a `scores` grid like the paper's Fig. 1).

    Attributes:
        kind: "resid", "mlp" or "attn".
        scores: (pos, n_layers) mean P(answer) with the state(s) at (token, layer) restored; NaN where
            nothing was traced (tokens outside `tokens=`, or with no counterpart in the source prompt).
        tokens: the prompt's token strings.
        subject_range: (first, last) subject token positions, inclusive.
        clean_prob / corrupted_prob: P(answer) in the clean and the corrupted run. In source mode,
            "clean" is the source prompt's run and "corrupted" the traced prompt's own run.
        answer: the scored answer's text; answer_token: its first token (the one scored);
            answer_n_tokens: how many tokens the answer has (only the first is scored).
        severed: "mlp"/"attn" when later layers' MLP/attention outputs were frozen (resid kind only).
        source_prompt / source_offset: patching from another prompt; traced position t takes the source
            state at t + source_offset (prompts aligned at their ends).
        n_forwards: forwards run by the whole `trace_kinds` call (shared by the kinds it traced); `extra`
            holds its other work counts: "block_positions" (token-positions × blocks run, summed over
            forwards) and "unembedded_rows".
    """

    kind: str
    scores: list[list[float]]
    tokens: list[str]
    subject_range: tuple[int, int]
    prompt: str
    subject: str
    answer: str
    answer_token: str
    answer_token_id: int
    answer_n_tokens: int
    clean_prob: float
    corrupted_prob: float
    noise: float
    samples: int
    window: int
    seed: int
    model: str = ""
    severed: str | None = None
    source_prompt: str | None = None
    source_offset: int = 0
    n_forwards: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def grid(self) -> torch.Tensor:
        """`scores` as a (pos, n_layers) float tensor."""
        return torch.tensor(self.scores, dtype=torch.float64)

    @property
    def effect(self) -> torch.Tensor:
        """Indirect effect P_restored − P_corrupted, (pos, n_layers)."""
        return self.grid - self.corrupted_prob

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = asdict(self)
        data["scores"] = [[None if math.isnan(v) else v for v in row] for row in self.scores]
        path.write_text(json.dumps(data, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> TraceResult:
        data = json.loads(Path(path).read_text())
        data["scores"] = [[math.nan if v is None else v for v in row] for row in data["scores"]]
        data["subject_range"] = tuple(data["subject_range"])
        return cls(**data)

    def plot(self, path: str | Path) -> list[Path]:
        """Write the heatmap as `path` with .png and .svg suffixes; returns both paths."""
        return plot_trace(self, path)


def _validate(lm: LM, prompt: str, samples: int, noise: float | None, window: int | None) -> int:
    if not prompt or not prompt.strip():
        raise RequestError("the prompt is empty: give the text whose next token is the answer")
    if "{}" in prompt:
        raise RequestError(f"trace takes a filled prompt, not a template: {prompt!r} contains '{{}}'")
    if samples < 1:
        raise RequestError(f"samples must be >= 1, got {samples}")
    if noise is not None and (noise < 0 or not math.isfinite(noise)):
        raise RequestError(f"noise must be a finite non-negative std, got {noise}")
    return _validate_window(lm, window)


def _validate_window(lm: LM, window: int | None) -> int:
    """The window to use: `window`, or the default for the model's depth."""
    n_layers = lm.n_layers
    window = default_window(n_layers) if window is None else window
    if not 1 <= window <= n_layers:
        raise RequestError(f"window={window} must be between 1 and the model's {n_layers} layers")
    return window


def _encode_prompt(lm: LM, prompt: str) -> list[int]:
    ids = prompt_ids(lm, prompt)
    limit = max_positions(lm)
    if limit is not None and len(ids) > limit:
        raise RequestError(f"the prompt has {len(ids)} tokens but the model's context is {limit} "
                           "(config.max_position_embeddings): shorten it")
    return ids


def _restorations(kind: str, tokens: Iterable[int], n_layers: int, window: int,
                  sever: str | None) -> list[tuple[int, int, Restoration]]:
    """(token, layer, restoration) for every grid cell of `kind` at `tokens`."""
    out = []
    for t in tokens:
        for layer in range(n_layers):
            if kind == "resid":
                restore = ((Site("resid_out", layer), t),)
            else:
                restore = tuple((Site(_SITE_KIND[kind], j), t) for j in window_layers(layer, window, n_layers))
            freeze = ()
            if sever is not None:
                freeze = tuple(Site(_SITE_KIND[sever], j) for j in range(layer + 1, n_layers))
            out.append((t, layer, Restoration(restore, freeze)))
    return out


def _token_strings(lm: LM, ids: Sequence[int]) -> list[str]:
    return [lm.tokenizer.decode([i]) for i in ids]


@torch.no_grad()
def _capture_all(lm: LM, input_ids: torch.Tensor, noise: torch.Tensor | None, sites: Sequence[Site]):
    """One forward of `input_ids` (batch, pos) with optional embed noise; returns captured sites and the
    final-norm output at the last position."""
    final = Site("final_norm")
    fns: dict[Site, Any] = {}
    if noise is not None:
        fns[Site("embed")] = lambda act, site: act + noise.to(act.dtype)
    with patch(lm, fns), capture(lm, [*sites, final], stop_after=final) as acts:
        lm.model(input_ids=input_ids, use_cache=False)
    return acts, acts[final][:, -1]


@torch.no_grad()
def trace_kinds(lm: LM, prompt: str, subject: str, answer: str | None = None, *,
                kinds: Sequence[str] = KINDS, samples: int = 10, noise: float | None = None,
                window: int | None = None, seed: int = 0, sever: str | None = None,
                tokens: Sequence[int] | None = None, source_prompt: str | None = None,
                source_answer: str | None = None, max_tokens: int = 4096,
                progress: ProgressFn | None = None) -> dict[str, TraceResult]:
    """Trace one prompt for several kinds at once (their restorations share batches). See `trace`."""
    window = _validate(lm, prompt, samples, noise, window)
    for kind in kinds:
        if kind not in KINDS:
            raise RequestError(f"unknown trace kind {kind!r}; choose from {KINDS}")
    if sever is not None and (sever not in ("mlp", "attn") or set(kinds) != {"resid"}):
        raise RequestError("sever='mlp' or 'attn' freezes later layers while restoring the residual stream: "
                           f"use it with kind='resid' only (got sever={sever!r}, kinds={tuple(kinds)})")
    if source_prompt is not None and not source_prompt.strip():
        raise RequestError("the source prompt is empty: give the prompt whose states are patched in")
    n_layers = lm.n_layers
    ids = _encode_prompt(lm, prompt)
    span = find_subject(lm, prompt, subject)
    n_pos = len(ids)
    if tokens is not None:
        bad = [t for t in tokens if not 0 <= t < n_pos]
        if bad:
            raise RequestError(f"token positions {bad} are outside the prompt's {n_pos} tokens")
    kinds_sites = [Site(_SITE_KIND[k], layer) for k in KINDS for layer in range(n_layers)]
    d_model = lm.arch.d_model(lm.model)
    work = _Work()

    if source_prompt is None:
        noise = embedding_noise(lm) if noise is None else noise
        generator = torch.Generator().manual_seed(seed)
        subject_noise = torch.randn(samples, span.last - span.first + 1, d_model, generator=generator) * noise
        full_noise = torch.zeros(samples + 1, n_pos, d_model)
        full_noise[1:, span.first:span.last + 1] = subject_noise
        full_noise = full_noise.to(lm.device)
        # Batch item 0 is the clean run; items 1..samples the corrupted runs.
        batch = torch.tensor([ids] * (samples + 1), device=lm.device)
        acts, last = _capture_all(lm, batch, full_noise, kinds_sites)
        work.add(samples + 1, n_pos, n_layers)
        work.unembedded_rows += samples + 1
        logits = lm.arch.logits_from_final(lm.model, last[:1]).float()
        if answer is None:
            answer_id = int(logits[0].argmax())
            answer_text, answer_n = lm.tokenizer.decode([answer_id]).strip(), 1
        else:
            answer_ids = target_ids(lm, answer)
            answer_id, answer_text, answer_n = answer_ids[0], answer.strip(), len(answer_ids)
            if answer_n > 1:
                log.info("answer %r has %d tokens: scoring P(first token %r)", answer, answer_n,
                         lm.tokenizer.decode([answer_id]))
        probs = _answer_probs(lm, last, answer_id)
        clean_prob, corrupted_prob = probs[0].item(), probs[1:].mean().item()
        source = {site: acts[site][0] for site in kinds_sites}
        frozen = {site: acts[site][1:] for site in kinds_sites}
        resid = [acts[Site("resid_out", layer)][1:] for layer in range(n_layers)]
        setup = _Setup(ids, full_noise[1:], source, frozen, answer_id, resid)
        # Tokens before the subject see no noise: restoring them is a no-op (filled with corrupted_prob).
        traced = [t for t in (range(n_pos) if tokens is None else tokens) if t >= span.first]
        offset = 0
    else:
        source_ids = _encode_prompt(lm, source_prompt)
        src_acts, src_last = _capture_all(lm, torch.tensor([source_ids], device=lm.device), None, kinds_sites)
        base_acts, base_last = _capture_all(lm, torch.tensor([ids], device=lm.device), None, kinds_sites)
        work.add(1, len(source_ids), n_layers)
        work.add(1, n_pos, n_layers)
        work.unembedded_rows += 2
        if source_answer is None:
            answer_id = int(lm.arch.logits_from_final(lm.model, src_last).float()[0].argmax())
            answer_text, answer_n = lm.tokenizer.decode([answer_id]).strip(), 1
        else:
            answer_ids = target_ids(lm, source_answer)
            answer_id, answer_text, answer_n = answer_ids[0], source_answer.strip(), len(answer_ids)
        clean_prob = _answer_probs(lm, src_last, answer_id).item()
        corrupted_prob = _answer_probs(lm, base_last, answer_id).item()
        samples, noise = 1, 0.0
        # Prompts are aligned at their ends: the shared template after the subject lines up token by token.
        offset = len(source_ids) - n_pos
        valid = [t for t in range(n_pos) if 0 <= t + offset < len(source_ids)]
        source = {site: torch.zeros(n_pos, src_acts[site].shape[-1], device=lm.device) for site in kinds_sites}
        for site in kinds_sites:
            source[site][valid] = src_acts[site][0, [t + offset for t in valid]]
        frozen = {site: base_acts[site] for site in kinds_sites}
        resid = [base_acts[Site("resid_out", layer)] for layer in range(n_layers)]
        setup = _Setup(ids, torch.zeros(1, n_pos, d_model, device=lm.device), source, frozen, answer_id, resid)
        traced = [t for t in (range(n_pos) if tokens is None else tokens) if t in set(valid)]

    cells = [(kind, t, layer, r) for kind in kinds
             for t, layer, r in _restorations(kind, traced, n_layers, window, sever)]
    results, run = _run_restorations(lm, setup, [c[3] for c in cells], max_tokens=max_tokens, progress=progress)
    work = _Work(work.forwards + run.forwards, work.block_positions + run.block_positions,
                 work.unembedded_rows + run.unembedded_rows)

    out: dict[str, TraceResult] = {}
    for kind in kinds:
        grid = torch.full((n_pos, n_layers), math.nan, dtype=torch.float64)
        if source_prompt is None:
            skipped = [t for t in (range(n_pos) if tokens is None else tokens) if t < span.first]
            grid[skipped] = corrupted_prob
        for (k, t, layer, _), value in zip(cells, results.tolist()):
            if k == kind:
                grid[t, layer] = value
        out[kind] = TraceResult(
            kind=kind, scores=grid.tolist(), tokens=_token_strings(lm, ids), subject_range=(span.first, span.last),
            prompt=prompt, subject=subject, answer=answer_text, answer_token=lm.tokenizer.decode([answer_id]),
            answer_token_id=answer_id, answer_n_tokens=answer_n, clean_prob=clean_prob,
            corrupted_prob=corrupted_prob, noise=float(noise), samples=samples,
            window=1 if kind == "resid" else window, seed=seed, model=lm.name, severed=sever,
            source_prompt=source_prompt, source_offset=offset, n_forwards=work.forwards,
            extra={"block_positions": work.block_positions, "unembedded_rows": work.unembedded_rows})
    return out


def trace(lm: LM, prompt: str, subject: str, answer: str | None = None, *, kind: str = "resid",
          samples: int = 10, noise: float | None = None, window: int | None = None, seed: int = 0,
          sever: str | None = None, tokens: Sequence[int] | None = None, source_prompt: str | None = None,
          source_answer: str | None = None, max_tokens: int = 4096,
          progress: ProgressFn | None = None) -> TraceResult:
    """Causal trace of one fact: P(answer) with each (token, layer) state restored in corrupted runs.

    Args:
        lm: the model bundle.
        prompt: the filled prompt, e.g. "The Space Needle is in downtown".
        subject: the subject, a substring of the prompt (its last occurrence is used).
        answer: the expected completion; default the model's top next token. Only its first token is
            scored (the result's `answer_n_tokens` says how many it has).
        kind: "resid" (residual stream), "mlp" or "attn" (outputs restored over a window of layers).
        samples: noise draws averaged per restoration.
        noise: σ of the Gaussian noise on the subject's embeddings; default `embedding_noise(lm)`.
        window: layers restored together for mlp/attn; default `default_window(lm.n_layers)`.
        seed: seeds the noise.
        sever: "mlp" or "attn": with kind="resid", hold later layers' MLP/attention outputs at their
            corrupted values during the restoration (the paper's Fig. 3).
        tokens: restrict the trace to these token positions (others are NaN); default every token.
        source_prompt: patch states from this prompt's clean run (aligned at the prompts' ends) into the
            prompt's own clean run instead of restoring clean states into noised runs; scores are then
            P(source_answer).
        source_answer: the source prompt's answer; default its top next token.
        max_tokens: token-positions per forward (memory bound).
        progress: called as progress(done, total) after each batch of restorations.

    Returns:
        A `TraceResult` (scores grid, clean and corrupted probabilities, tokens, settings).

    Raises:
        RequestError: empty prompt, subject not in the prompt, window outside 1..n_layers, prompt longer
            than the model's context, unknown kind, sever with a kind other than "resid".
        NotAnLMError: `lm` is a bare transformers model (wrap it with `lmedit.LM.from_hf`).
    """
    lm = as_lm(lm)
    return trace_kinds(lm, prompt, subject, answer, kinds=(kind,), samples=samples, noise=noise, window=window,
                       seed=seed, sever=sever, tokens=tokens, source_prompt=source_prompt,
                       source_answer=source_answer, max_tokens=max_tokens, progress=progress)[kind]


@torch.no_grad()
def restored_prob(lm: LM, prompt: str, subject: str, restore: Mapping[Site, Sequence[int]], answer: str | None = None,
                  *, samples: int = 10, noise: float | None = None, seed: int = 0) -> float:
    """P(answer) in the corrupted runs with the clean states at the given sites and tokens all restored at once.

    The building block of a trace, for checks and custom experiments: restoring `{Site("resid_out", l):
    range(n_tokens)}` for any layer l gives back the clean probability.

    Args:
        lm, prompt, subject, answer, samples, noise, seed: as in `trace`.
        restore: site -> token positions whose clean states are restored together in every corrupted run.

    Returns:
        The mean P(answer's first token) over the noise samples.

    Raises:
        RequestError: as in `trace`, or `restore` names nothing.
    """
    _validate(lm, prompt, samples, noise, None)
    ids = _encode_prompt(lm, prompt)
    span = find_subject(lm, prompt, subject)
    n_pos = len(ids)
    noise = embedding_noise(lm) if noise is None else noise
    d_model = lm.arch.d_model(lm.model)
    generator = torch.Generator().manual_seed(seed)
    full_noise = torch.zeros(samples + 1, n_pos, d_model)
    full_noise[1:, span.first:span.last + 1] = torch.randn(samples, span.last - span.first + 1, d_model,
                                                           generator=generator) * noise
    full_noise = full_noise.to(lm.device)
    sites = list(restore)
    resid_sites = [Site("resid_out", layer) for layer in range(lm.n_layers)]
    acts, last = _capture_all(lm, torch.tensor([ids] * (samples + 1), device=lm.device), full_noise,
                              [*sites, *resid_sites])
    answer_id = (int(lm.arch.logits_from_final(lm.model, last[:1])[0].argmax()) if answer is None
                 else target_ids(lm, answer)[0])
    setup = _Setup(ids, full_noise[1:], {s: acts[s][0] for s in sites}, {}, answer_id,
                   [acts[s][1:] for s in resid_sites])
    pairs = tuple((site, t) for site, positions in restore.items() for t in positions)
    if not pairs:
        raise RequestError("restore names no (site, token) to restore")
    return _run_restorations(lm, setup, [Restoration(pairs)])[0][0].item()


# --------------------------------------------------------------------------------------------------
# facts, averages and the layer suggestion


@dataclass(frozen=True)
class Fact:
    """A fact to trace: `prompt.format(subject)` should be completed by `answer`."""

    prompt: str
    subject: str
    answer: str

    @property
    def text(self) -> str:
        return self.prompt.format(self.subject)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fact:
        """Accepts `answer`, ROME knowns' `attribute` or an edit request's `target_true`; filled prompts too."""
        answer = data.get("answer", data.get("attribute", data.get("target_true")))
        if isinstance(answer, Mapping):
            answer = answer.get("str")
        if "prompt" not in data or "subject" not in data or not answer:
            raise RequestError(f"a fact needs prompt, subject and answer (or attribute); got keys {sorted(data)}")
        prompt, subject = data["prompt"], data["subject"]
        if "{}" not in prompt:
            if subject not in prompt:
                raise RequestError(f"subject {subject!r} does not occur in the prompt {prompt!r}")
            prompt = prompt.replace(subject, "{}", 1)
        return cls(prompt=prompt, subject=subject, answer=answer)


def load_facts(path: str | Path) -> list[Fact]:
    """Facts from a JSONL file (one JSON object per line) or a JSON list.

    Raises:
        MissingFileError: no such file.
        InputFileError: not JSON, or a fact without prompt, subject and answer (file and line or index named).
    """
    from lmedit.errors import InputFileError, MissingFileError

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"facts file {path} does not exist" if not path.exists() else
                               f"facts file {path} is a directory, expected a JSONL file")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            items = [(f"item {i}", d) for i, d in enumerate(json.loads(text), 1)]
        except json.JSONDecodeError as exc:
            raise InputFileError(f"facts file {path} is not valid JSON: line {exc.lineno}: {exc.msg}") from None
    else:
        items = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append((f"line {lineno}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise InputFileError(f"facts file {path}, line {lineno}: not valid JSON ({exc.msg})") from None
    facts = []
    for where, data in items:
        if not isinstance(data, Mapping):
            raise InputFileError(f"facts file {path}, {where}: expected a JSON object, got {type(data).__name__}")
        try:
            facts.append(Fact.from_dict(data))
        except RequestError as exc:
            raise InputFileError(f"facts file {path}, {where}: {exc}") from None
    return facts


def builtin_facts() -> list[Fact]:
    """The built-in facts (ROME's known_1000 subset that gemma3-270m completes correctly; docs/tracing.md)."""
    text = resources.files("lmedit").joinpath("data/trace_facts.jsonl").read_text()
    return [Fact.from_dict(json.loads(line)) for line in text.splitlines() if line.strip()]


@torch.no_grad()
def known_facts(lm: LM, facts: Sequence[Fact]) -> list[Fact]:
    """The facts whose answer's first token is the model's top next-token prediction."""
    if not facts:
        return []
    top = next_token_logprobs(lm, [f.text for f in facts]).argmax(-1).tolist()
    return [f for f, t in zip(facts, top) if target_ids(lm, f.answer)[0] == t]


def token_buckets(n_pos: int, first: int, last: int) -> dict[str, list[int]]:
    """Token positions of each of the paper's averaging buckets (a token may fall in two, e.g. a
    one-token subject is both its first and last token; an empty bucket is an empty list)."""
    return {
        "first subject": [first],
        "middle subject": list(range(first + 1, last)),
        "last subject": [last],
        "first subsequent": [last + 1] if last + 1 < n_pos else [],
        "further tokens": list(range(last + 2, n_pos - 1)),
        "last token": [n_pos - 1],
    }


@dataclass
class AverageTraceResult:
    """Average indirect effect over facts, by token bucket and layer, for each kind (the paper's Fig. 2).

    `mean[kind]` and `band[kind]` are (bucket, n_layers) lists: the mean indirect effect and the half-width
    of its 95% band (1.96 × standard error over facts); `counts[bucket]` is how many facts have that bucket.
    """

    kinds: list[str]
    buckets: list[str]
    mean: dict[str, list[list[float]]]
    band: dict[str, list[list[float]]]
    counts: dict[str, int]
    n_given: int
    n_known: int
    clean_prob: float
    corrupted_prob: float
    samples: int
    noise: float
    window: int
    model: str = ""
    known_only: bool = True

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1, allow_nan=True))
        return path

    @classmethod
    def load(cls, path: str | Path) -> AverageTraceResult:
        return cls(**json.loads(Path(path).read_text()))

    def plot(self, path: str | Path) -> list[Path]:
        return plot_average(self, path)


def average_trace(lm: LM, facts: Sequence[Fact] | None = None, *, kinds: Sequence[str] = KINDS,
                  samples: int = 10, noise: float | None = None, window: int | None = None, seed: int = 0,
                  buckets: Sequence[str] = BUCKETS, known_only: bool = True,
                  progress: ProgressFn | None = None) -> AverageTraceResult:
    """Average indirect effect over facts by token bucket (first/middle/last subject token, first
    subsequent, further, last token), with 95% bands, for each kind.

    Args:
        lm: the model bundle.
        facts: the facts; default `builtin_facts()`.
        kinds, samples, noise, window, seed: as in `trace`.
        buckets: the buckets to trace (tokens of other buckets are not run).
        known_only: keep only the facts the model gets right (as the paper does). When it gets none right
            (random test models), the model's own top prediction is traced instead, with a warning.
        progress: called as progress(facts done, facts total).

    Returns:
        An `AverageTraceResult` (`n_known` says how many facts were kept).

    Raises:
        RequestError: no facts, or an unknown bucket.
    """
    facts = builtin_facts() if facts is None else list(facts)
    if not facts:
        raise RequestError("average_trace needs at least one fact")
    unknown = [b for b in buckets if b not in BUCKETS]
    if unknown:
        raise RequestError(f"unknown bucket(s) {unknown}; choose from {BUCKETS}")
    n_layers = lm.n_layers
    window = default_window(n_layers) if window is None else window
    noise = embedding_noise(lm) if noise is None else noise
    kept = known_facts(lm, facts) if known_only else facts
    use_answers = True
    if known_only and not kept:
        log.warning("the model completes none of the %d facts correctly: tracing its own top predictions", len(facts))
        kept, use_answers = facts, False
    log.info("average trace over %d of %d facts (%s)", len(kept), len(facts),
             "known" if known_only and use_answers else "all")
    per_kind: dict[str, dict[str, list[torch.Tensor]]] = {k: {b: [] for b in buckets} for k in kinds}
    clean, corrupted = [], []
    for i, fact in enumerate(kept):
        ids = _encode_prompt(lm, fact.text)
        span = find_subject(lm, fact.text, fact.subject)
        groups = {b: pos for b, pos in token_buckets(len(ids), span.first, span.last).items() if b in buckets}
        needed = sorted({t for pos in groups.values() for t in pos})
        results = trace_kinds(lm, fact.text, fact.subject, fact.answer if use_answers else None, kinds=kinds,
                              samples=samples, noise=noise, window=window, seed=seed + i, tokens=needed)
        first = next(iter(results.values()))
        clean.append(first.clean_prob)
        corrupted.append(first.corrupted_prob)
        for kind, result in results.items():
            effect = result.effect  # (pos, n_layers)
            for bucket, pos in groups.items():
                if pos:
                    per_kind[kind][bucket].append(effect[pos].mean(0))
        if progress is not None:
            progress(i + 1, len(kept))
    mean: dict[str, list[list[float]]] = {}
    band: dict[str, list[list[float]]] = {}
    for kind in kinds:
        rows_mean, rows_band = [], []
        for bucket in buckets:
            values = per_kind[kind][bucket]
            if not values:
                rows_mean.append([math.nan] * n_layers)
                rows_band.append([math.nan] * n_layers)
                continue
            stacked = torch.stack(values)  # (facts, n_layers)
            rows_mean.append(stacked.mean(0).tolist())
            sem = stacked.std(0) / math.sqrt(len(values)) if len(values) > 1 else torch.zeros(n_layers)
            rows_band.append((1.96 * sem).tolist())
        mean[kind], band[kind] = rows_mean, rows_band
    counts = {b: len(per_kind[kinds[0]][b]) for b in buckets} if kinds else {}
    return AverageTraceResult(kinds=list(kinds), buckets=list(buckets), mean=mean, band=band, counts=counts,
                              n_given=len(facts), n_known=len(kept) if use_answers else 0,
                              clean_prob=sum(clean) / len(clean), corrupted_prob=sum(corrupted) / len(corrupted),
                              samples=samples, noise=float(noise), window=window, model=lm.name,
                              known_only=known_only)


@dataclass
class LayerSuggestion:
    """The layer to edit and the evidence: the average MLP indirect effect at the last subject token per
    layer (window centre), with its 95% band, over `n_facts` facts.

    `fingerprint` (the model's `LM.fingerprint`), `facts_sha` (hash of the facts' content), `noise`,
    `window`, `samples` and `seed` are the settings it was computed with, which key its on-disk cache.
    """

    layer: int
    curve: list[float]
    band: list[float]
    n_facts: int
    window: int
    samples: int
    model: str = ""
    noise: float = 0.0
    seed: int = 0
    fingerprint: str = ""
    facts_sha: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SUGGESTION_VERSION = 1  # bump when suggest_layer's method changes: old cache entries are then ignored


def _facts_sha(facts: Sequence[Fact]) -> str:
    text = json.dumps([[f.prompt, f.subject, f.answer] for f in facts], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _suggestion_path(root: Path, lm: LM, facts_sha: str, samples: int, noise: float, window: int,
                     seed: int) -> Path:
    settings = json.dumps({"version": SUGGESTION_VERSION, "facts": facts_sha, "samples": samples,
                           "noise": float(noise).hex(), "window": window, "seed": seed}, sort_keys=True)
    key = hashlib.sha256(settings.encode()).hexdigest()[:16]
    return root / lm.fingerprint / f"suggest_layer-{key}.json"


def _write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file in the same directory, then rename it over `path` (readers never
    see a partial file; of two concurrent writers, the last rename wins)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def suggest_layer(lm: LM, facts: Sequence[Fact] | None = None, *, samples: int = 5, noise: float | None = None,
                  window: int | None = None, seed: int = 0, progress: ProgressFn | None = None,
                  cache: bool | str | Path = True) -> LayerSuggestion:
    """The layer whose MLP restoration at the last subject token has the largest average indirect effect.

    What ROME's `layer=None` ("auto") uses. Only the last subject token is traced, so this costs about
    n_layers × samples short rows per fact: 1-3 minutes for the built-in facts on 2 CPU cores. The
    answer and its evidence curve are therefore cached on disk, as JSON, under
    `<cache>/<LM.fingerprint>/suggest_layer-<key>.json`, where the key hashes the facts' content and the
    settings (samples, resolved noise and window, seed); a later call with the same model, facts and
    settings reads that file. Like the covariance statistics, the cache is keyed by the weights the
    model was loaded with, so a call while an edit is applied in place returns the unedited model's answer.

    Args:
        lm: the model bundle.
        facts: the facts to average over; default `builtin_facts()` (those the model gets right are kept).
        samples: noise draws per restoration (5: averaging over facts smooths the rest).
        noise, window, seed: as in `trace`.
        progress: called as progress(facts done, facts total) (not called on a cache hit).
        cache: True for `lmedit.models.load.cache_dir() / "tracing"` ($LMEDIT_CACHE/tracing), a
            directory to use instead, or False to neither read nor write a cache.

    Returns:
        A `LayerSuggestion` with `layer` and the evidence curve.
    """
    facts = builtin_facts() if facts is None else list(facts)
    window = _validate_window(lm, window)
    noise = embedding_noise(lm) if noise is None else noise
    facts_sha = _facts_sha(facts)
    path = None
    if cache is not False:
        from lmedit.models.load import cache_dir

        root = cache_dir() / "tracing" if cache is True else Path(cache)
        path = _suggestion_path(root, lm, facts_sha, samples, noise, window, seed)
        if path.exists():
            try:
                suggestion = LayerSuggestion(**json.loads(path.read_text()))
            except (ValueError, TypeError) as error:  # a truncated or foreign file: recompute and overwrite
                log.warning("ignoring unreadable cached layer suggestion %s (%s)", path, error)
            else:
                log.info("suggested layer %d for %s, cached in %s", suggestion.layer, lm.name, path)
                return suggestion
    avg = average_trace(lm, facts, kinds=("mlp",), samples=samples, noise=noise, window=window, seed=seed,
                        buckets=("last subject",), progress=progress)
    curve, band = avg.mean["mlp"][0], avg.band["mlp"][0]
    layer = max(range(len(curve)), key=lambda i: curve[i])
    n = avg.n_known or avg.n_given
    log.info("suggested layer %d for %s (MLP effect %.3f at the last subject token, %d facts)",
             layer, lm.name, curve[layer], n)
    suggestion = LayerSuggestion(layer=layer, curve=curve, band=band, n_facts=n, window=avg.window, samples=samples,
                                 model=lm.name, noise=float(noise), seed=seed, fingerprint=lm.fingerprint,
                                 facts_sha=facts_sha)
    if path is not None:
        _write_json_atomic(path, suggestion.to_dict())
    return suggestion


# --------------------------------------------------------------------------------------------------
# plots (matplotlib's Agg canvas directly: no pyplot global state, no display needed)

_CMAPS = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}
_TITLES = {"resid": "single restored layer", "mlp": "MLP", "attn": "attention"}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> list[Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for suffix in (".png", ".svg"):
        target = path.with_suffix(suffix)
        fig.savefig(target, dpi=110 if suffix == ".png" else None, bbox_inches="tight")
        out.append(target)
    return out


def plot_trace(result: TraceResult, path: str | Path) -> list[Path]:
    """Heatmap of a `TraceResult` (tokens down, layers across, subject tokens starred, colour bar).

    Returns:
        The written PNG and SVG paths (`path` with those suffixes).
    """
    import numpy as np

    grid = np.array(result.scores, dtype=float)
    n_pos, n_layers = grid.shape
    fig = _figure(1.2 + 0.28 * n_layers, 0.9 + 0.32 * n_pos)
    ax = fig.add_subplot()
    low = result.corrupted_prob
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=_CMAPS.get(result.kind, "Purples"), aspect="auto",
                      vmin=min(low, np.nanmin(grid)) if np.isfinite(grid).any() else low,
                      interpolation="nearest")
    first, last = result.subject_range
    ax.set_yticks(range(n_pos))
    ax.set_yticklabels([repr(tok)[1:-1] + (" *" if first <= i <= last else "") for i, tok in enumerate(result.tokens)])
    ax.set_xticks(range(0, n_layers, max(1, n_layers // 10)))
    if result.kind == "resid":
        xlabel = "single restored layer"
    else:
        xlabel = f"center of interval of {result.window} restored {_TITLES[result.kind]} layers"
    if result.source_prompt is not None:
        title = f"Patching states from {result.source_prompt!r}"
    elif result.severed:
        title = f"Restoring the residual stream, later {_TITLES[result.severed]} severed"
    else:
        what = "state" if result.kind == "resid" else _TITLES[result.kind]
        title = f"Impact of restoring {what} after corrupted input"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    bar = fig.colorbar(image, ax=ax)
    bar.ax.set_title(f"p({result.answer_token.strip()})", fontsize=8)
    notes = f"clean p={result.clean_prob:.3f}, corrupted p={result.corrupted_prob:.3f}"
    if result.answer_n_tokens > 1:
        notes += f" (first of {result.answer_n_tokens} answer tokens)"
    fig.text(0.01, 0.0, notes, fontsize=7)
    return _save(fig, path)


def plot_severing(plain: TraceResult, severed: Mapping[str, TraceResult], path: str | Path,
                  token: int | None = None) -> list[Path]:
    """Bar plot of the indirect effect per layer at `token` (default: last subject token), restoring the
    residual stream with nothing severed and with later MLP / attention outputs frozen (the paper's Fig. 3)."""
    import numpy as np

    token = plain.subject_range[1] if token is None else token
    n_layers = len(plain.scores[0])
    fig = _figure(max(5.0, 0.35 * n_layers), 3.2)
    ax = fig.add_subplot()
    series = {"no severing": plain, **{f"{_TITLES[k]} severed": r for k, r in severed.items()}}
    width = 0.8 / len(series)
    colours = {"no severing": "tab:purple", "MLP severed": "tab:green", "attention severed": "tab:red"}
    for i, (label, result) in enumerate(series.items()):
        effect = np.array(result.scores[token], dtype=float) - result.corrupted_prob
        ax.bar(np.arange(n_layers) + (i - (len(series) - 1) / 2) * width, effect, width, label=label,
               color=colours.get(label))
    ax.set_xlabel("restored layer")
    ax.set_ylabel(f"indirect effect on p({plain.answer_token.strip()})")
    ax.set_title(f"Severing later layers at token {repr(plain.tokens[token])[1:-1]}", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_average(result: AverageTraceResult, path: str | Path) -> list[Path]:
    """The averaged plot: per kind, a bucket × layer heatmap and the lines with 95% bands."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    n_kinds = len(result.kinds)
    fig = _figure(4.6 * n_kinds, 6.4)
    axes = fig.subplots(2, n_kinds, squeeze=False)
    colours = ["tab:blue", "tab:cyan", "tab:red", "tab:orange", "tab:olive", "tab:gray"]
    for col, kind in enumerate(result.kinds):
        mean = np.array(result.mean[kind], dtype=float)
        band = np.array(result.band[kind], dtype=float)
        ax = axes[0][col]
        image = ax.imshow(np.ma.masked_invalid(mean), cmap=_CMAPS[kind], aspect="auto", interpolation="nearest")
        ax.set_yticks(range(len(result.buckets)))
        ax.set_yticklabels(result.buckets if col == 0 else [""] * len(result.buckets), fontsize=8)
        ax.set_title(f"Average indirect effect: {_TITLES[kind] if kind != 'resid' else 'residual stream'}",
                     fontsize=9)
        fig.colorbar(image, ax=ax)
        ax = axes[1][col]
        layers = np.arange(mean.shape[1])
        for b, bucket in enumerate(result.buckets):
            if np.isnan(mean[b]).all():
                continue
            ax.plot(layers, mean[b], label=bucket, color=colours[BUCKETS.index(bucket) % len(colours)])
            ax.fill_between(layers, mean[b] - band[b], mean[b] + band[b], alpha=0.2,
                            color=colours[BUCKETS.index(bucket) % len(colours)])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer" if kind == "resid" else f"center of {result.window}-layer window")
        if col == 0:
            ax.set_ylabel("average indirect effect")
            ax.legend(fontsize=7)
    fig.suptitle(f"{result.model}: average over {result.n_known or result.n_given} facts "
                 f"({'known' if result.n_known else 'all'}; {result.samples} noise samples, 95% bands)", fontsize=10)
    return _save(fig, path)
