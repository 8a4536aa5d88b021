"""Tokens a text model must never emit, found on load, marked special and kept out of generation.

Gemma 3's vocabulary is shared with its multimodal siblings: `<start_of_image>`, `<end_of_image>` and
`[multimodal]` (and, in other releases, image/audio soft tokens) mark where image or audio embeddings go.
A text-only checkpoint never saw them in text, and the GGUF conversion leaves them unflagged, so
`skip_special_tokens` kept them and an edited model's generation could come out as
`Rome<start_of_image><start_of_image>…` (docs/editors.md, "Derailed generations").

`never_text_ids(tokenizer)` lists them with every other special token except end-of-sequence (padding,
`<unk>`, `<mask>`, `<unusedN>`, chat-turn markers: none is text a completion should contain). Generation
suppresses them (`lmedit.scoring.generate`) and measures the probability the model put on them first, so
hiding the tokens does not hide the damage: the evaluation's `derailment` metric and the ledger audit
read that probability.
"""

from __future__ import annotations

import re

from transformers import PreTrainedTokenizerBase

# Added tokens that only ever stand for non-text input, whatever the tokenizer's flags say.
_MULTIMODAL = re.compile(r"^(<(start|end)_of_(image|audio|video)>|<(image|audio|video)_soft_token>|\[multimodal\]|"
                         r"<(image|audio|video)>|<\|(image|audio|video)_pad\|>|<\|vision_(start|end|pad)\|>)$")


def multimodal_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Added tokens of `tokenizer` that mark image/audio/video input."""
    return sorted(t.content for t in tokenizer.added_tokens_decoder.values() if _MULTIMODAL.match(t.content))


def mark_multimodal_special(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Flag the multimodal marker tokens as special (so decoding with `skip_special_tokens` drops them)."""
    unflagged = [t.content for t in tokenizer.added_tokens_decoder.values()
                 if _MULTIMODAL.match(t.content) and not t.special]
    if unflagged:
        tokenizer.add_special_tokens({"additional_special_tokens": unflagged},
                                     replace_extra_special_tokens=False)
    return unflagged


def never_text_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """Ids of tokens a completion must never contain: special tokens other than EOS, and multimodal markers."""
    keep = {tokenizer.eos_token_id}
    ids = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special or _MULTIMODAL.match(t.content)}
    ids |= {i for i in tokenizer.all_special_ids}
    return tuple(sorted(i for i in ids - keep if i is not None and i >= 0))
