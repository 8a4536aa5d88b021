"""Scoring text under a model: whole-target log-probabilities, next-token distributions, generation.

Every function batches its inputs and computes logits only at the positions it needs: the
unembedding (262k words for Gemma 3) dominates a small model's forward otherwise.

Every teacher-forced batch in lmedit (rows of prompt + target tokens, and for each target token the
position whose logits predict it) is built by `teacher_forced`: `score_targets`, the harness's
`eval.measure`, the v* optimisation (`editors.steps.value`), fine-tuning (`editors.steps.finetune`) and
MEND's rows (`editors.mend`).

Two metric families rest on `score_targets`: probability comparison (ROME/MEMIT: sum of the target
tokens' log-probs) and teacher-forced token accuracy (EasyEdit: fraction of target tokens that are the
argmax given the gold prefix). Both come out of the same forward pass.

The text-level functions here (`score_targets`, `next_token_logprobs`, `generate`) score the model *with
its applied edits*: weight edits are in the weights, and wrapper edits (`WrapperEdit`) rewrite the
prompts they claim through `lm.edits.route` (`lmedit.models.applied`). `logits_at` works on token ids and sees
the frozen base model only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmedit.errors import RequestError
from lmedit.hooks import capture
from lmedit.tokens import Batch, pad_batch, prompt_ids, target_ids
from lmedit.types import Site

if TYPE_CHECKING:
    from lmedit.models.load import LM


def routed(lm: LM, prompts: Sequence[str]) -> list[str]:
    """The text the base model reads for each prompt under `lm`'s applied wrapper edits (unchanged without any)."""
    return lm.edits.route(prompts)


def logits_at(lm: LM, batch_inputs: dict[str, torch.Tensor], rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Run the model and return logits only at (rows[i], positions[i]) -> (n, d_vocab).

    The forward stops after the final norm; the unembedding runs on the selected positions only.
    Gradients flow when called outside `torch.no_grad()`.
    """
    site = Site("final_norm")
    with capture(lm, [site], stop_after=site, detach=False) as acts:
        lm.model(**batch_inputs, use_cache=False)
    hidden = acts[site][rows, positions]  # (n, d_model)
    return lm.arch.logits_from_final(lm.model, hidden)


@dataclass(frozen=True)
class TeacherForced:
    """A teacher-forced batch: row i is prompt i's tokens followed by target i's, and each target token is scored
    at the position before it, whose logits predict it given the gold prefix.

    Scored tokens run row by row, in target order: token k is `gold[k]`, predicted by the logits at
    (`rows[k]`, `positions[k]`); row i's tokens are `k` in `range(start, start + n)` with
    `(start, n) = spans[i]`. A row without a target (`None`) is its prompt alone, with one read position
    (the prompt's last token: the next-token distribution) whose `gold` is -1.

    Indices are Python lists, so batches can be concatenated (`editors.steps.value` stacks several
    requests' problems); `padded` and `index` put them on a device.
    """

    ids: list[list[int]]          # per row: prompt ids + target ids (the last target token only if fed)
    rows: list[int]               # per scored token: its row
    positions: list[int]          # per scored token: the position whose logits predict it
    gold: list[int]               # per scored token: the target token id (-1 at a target-less row's read position)
    spans: list[tuple[int, int]]  # per row: (first scored token, number of scored tokens)

    def padded(self, lm: LM) -> Batch:
        """The rows right-padded into one batch (`input_ids`, `attention_mask`) on `lm`'s device."""
        return pad_batch(lm, self.ids)

    def index(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, positions, gold) as long tensors on `device`, for `logits_at` and the loss."""
        return (torch.tensor(self.rows, dtype=torch.long, device=device),
                torch.tensor(self.positions, dtype=torch.long, device=device),
                torch.tensor(self.gold, dtype=torch.long, device=device))


def teacher_forced(lm: LM, prompts: Sequence[str], targets: Sequence[str | None], *,
                   feed_last: bool = True) -> TeacherForced:
    """Tokenize `prompts[i]` followed by `targets[i]` (`tokens.prompt_ids` + `tokens.target_ids`) as a
    teacher-forced batch.

    The prompts are taken as the base model reads them: text-level scorers route them through the
    applied wrapper edits first (`routed`).

    Args:
        lm: the model bundle (its tokenizer).
        prompts: filled prompts (no `{}`), one per row.
        targets: the continuation scored after each prompt; None: score nothing, read the next-token
            distribution after the prompt (gold -1).
        feed_last: whether a row ends with its last target token. Nothing reads the logits after it, so
            training drops it (`False`); the scorers keep it (`True`, as they always have: a row's length sets
            the padded batch's width, and with it the float rounding of their numbers).

    Returns:
        The `TeacherForced` batch, rows in the order given.

    Raises:
        RequestError: `prompts` and `targets` differ in length (a `ValueError` too); a target tokenizes to
            nothing.
    """
    if len(prompts) != len(targets):
        raise RequestError(f"{len(prompts)} prompts but {len(targets)} targets: prompts[i] is paired with targets[i]")
    known: dict[str, list[int]] = {}
    ids, rows, positions, gold, spans = [], [], [], [], []
    for r, (prompt, target) in enumerate(zip(prompts, targets)):
        p = prompt_ids(lm, prompt)
        if target is None:
            t, scored = [], [-1]
        else:
            if target not in known:
                known[target] = target_ids(lm, target)
            t = scored = known[target]
        ids.append(p + (t if feed_last else t[:-1]))
        spans.append((len(gold), len(scored)))
        for j, token in enumerate(scored):
            rows.append(r)
            positions.append(len(p) - 1 + j)  # the logits predicting target token j
            gold.append(token)
    return TeacherForced(ids, rows, positions, gold, spans)


@dataclass(frozen=True)
class TargetScore:
    """Scores of one target continuation: log P(target | prompt) and teacher-forced token accuracy."""

    logprob: float       # sum of the target tokens' log-probabilities
    n_tokens: int
    token_accuracy: float  # fraction of target tokens that are the argmax given the gold prefix


@torch.no_grad()
def score_targets(lm: LM, prompts: Sequence[str], targets: Sequence[str], *, batch_size: int = 32) -> list[TargetScore]:
    """Score `targets[i]` as a continuation of `prompts[i]` (filled prompts, no `{}`)."""
    if len(prompts) != len(targets):
        raise RequestError(f"{len(prompts)} prompts but {len(targets)} targets: prompts[i] is paired with targets[i]")
    prompts = routed(lm, prompts)
    out: list[TargetScore] = []
    for start in range(0, len(prompts), batch_size):
        tf = teacher_forced(lm, prompts[start:start + batch_size], targets[start:start + batch_size])
        rows, positions, gold = tf.index(lm.device)
        logp = torch.log_softmax(logits_at(lm, tf.padded(lm).model_inputs(), rows, positions).float(), dim=-1)
        tok_lp = logp.gather(1, gold[:, None])[:, 0]
        correct = logp.argmax(-1) == gold
        for k, n in tf.spans:
            out.append(TargetScore(logprob=tok_lp[k:k + n].sum().item(), n_tokens=n,
                                   token_accuracy=correct[k:k + n].float().mean().item()))
    return out


@torch.no_grad()
def next_token_logprobs(lm: LM, prompts: Sequence[str], *, batch_size: int = 32) -> torch.Tensor:
    """Log-probabilities of the next token after each prompt -> (n, d_vocab)."""
    prompts = routed(lm, prompts)
    chunks = []
    for start in range(0, len(prompts), batch_size):
        ids = [prompt_ids(lm, p) for p in prompts[start:start + batch_size]]
        batch = pad_batch(lm, ids)
        rows = torch.arange(len(ids), device=lm.device)
        last = torch.tensor(batch.lengths, device=lm.device) - 1
        chunks.append(torch.log_softmax(logits_at(lm, batch.model_inputs(), rows, last).float(), dim=-1))
    return torch.cat(chunks)


@dataclass(frozen=True)
class Generation:
    """A greedy or sampled continuation, and how much probability the model put on never-text tokens.

    `never_text_mass` is the mean, over the generated steps, of the probability the model gave to tokens
    a text model must never emit (`LM.never_text_ids`: image/audio markers, padding, `<unusedN>`...)
    before they were suppressed; `never_text_max` its largest value at one step. An unedited model puts
    about 0 there; an edit that derails generation shows up here even though the text stays clean.
    """

    text: str
    never_text_mass: float
    never_text_max: float


class NeverTextGuard:
    """A logits processor: records the softmax mass of the never-text ids per row and step, then masks them."""

    def __init__(self, ids: Sequence[int], vocab: int) -> None:
        self.ids = [i for i in ids if i < vocab]
        self.masses: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.ids:
            return scores
        index = torch.tensor(self.ids, device=scores.device)
        probs = torch.softmax(scores.float(), dim=-1)
        self.masses.append(probs.index_select(1, index).sum(1).cpu())
        scores = scores.clone()
        scores[:, index] = float("-inf")
        return scores


@torch.no_grad()
def generate_detailed(lm: LM, prompts: Sequence[str], *, max_new_tokens: int = 20, greedy: bool = True,
                      temperature: float = 1.0, seed: int | None = None) -> list[Generation]:
    """Continue each prompt, never emitting `lm.never_text_ids`; returns text and never-text probability."""
    from transformers import LogitsProcessorList

    if seed is not None:
        torch.manual_seed(seed)
    prompts = routed(lm, prompts)
    enc = lm.tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left").to(lm.device)
    guard = NeverTextGuard(lm.never_text_ids, lm.model.get_output_embeddings().weight.shape[0])
    out = lm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=not greedy,
                            temperature=temperature if not greedy else None, top_p=None, top_k=None,
                            pad_token_id=lm.tokenizer.pad_token_id, logits_processor=LogitsProcessorList([guard]))
    new = out[:, enc["input_ids"].shape[1]:]
    texts = lm.tokenizer.batch_decode(new, skip_special_tokens=True)
    if guard.masses:
        masses = torch.stack(guard.masses, 1)  # (n, steps); steps after a row's EOS are padding: not counted
        eos = lm.tokenizer.eos_token_id
        is_eos = (new[:, :masses.shape[1]] == eos).cpu().long() if eos is not None else torch.zeros_like(masses).long()
        done = (is_eos.cumsum(1) - is_eos) > 0
        counted = masses.masked_fill(done, 0.0)
        steps = (~done).sum(1).clamp(min=1)
        mean, peak = (counted.sum(1) / steps).tolist(), counted.max(1).values.tolist()
    else:
        mean = peak = [0.0] * len(texts)
    return [Generation(t, m, p) for t, m, p in zip(texts, mean, peak)]


def generate(lm: LM, prompts: Sequence[str], *, max_new_tokens: int = 20, greedy: bool = True,
             temperature: float = 1.0, seed: int | None = None) -> list[str]:
    """Continue each prompt; returns only the new text. Left-pads the batch as generation needs.

    Tokens a text model must never emit (`LM.never_text_ids`) are never generated; `generate_detailed`
    also says how much probability the model put on them.
    """
    return [g.text for g in generate_detailed(lm, prompts, max_new_tokens=max_new_tokens, greedy=greedy,
                                              temperature=temperature, seed=seed)]
