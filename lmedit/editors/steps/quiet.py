"""Quiet edits: keeping an edited fact from leaking into what the model says about other subjects.

A weight edit makes the subject's hidden state carry the new object. When the edited statement appears in a
text ("The Eiffel Tower is located in Rome. The Louvre is located in"), later positions attend to that state
and repeat the new object for subjects the edit never named: the "loud facts" that Specificity+ (Hoelscher-
Obermaier et al. 2023, "Detecting Edit Failures In Large Language Models: An Improved Specificity
Benchmark", arXiv:2305.17553) measures, and that every published weight editor shows.

v* (ROME's value, MEMIT's z) is optimised only on prompts that query the subject, so nothing in its
objective holds those later positions. The quiet option adds a term for that to v*'s loss, on "statement +
another subject's prompt" texts: the request's own prompt completed with target_new, followed by the same
prompt about other, well-known subjects. At the last token of each, it penalises any rise of target_new's
log-probability above the *unedited* model's on the same text (which has read the statement as plain words
too): max(0, log p_edited(new) − log p_unedited(new)), averaged over the texts, times `quiet_factor`. The
edit may add nothing to the copying the words alone cause. The other subjects come from a fixed list of
well-known entities shipped here, never from an evaluation set. `steps.value.optimize_values` scores these
texts next to ROME's essence KL rows, in the same forward (`SplitForward` packs the request's short prompts
into lanes as long as these texts).

Tried and kept out (docs/editors.md, "Quiet edits"): a full KL to the unedited distribution on the same
texts instead of the one-token hinge (it fought efficacy: ES 0.97 → 0.90 at weight 4 for less Specificity+),
and adding the term only every other step at twice the weight (no faster: more steps, ES and PS fell).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from lmedit.errors import ConfigError
from lmedit.types import EditRequest

# Well-known subjects of many kinds (people, places, organisations, works, objects), for the other-subject
# prompts. Chosen for spread, not from any evaluation set.
OTHER_SUBJECTS = (
    "Barack Obama", "Albert Einstein", "William Shakespeare", "Marie Curie", "Pablo Picasso", "Cristiano Ronaldo",
    "Taylor Swift", "Mahatma Gandhi", "Wolfgang Amadeus Mozart", "Leonardo da Vinci", "Queen Elizabeth II",
    "Nelson Mandela", "the Statue of Liberty", "the Great Wall of China", "Mount Everest", "the Amazon River",
    "Tokyo", "Berlin", "Canada", "Australia", "Microsoft", "Toyota", "Nokia", "the BBC", "Harvard University",
    "the Red Cross", "Google", "the Beatles", "Star Wars", "Harry Potter", "the iPhone", "Coca-Cola",
)


@dataclass(frozen=True, kw_only=True)
class QuietSettings:
    """Config fields of the quiet option, shared by ROME, MEMIT and AlphaEdit (mixed into their configs)."""

    quiet_factor: float = 0.0          # weight of the quiet term in v*'s loss; 0 turns the option off
    quiet_prompts: int = 4             # other-subject prompts per request

    def check_quiet(self) -> None:
        owner = type(self).__name__
        if not (self.quiet_factor >= 0):
            raise ConfigError(f"{owner}.quiet_factor must be >= 0, got {self.quiet_factor}")
        if not (1 <= self.quiet_prompts <= len(OTHER_SUBJECTS)):
            raise ConfigError(f"{owner}.quiet_prompts must be between 1 and {len(OTHER_SUBJECTS)}, "
                              f"got {self.quiet_prompts}")


def other_subjects(request: EditRequest, n: int) -> list[str]:
    """`n` subjects from `OTHER_SUBJECTS` other than the request's, picked by a hash of the request (so the
    same request always gets the same ones, and different requests spread over the list)."""
    seed = int.from_bytes(hashlib.sha256(f"{request.subject}\0{request.prompt}".encode()).digest()[:8], "big")
    pool = [s for s in OTHER_SUBJECTS if s.lower() != request.subject.lower()]
    stride = 7 if math.gcd(7, len(pool)) == 1 else 1
    return [pool[(seed + stride * i) % len(pool)] for i in range(n)]


def quiet_templates(request: EditRequest, n: int) -> list[str]:
    """The `n` quiet texts as templates with "{}" for the request's subject (as `EditRequest.prompt`):
    "{prompt} {target_new}. {prompt about another subject}"."""
    def literal(text: str) -> str:
        return text.replace("{", "{{").replace("}", "}}")

    statement = f"{request.prompt} {literal(request.target_new)}. "
    return [statement + literal(request.prompt.format(other)) for other in other_subjects(request, n)]
