"""`lmedit.generate` and `lmedit.score`: look at what a model (edited or not) says, text in, text out.

    lm = lmedit.load("gemma3-270m")
    prompt = "The Eiffel Tower is located in the city of"
    lmedit.generate(lm, prompt, max_new_tokens=5)    # -> " Paris, France..." (a str for a str)
    lmedit.score(lm, prompt, ["Paris", "Rome"])      # -> [TargetScore, TargetScore] (a list for a list)

Both see the model with its applied edits: weight edits are in the weights, and wrapper edits (SERAC)
rewrite the prompts they claim. Thin public wrappers of `lmedit.scoring.generate` and
`lmedit.scoring.score_targets`, which batch the work; these add the single-string forms.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, overload

from lmedit.models.load import as_lm
from lmedit.scoring import TargetScore, generate as _generate, score_targets
from lmedit.tokens import check_prompts_fit

if TYPE_CHECKING:
    from lmedit.models.load import LM

__all__ = ["TargetScore", "generate", "score"]


@overload
def generate(lm: LM, prompts: str, *, max_new_tokens: int = ..., greedy: bool = ..., temperature: float = ...,
             seed: int | None = ...) -> str: ...
@overload
def generate(lm: LM, prompts: Sequence[str], *, max_new_tokens: int = ..., greedy: bool = ...,
             temperature: float = ..., seed: int | None = ...) -> list[str]: ...
def generate(lm: LM, prompts: str | Sequence[str], *, max_new_tokens: int = 20, greedy: bool = True,
             temperature: float = 1.0, seed: int | None = None) -> str | list[str]:
    """Continue each prompt and return only the new text (the prompt is not repeated).

    Args:
        lm: the model bundle (`lmedit.load` or `lmedit.LM.from_hf`), with whatever edits are applied.
        prompts: one prompt (a string) or several (a list, generated as one left-padded batch).
        max_new_tokens: tokens to generate per prompt (fewer when the model emits its eos token).
        greedy: argmax decoding (deterministic); False samples with `temperature`.
        temperature: sampling temperature (ignored when `greedy`).
        seed: seeds torch's generator before sampling, for repeatable samples.

    Returns:
        The continuation as a string for a single string; a list of continuations, in order, for a list.

    Raises:
        RequestError: a prompt that is not a string, or whose tokens plus `max_new_tokens` exceed the model's
            context window (checked before any forward).
        NotAnLMError: `lm` is a bare transformers model (wrap it with `lmedit.LM.from_hf`).
    """
    lm = as_lm(lm)
    single = isinstance(prompts, str)
    check_prompts_fit(lm, [prompts] if single else list(prompts), reserve=max_new_tokens,
                      reserved_for="max_new_tokens")
    out = _generate(lm, [prompts] if single else list(prompts), max_new_tokens=max_new_tokens, greedy=greedy,
                    temperature=temperature, seed=seed)
    return out[0] if single else out


@overload
def score(lm: LM, prompts: str, targets: str, *, batch_size: int = ...) -> TargetScore: ...
@overload
def score(lm: LM, prompts: str | Sequence[str], targets: str | Sequence[str], *,
          batch_size: int = ...) -> TargetScore | list[TargetScore]: ...
def score(lm: LM, prompts: str | Sequence[str], targets: str | Sequence[str], *,
          batch_size: int = 32) -> TargetScore | list[TargetScore]:
    """Score each target as the continuation of its prompt: log P(target | prompt) and token accuracy.

    A `TargetScore` holds `logprob` (the sum of the target tokens' log-probabilities, so
    `math.exp(s.logprob)` is the whole target's probability), `n_tokens`, and `token_accuracy` (the
    fraction of target tokens that are the argmax given the gold prefix, EasyEdit's metric). The target is
    tokenized as a continuation: `" " + target.strip()`, without special tokens.

    Args:
        lm: the model bundle, with whatever edits are applied.
        prompts: filled prompt(s), e.g. "The Eiffel Tower is located in the city of" (no "{}").
        targets: the continuation(s), e.g. "Paris".
        batch_size: sequences per forward pass.

    Shapes:
        str, str            -> one `TargetScore`;
        list, list          -> a list, pairing prompts[i] with targets[i] (equal lengths);
        str, list / list, str -> a list: the single string is paired with every item of the list
                               (one prompt against several candidate answers, or one answer across
                               paraphrased prompts).

    Raises:
        ValueError: two lists of different lengths.
        RequestError: a prompt or target that is not a string, or a prompt + target longer than the model's
            context window (checked before any forward).
        NotAnLMError: `lm` is a bare transformers model (wrap it with `lmedit.LM.from_hf`).
    """
    lm = as_lm(lm)
    if isinstance(prompts, str) and isinstance(targets, str):
        check_prompts_fit(lm, [prompts], [targets])
        return score_targets(lm, [prompts], [targets], batch_size=batch_size)[0]
    if isinstance(prompts, str):
        prompts = [prompts] * len(targets)
    if isinstance(targets, str):
        targets = [targets] * len(prompts)
    if len(prompts) == len(targets):  # else score_targets says so
        check_prompts_fit(lm, list(prompts), list(targets))
    return score_targets(lm, list(prompts), list(targets), batch_size=batch_size)
