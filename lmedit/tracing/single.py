"""Single traces: one prompt's grid of restored runs for each kind of state (the three heatmaps),
severing later layers, patching from another prompt, and `restored_prob` for custom restorations.

Conventions:
  * batch item 0 of the baseline run is the clean run, items 1..samples the corrupted runs;
  * score grids are (pos, n_layers): one row per prompt token, one column per layer (window centre);
  * an answer of several tokens is scored by its first token only (`TraceResult.answer_n_tokens` says
    how many it has): the paper traces single-token objects, and P(first token) is what the last
    position's state decides;
  * tokens before the first subject token are identical in the clean and corrupted runs, so restoring
    them is a no-op: their grid cells are filled with the corrupted probability without running anything.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmedit.errors import RequestError
from lmedit.hooks import capture, patch
from lmedit.models.load import as_lm
from lmedit.tokens import check_length, find_subject, prompt_ids, target_ids
from lmedit.tracing.engine import (
    KINDS,
    SITE_KIND,
    ProgressFn,
    Restoration,
    _answer_probs,
    _run_restorations,
    _Setup,
    _Work,
    default_window,
    embedding_noise,
    max_positions,
    window_layers,
)
from lmedit.tracing.plots import plot_trace
from lmedit.types import Site

if TYPE_CHECKING:
    from lmedit.models.load import LM

log = logging.getLogger(__name__)



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

    def plot(self, path: str | Path, mark_layer: int | None = None) -> list[Path]:
        """Write the heatmap as `path` with .png and .svg suffixes (`mark_layer`: a layer to mark); returns both."""
        return plot_trace(self, path, mark_layer)


def _validate(lm: LM, prompt: str, samples: int, noise: float | None, window: int | None) -> int:
    if not prompt or not prompt.strip():
        raise RequestError("the prompt is empty: give the text whose next token is the answer")
    check_length(lm, "the prompt", chars=len(prompt))  # a huge prompt fails here, before it is tokenized
    if "{}" in prompt:
        raise RequestError(f"trace takes a filled prompt, not a template: {prompt!r} contains '{{}}'")
    if samples < 1:
        raise RequestError(f"samples must be >= 1, got {samples}")
    if noise is not None and (noise < 0 or not math.isfinite(noise)):
        raise RequestError(f"noise must be a finite non-negative std, got {noise}")
    return validate_window(lm, window)


def validate_window(lm: LM, window: int | None) -> int:
    """The window to use: `window`, or the default for the model's depth."""
    n_layers = lm.n_layers
    window = default_window(n_layers) if window is None else window
    if not 1 <= window <= n_layers:
        raise RequestError(f"window={window} must be between 1 and the model's {n_layers} layers")
    return window


def encode_prompt(lm: LM, prompt: str) -> list[int]:
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
                restore = tuple((Site(SITE_KIND[kind], j), t) for j in window_layers(layer, window, n_layers))
            freeze = ()
            if sever is not None:
                freeze = tuple(Site(SITE_KIND[sever], j) for j in range(layer + 1, n_layers))
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
    ids = encode_prompt(lm, prompt)
    span = find_subject(lm, prompt, subject)
    n_pos = len(ids)
    if tokens is not None:
        bad = [t for t in tokens if not 0 <= t < n_pos]
        if bad:
            raise RequestError(f"token positions {bad} are outside the prompt's {n_pos} tokens")
    kinds_sites = [Site(SITE_KIND[k], layer) for k in KINDS for layer in range(n_layers)]
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
        source_ids = encode_prompt(lm, source_prompt)
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
    ids = encode_prompt(lm, prompt)
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
