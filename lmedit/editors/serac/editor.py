"""SERAC, semi-parametric editing with a retrieval-augmented counterfactual model (Mitchell et al. 2022,
"Memory-Based Model Editing at Scale", arXiv:2206.06520).

`edit()` computes no weights: it embeds each request's statement and returns a `SeracEdit` (a
`WrapperEdit`) holding them as memory entries. Applied, it routes inputs its scope classifier claims to
the base model with the edit in context and leaves every other input to the frozen base model.
Triplet requests become "{prompt filled} {target_new}"; `EditDescriptor`s (input-output pairs,
implicit descriptors such as "Topic: singing in the shower. Sentiment: positive") are stored as given.

`fit(lm, records)` trains the scope classifier's projection head on an edit dataset's in-scope and
out-of-scope inputs (see `scope.py`); `save_scope(path)` writes it as safetensors with the encoder,
config, held-out accuracies and the base model's fingerprint (`fit(..., out_dir=DIR)`, what `lmedit train
serac --out DIR` runs, writes DIR/scope.safetensors); `scope_path` in the config loads it and refuses a
model with another fingerprint.

Not handled: the paper's trained counterfactual model and cross-encoder classifier (see memory.py,
scope.py); `fit` uses no GPU (the head trains on frozen embeddings in seconds).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmedit.config import to_dict
from lmedit.editors.base import Editor, TrainEvent
from lmedit.editors.serac.config import SeracConfig
from lmedit.editors.serac.memory import MemoryEntry, SeracEdit
from lmedit.editors.serac.scope import (ScopeHead, SentenceEncoder, edit_statement, examples_from_records, load_encoder,
                                        load_head, save_head, scope_accuracy, train_head)
from lmedit.errors import LMEditError, RequestError
from lmedit.registry import editors
from lmedit.types import EditDescriptor, EditRequest

if TYPE_CHECKING:
    from lmedit.eval.records import EvalRecord
    from lmedit.models.load import LM

log = logging.getLogger(__name__)


@editors.register("serac")
class SeracEditor(Editor[SeracConfig]):
    """SERAC (arXiv:2206.06520): edit memory + scope classifier + the base model reading the edit in context."""

    config_class = SeracConfig
    accepts_descriptors = True

    def __init__(self, config: SeracConfig | None = None, *, encoder: SentenceEncoder | None = None) -> None:
        super().__init__(config)
        self._encoder = encoder
        self._head: ScopeHead | None = None           # set by fit(); otherwise from scope_path or the threshold
        self._head_fingerprint: str | None = None
        self.fit_report: dict[str, Any] | None = None

    @property
    def encoder(self) -> SentenceEncoder:
        """The sentence encoder, loaded on first use and shared by every edit this editor makes."""
        if self._encoder is None:
            self._encoder = load_encoder(self.config.encoder)
        return self._encoder

    def head(self, lm: LM) -> ScopeHead:
        """The scope head for edits on `lm`: trained by `fit`, loaded from `scope_path`, or the cosine threshold.

        Raises:
            LMEditError: the trained head belongs to a model with another fingerprint.
        """
        if self._head is not None:
            if self._head_fingerprint != lm.fingerprint:
                raise LMEditError(f"this editor's scope head was trained for the model with fingerprint "
                                  f"{self._head_fingerprint}, not {lm.name!r} ({lm.fingerprint})")
            return self._head
        if self.config.scope_path:
            head, _ = load_head(self.config.scope_path, fingerprint=(lm.fingerprint, lm.weights_hash),
                                encoder=self.config.encoder)
            return head
        return ScopeHead.cosine(self.config.threshold, self.config.scope_input)

    def edit(self, lm: LM, requests: Sequence[EditRequest | EditDescriptor]) -> SeracEdit:
        """Store `requests` as memory entries; returns an unapplied `SeracEdit` (no weights are computed).

        Raises:
            RequestError: no requests, or something that is neither an EditRequest nor an EditDescriptor.
        """
        if not requests:
            raise RequestError("no edit requests given")
        bad = [r for r in requests if not isinstance(r, EditRequest | EditDescriptor)]
        if bad:
            raise RequestError(f"SERAC edits EditRequest or EditDescriptor objects, got {type(bad[0]).__name__}")
        head = self.head(lm)
        statements = [edit_statement(r) for r in requests]
        keys = self.encoder.encode(statements)  # (n_requests, dim)
        entries = [MemoryEntry(s, r, k) for s, r, k in zip(statements, requests, keys)]
        return SeracEdit(entries, head, self.config.template, descriptor_template=self.config.descriptor_template,
                         encoder=self.encoder, base_fingerprint=lm.fingerprint,
                         method="serac", config=to_dict(self.config),
                         info={"n_entries": len(entries), "scope": "trained" if head.projection is not None else "cosine"})

    def fit(self, lm: LM, train: Sequence[EvalRecord], *, held_out: Sequence[EvalRecord] = (),
            out_dir: str | Path | None = None, exclude: Sequence[EvalRecord] = (),
            progress: Callable[[TrainEvent], None] | None = None) -> dict[str, Any]:
        """Train the scope head on records' in-scope/out-of-scope inputs; report pair accuracies.

        The head trains on frozen sentence embeddings in seconds, so there is nothing to resume.

        Args:
            lm: the model the head is for (its fingerprint is saved with the head).
            train: edit records (CounterFact/zsRE train splits): prompt + paraphrases in scope, neighbours out.
            held_out: records to report accuracy on (the cosine baseline is reported beside it).
            out_dir: write the trained head there as `scope.safetensors` (use it with `scope_path`).
            exclude: records whose subjects must not be trained on (the evaluation set).
            progress: called with a `TrainEvent` (step, total, loss) after every step.

        Returns:
            {"train": accuracies, "held_out": accuracies, "held_out_cosine": accuracies, "n_train": ...,
            "steps": ...}; with held-out records also "initial" (cosine) and "final" (trained) held-out
            accuracies; with `out_dir` also "network" (the head's path) and "setting" (`scope_path=...`).
        """
        c = self.config
        banned = {r.subject.strip().lower() for rec in exclude for r in rec.requests if isinstance(r, EditRequest)}
        kept = [rec for rec in train
                if not any(isinstance(r, EditRequest) and r.subject.strip().lower() in banned for r in rec.requests)]
        examples = examples_from_records(kept)

        def step(done: int, total: int, loss: float) -> None:
            if progress is not None:
                progress(TrainEvent(done, total, {"loss": loss}))

        head = train_head(self.encoder, examples, steps=c.train_steps, lr=c.train_lr, batch_edits=c.train_batch_edits,
                          projection_dim=c.projection_dim, view=c.scope_input,
                          include_prefixed=c.train_prefixed_negatives, seed=c.seed, progress=step)
        report: dict[str, Any] = {"n_train": len(examples), "n_excluded": len(train) - len(kept), "steps": c.train_steps,
                                  "train": scope_accuracy(head, self.encoder, examples, seed=c.seed)}
        if held_out:
            test = examples_from_records(held_out)
            report["n_held_out"] = len(test)
            report["held_out"] = scope_accuracy(head, self.encoder, test, seed=c.seed)
            report["held_out_cosine"] = scope_accuracy(ScopeHead.cosine(c.threshold, c.scope_input), self.encoder, test,
                                                       seed=c.seed)
            report["initial"], report["final"] = report["held_out_cosine"], report["held_out"]
        self._head, self._head_fingerprint, self.fit_report = head, lm.fingerprint, report
        if out_dir is not None:
            path = self.save_scope(Path(out_dir) / "scope.safetensors")
            report["network"] = str(path)
            report["setting"] = f"scope_path={path}"
        return report

    def save_scope(self, path: str | Path) -> Path:
        """Write the head trained by `fit` (safetensors + encoder, config, accuracies, base model fingerprint).

        Raises:
            LMEditError: `fit` has not run.
        """
        if self._head is None or self._head_fingerprint is None:
            raise LMEditError("no trained scope head to save: call fit(lm, records) first")
        return save_head(self._head, path, encoder=self.encoder, base_fingerprint=self._head_fingerprint,
                         config=to_dict(self.config), report=self.fit_report or {})
