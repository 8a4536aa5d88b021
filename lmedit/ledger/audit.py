"""The audit gate: hazard checks run on an edit before the ledger commits it, and again after reverts.

Each check is one of the evaluation harness's metrics (`lmedit.eval.metrics`), computed by the harness's
own measurement (`lmedit.eval.measure.measure`) on the probes `lmedit.ledger.probes` builds from the
request, in two model states: the *reference* (the ledger's state before the edit when committing; the
base model when re-auditing) and the *edited* state. Generations start from the edit prompt, its
paraphrases and a few fixed prompts. Three checks are not harness metrics: the drop of generation
entropy (the harness's `fluency`, reference minus edited), the rise of the harness's `derailment`
(probability on never-text tokens while generating), and the change of the mean
per-token loss on a fixed English paragraph (`lmedit.eval.health.probe_loss`, the health check's and the
destructive-edit check's too), which catches "disabling" edits (R-ROME, Gupta et al. 2024,
arXiv:2403.07175) that damage everything a little.

Each check has a `warn` and a `refuse` threshold in `AuditConfig` (None: never). The verdict is the
worst level over the checks: keep, warn or refuse. An edit "holds" while its efficacy check is not at
the refuse level.

`audit_edit` runs the same checks on an edit outside any ledger (the web app's Edit tab), `audit_edits`
on alternative edits of one request with the reference measured once (its Compare tab), and
`audit_record` builds the probes of one request.

Not handled: statistical intervals (an audit looks at one edit's handful of probes, not a dataset).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from statistics import fmean
from typing import TYPE_CHECKING, Any

from lmedit.config import check_ranges
from lmedit.errors import ConfigError
from lmedit.eval.health import probe_loss
from lmedit.eval.measure import Measurement, measure, probe_groups
from lmedit.eval.metrics import MetricInputs, compute_metrics
from lmedit.eval.records import EvalRecord
from lmedit.ledger.probes import build_record, derive_foil
from lmedit.types import EditRequest

if TYPE_CHECKING:
    from lmedit.models.load import LM

LEVELS = ("keep", "warn", "refuse")


@dataclass(frozen=True, kw_only=True)
class AuditConfig:
    """Thresholds of the audit gate (None: the check never reaches that level) and what to measure.

    Scores (fractions of probes, higher is better) warn/refuse *below* their thresholds; drifts (KL in
    nats, entropy drop in bits, loss increase in nats per token) warn/refuse *above* them.

    The probe-loss thresholds are set on `lmedit.eval.health.probe_loss` (2.86 nats/token on gemma3-270m
    unedited), between what shipped settings and destructive settings do to it there (2026-12-01, CPU, with
    `OMP_NUM_THREADS=1 python benchmarks/measure_edit_size.py --model gemma3-270m --facts 5`, and
    `--facts 3` with `--methods ft --set lr=0.01`, `--set lr=1.0`, `--methods rome --set clamp_norm_factor=1e30
    --set v_lr=50`): the shipped settings of FT, FT-L, ROME, MEMIT and AlphaEdit raise it by at most 0.015
    on the first five starter facts, KN by at most 0.20 (0.06 on the Eiffel Tower, 0.20 on Brazil); the
    destructive settings raise it by 2.75 to 14.2. `probe_loss_warn` = 0.25 sits above every shipped edit,
    and `probe_loss_refuse` = 0.5, the destructive-edit limit of `lmedit.editors.safety`, 5.5× below the
    mildest destructive edit.
    """

    efficacy_warn: float | None = 1.0
    efficacy_refuse: float | None = 0.5
    paraphrase_warn: float | None = 0.5
    paraphrase_refuse: float | None = None
    neighborhood_warn: float | None = 0.8
    neighborhood_refuse: float | None = 0.5
    specificity_plus_warn: float | None = 0.8
    specificity_plus_refuse: float | None = None
    implication_warn: float | None = 0.5
    implication_refuse: float | None = None
    essence_drift_warn: float | None = 1.0
    essence_drift_refuse: float | None = 5.0
    neighborhood_kl_warn: float | None = 0.2
    neighborhood_kl_refuse: float | None = 2.0
    fluency_drop_warn: float | None = 1.0
    fluency_drop_refuse: float | None = None
    # Rise of the never-text probability at a generated step (lmedit.eval.metrics.derailment). The README's
    # Eiffel Tower → Rome edit raises it on the edit prompt and its paraphrase from 0.13 to 0.42 (greedy
    # generation then emits <start_of_image> forever); docs/editors.md, "Derailed generations".
    derailment_rise_warn: float | None = 0.1
    derailment_rise_refuse: float | None = None
    probe_loss_warn: float | None = 0.25   # see the docstring: above every shipped-settings edit (at most 0.20)
    probe_loss_refuse: float | None = 0.5  # as lmedit.editors.safety; destructive settings: 2.75 and more
    generation_tokens: int = 16      # tokens generated per generation prompt (fluency); 0 skips fluency
    generic_neighbors: bool = True   # add lmedit.ledger.probes.GENERIC_NEIGHBORS to every edit's neighbours
    context_paraphrases: bool = True  # add the edit prompt behind fixed context prefixes as paraphrases
    score_batch_size: int = 32
    records_per_pass: int = 8        # records measured per model-state switch (bounds the memory for KL)

    def __post_init__(self) -> None:
        # Every threshold finite or None (check_ranges' finiteness check), and the counts in range.
        check_ranges(self, at_least_one=("score_batch_size", "records_per_pass"), nonnegative=("generation_tokens",))
        for check in CHECKS:
            warn, refuse = self.thresholds(check.name)
            if warn is None or refuse is None:
                continue
            if check.higher_is_better and refuse > warn:
                raise ConfigError(f"AuditConfig.{check.name}_refuse ({refuse}) must be <= {check.name}_warn ({warn}): "
                                  "a score refuses below its refuse threshold and warns below its warn threshold")
            if not check.higher_is_better and refuse < warn:
                raise ConfigError(f"AuditConfig.{check.name}_refuse ({refuse}) must be >= {check.name}_warn ({warn})")

    def thresholds(self, check: str) -> tuple[float | None, float | None]:
        return getattr(self, f"{check}_warn"), getattr(self, f"{check}_refuse")


@dataclass(frozen=True)
class Check:
    name: str
    metric: str | None      # the harness metric it reads (None: computed here)
    higher_is_better: bool
    label: str


CHECKS: tuple[Check, ...] = (
    Check("efficacy", "efficacy_score", True, "efficacy: P(new) > P(old) on the edit prompt"),
    Check("paraphrase", "paraphrase_score", True, "paraphrase: P(new) > P(old) on paraphrases"),
    Check("neighborhood", "neighborhood_score", True, "neighbourhood: other facts keep their answer"),
    Check("specificity_plus", "specificity_plus_score", True, "Specificity+: ... after the edit is stated"),
    Check("implication", "implication_accuracy", True, "implications of the new fact hold"),
    Check("essence_drift", "essence_drift", False, "essence drift: KL on '{subject} is a' (nats)"),
    Check("neighborhood_kl", "neighborhood_kl", False, "neighbourhood KL (nats)"),
    Check("fluency_drop", None, False, "fluency drop: generation entropy lost (bits)"),
    Check("derailment_rise", None, False, "derailment: rise of the never-text token probability in generations"),
    Check("probe_loss", None, False, "probe-text loss increase (nats/token)"),
)


@dataclass(frozen=True)
class CheckResult:
    name: str
    value: float | None       # in the edited state
    reference: float | None   # the same quantity in the reference state (None for drifts: 0 by definition)
    level: str | None         # keep / warn / refuse; None when not measured (no probe of that kind)
    warn: float | None
    refuse: float | None


@dataclass
class AuditReport:
    """The audit of one edit: per-check results, the verdict, the harness metrics and per-probe margins.

    `probes` lists, per probe, log P(target) − log P(foil) in the reference and edited states (target is
    what should win: target_new on rewrite/paraphrase, the neighbour's own answer on neighbourhoods).
    """

    verdict: str
    checks: dict[str, CheckResult]
    metrics: dict[str, dict[str, float | None]]   # {"reference": {...}, "edited": {...}}, means over requests
    probes: list[dict[str, Any]]
    reference: str                                # "previous state" or "base model"
    model: str = ""
    fingerprint: str = ""
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def holds(self) -> bool:
        """The edited fact is there: the efficacy check is not at the refuse level."""
        return self.checks["efficacy"].level != "refuse"

    def failing(self, level: str = "warn") -> list[str]:
        """Checks at `level` or worse."""
        rank = LEVELS.index(level)
        return [c.name for c in self.checks.values() if c.level is not None and LEVELS.index(c.level) >= rank]

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "holds": self.holds, "checks": {k: asdict(v) for k, v in self.checks.items()},
                "metrics": self.metrics, "probes": self.probes, "reference": self.reference, "model": self.model,
                "fingerprint": self.fingerprint, "created": self.created}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditReport:
        return cls(verdict=data["verdict"], checks={k: CheckResult(**v) for k, v in data["checks"].items()},
                   metrics=data["metrics"], probes=data["probes"], reference=data["reference"],
                   model=data.get("model", ""), fingerprint=data.get("fingerprint", ""), created=data["created"])


def unaudited_report(lm: LM, config: AuditConfig) -> AuditReport:
    """The report of an edit with nothing to probe (only free-text edit descriptors): every check n/a."""
    checks = {c.name: CheckResult(c.name, None, None, None, *config.thresholds(c.name)) for c in CHECKS}
    return AuditReport(verdict="unaudited", checks=checks, metrics={"reference": {}, "edited": {}}, probes=[],
                       reference="not audited", model=lm.name, fingerprint=lm.fingerprint)


def level_of(value: float | None, warn: float | None, refuse: float | None, higher_is_better: bool) -> str | None:
    """keep / warn / refuse for one value (None when the value was not measured)."""
    if value is None:
        return None

    def crosses(threshold: float | None) -> bool:
        return threshold is not None and (value < threshold if higher_is_better else value > threshold)

    return "refuse" if crosses(refuse) else "warn" if crosses(warn) else "keep"


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return fmean(kept) if kept else None


def _margins(record: EvalRecord, pre: Measurement, post: Measurement) -> list[dict[str, Any]]:
    out = []
    for group, probes in probe_groups(record).items():
        a, b = pre.scores[group], post.scores[group]
        for i, probe in enumerate(probes):
            if probe.foil is None:
                continue
            before = a.target_logprob[i] - a.foil_logprob[i]  # type: ignore[operator]
            after = b.target_logprob[i] - b.foil_logprob[i]  # type: ignore[operator]
            out.append({"group": group, "prompt": probe.prompt, "target": probe.target, "foil": probe.foil,
                        "kind": probe.kind, "before": before, "after": after})
    return out


@dataclass
class _Measured:
    """One record's harness metrics in both states, and its per-probe margins (the big distributions dropped)."""

    reference: dict[str, float | None]
    edited: dict[str, float | None]
    margins: list[dict[str, Any]]


def _report(rows: Sequence[_Measured], losses: tuple[float, float], config: AuditConfig, reference: str,
            lm: LM) -> AuditReport:
    metrics = {state: {name: _mean([getattr(row, state)[name] for row in rows]) for name in rows[0].edited}
               for state in ("reference", "edited")}
    fluency_ref, fluency_edited = metrics["reference"]["fluency"], metrics["edited"]["fluency"]
    derived: dict[str, tuple[float | None, float | None]] = {
        "fluency_drop": (None, None if fluency_ref is None or fluency_edited is None else fluency_ref - fluency_edited),
        "probe_loss": (None, losses[1] - losses[0]),
        "derailment_rise": (metrics["reference"]["derailment"], None if metrics["reference"]["derailment"] is None
                            or metrics["edited"]["derailment"] is None
                            else metrics["edited"]["derailment"] - metrics["reference"]["derailment"]),
    }
    checks = {}
    for check in CHECKS:
        if check.metric is None:
            ref, value = derived[check.name]
        else:
            ref, value = metrics["reference"][check.metric], metrics["edited"][check.metric]
            if not check.higher_is_better:
                ref = None  # a KL of the reference state with itself: 0 by definition
        warn, refuse = config.thresholds(check.name)
        checks[check.name] = CheckResult(check.name, value, ref, level_of(value, warn, refuse, check.higher_is_better),
                                         warn, refuse)
    levels = [c.level for c in checks.values() if c.level is not None]
    verdict = max(levels, key=LEVELS.index) if levels else "keep"
    return AuditReport(verdict=verdict, checks=checks, metrics=metrics,
                       probes=[m for row in rows for m in row.margins], reference=reference, model=lm.name,
                       fingerprint=lm.fingerprint)


def run_audit(lm: LM, records: dict[Any, Sequence[EvalRecord]], *, to_reference: Callable[[], None],
              to_edited: Callable[[], None], config: AuditConfig, reference: str) -> dict[Any, AuditReport]:
    """Audit several edits: measure their records in the reference state and in the edited state.

    Args:
        lm: the model; `to_reference()` / `to_edited()` put it in each state (they are called in turn,
            once per pass of `config.records_per_pass` records; the model is left in the edited state).
        records: edit key -> its audit records (one per request, at least one).
        config: thresholds and measurement settings.
        reference: a label for the reference state ("previous state", "base model").

    Returns:
        edit key -> `AuditReport`.
    """
    flat = [record for recs in records.values() for record in recs]
    measured: list[_Measured] = []
    losses = (0.0, 0.0)
    step = config.records_per_pass
    for start in range(0, len(flat), step):
        part = flat[start:start + step]
        to_reference()
        ref_loss = probe_loss(lm)
        pres = measure(lm, part, generation_tokens=config.generation_tokens, batch_size=config.score_batch_size)
        to_edited()
        losses = (ref_loss, probe_loss(lm))
        posts = measure(lm, part, generation_tokens=config.generation_tokens, batch_size=config.score_batch_size)
        for record, a, b in zip(part, pres, posts):
            # KL metrics need both states' next-token distributions: compute now, then let them go.
            measured.append(_Measured(compute_metrics(MetricInputs(record, a, a)),
                                      compute_metrics(MetricInputs(record, a, b)), _margins(record, a, b)))
    out = {}
    k = 0
    for key, recs in records.items():
        out[key] = _report(measured[k:k + len(recs)], losses, config, reference, lm)
        k += len(recs)
    return out


def audit_record(lm: LM, request: EditRequest, *, paraphrases: Sequence[str] = (),
                 neighbors: Sequence[tuple[str, str]] = (), config: AuditConfig | None = None) -> EvalRecord:
    """The probes the audit gate measures for `request`, built from the request (`lmedit.ledger.probes`).

    Call it on the model as it is *before* the edit: without a `target_true`, the model's own answer to
    the edit prompt becomes the foil. `config` says whether the generic neighbours and context paraphrases
    are added (default `AuditConfig()`).
    """
    config = config or AuditConfig()
    foil = None if request.target_true else derive_foil(lm, request)
    return build_record(request, foil=foil, paraphrases=paraphrases, neighbors=neighbors,
                        generic_neighbors=config.generic_neighbors, context_paraphrases=config.context_paraphrases)


def edit_states(edit: Any, lm: LM) -> tuple[Callable[[], None], Callable[[], None]]:
    """(take `edit` off `lm` if it is on, put it on if it is off): the two states an audit of `edit` compares."""

    def without() -> None:
        if edit.is_applied:
            edit.undo()

    def with_edit() -> None:
        if not edit.is_applied:
            edit.apply(lm)

    return without, with_edit


def audit_edit(lm: LM, edit: Any, *, paraphrases: Sequence[str] = (), neighbors: Sequence[tuple[str, str]] = (),
               config: AuditConfig | None = None, records: Sequence[EvalRecord] | None = None) -> AuditReport:
    """Audit an edit against the model without it, and record nothing: the ledger's gate on its own.

    The reference state is `lm` without `edit` (whatever else is applied stays), the edited state `lm`
    with it; `edit` is left applied or not as it was found.

        edit = lmedit.edit(lm, request)                       # applied
        report = lmedit.ledger.audit_edit(lm, edit)           # report.verdict: keep / warn / refuse

    Args:
        lm: the model `edit` was made on.
        edit: an `Edit` (applied or not); its triplet requests are probed (descriptors give an
            "unaudited" report).
        paraphrases, neighbors: extra probes, as for `Ledger.record`.
        config: thresholds and what to measure (default `AuditConfig()`).
        records: the probes to use (from `audit_record`), instead of building them here.
    """
    config = config or AuditConfig()
    was_applied = edit.is_applied
    if was_applied:
        edit.undo()  # probes (their foils) are built on the model as it was before the edit
    try:
        if records is None:
            records = [audit_record(lm, r, paraphrases=paraphrases, neighbors=neighbors, config=config)
                       for r in edit.requests if isinstance(r, EditRequest)]
        if not records:
            report = unaudited_report(lm, config)
        else:
            without, with_edit = edit_states(edit, lm)
            report = run_audit(lm, {0: list(records)}, to_reference=without, to_edited=with_edit, config=config,
                               reference="model without the edit")[0]
    finally:
        if was_applied and not edit.is_applied:
            edit.apply(lm)
        elif not was_applied and edit.is_applied:
            edit.undo()
    return report


def audit_edits(lm: LM, edits: Sequence[Any], records: Sequence[EvalRecord], *,
                config: AuditConfig | None = None) -> list[AuditReport]:
    """Audit alternative edits of the same request(s) (one per method, say) against the model as it is,
    measuring that reference state once instead of once per edit.

    Args:
        lm: the model the (unapplied) edits were made on; it is left as it was.
        edits: unapplied `Edit`s; each is applied, measured and undone in turn.
        records: the probes (`audit_record` of the shared request(s), built on `lm` as it is).
        config: thresholds and what to measure (default `AuditConfig()`).

    Returns:
        One `AuditReport` per edit, in order (reference: "model without the edit").
    """
    config = config or AuditConfig()
    if any(edit.is_applied for edit in edits):
        raise ValueError("audit_edits takes unapplied edits (each is applied in turn)")
    records = list(records)
    ref_loss = probe_loss(lm)
    pres = measure(lm, records, generation_tokens=config.generation_tokens, batch_size=config.score_batch_size)
    reports = []
    for edit in edits:
        edit.apply(lm)
        try:
            loss = probe_loss(lm)
            posts = measure(lm, records, generation_tokens=config.generation_tokens, batch_size=config.score_batch_size)
        finally:
            edit.undo()
        rows = [_Measured(compute_metrics(MetricInputs(r, a, a)), compute_metrics(MetricInputs(r, a, b)),
                          _margins(r, a, b)) for r, a, b in zip(records, pres, posts)]
        reports.append(_report(rows, (ref_loss, loss), config, "model without the edit", lm))
    return reports
