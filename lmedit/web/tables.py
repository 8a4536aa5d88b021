"""What the web app's pages show, built from library results as plain rows and short HTML: before/after
probe tables, audit checks, the Compare table, the Ledger table, status lines, the trace summary.

Plain Python (no torch, no Gradio): objects are read by attribute (`AuditReport`, `EditRow`, `Probe`,
`TraceResult`), so the unit tests pass small stand-ins. Tables are `{"headers": [...], "data": [[...]]}`,
the form Gradio's Dataframe takes; numbers are formatted here so the page and the tests see the same text.

Not handled: localisation (English labels, `.` decimal point).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lmedit.types import describe_stored

# ---- status lines -------------------------------------------------------------------------------------

# "refuse" looks like an error but is a verdict, not a failed request: no `error:` prefix.
STATUS_CLASSES = {"ok": "lmedit-ok", "error": "lmedit-error", "refuse": "lmedit-error", "note": "lmedit-note"}


def one_line(message: str) -> str:
    """A message on one line (lines joined with '; '), as the CLI's `error:` line shows it."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def status(kind: str, message: str) -> str:
    """A status line as HTML: kind "ok", "error" (prefixed `error:`), "refuse" or "note"; the text is escaped."""
    prefix = "error: " if kind == "error" else ""
    return f'<div class="lmedit-status {STATUS_CLASSES[kind]}">{html.escape(prefix + one_line(message))}</div>'


def error_status(exc: BaseException) -> str:
    """The page's line for a failed request: the library's own message for an `LMEditError`, one line for a bug."""
    from lmedit.errors import LMEditError

    if isinstance(exc, LMEditError):
        return status("error", str(exc))
    return status("error", f"internal error ({type(exc).__name__}: {exc}); the server's log has the details")


# ---- numbers ------------------------------------------------------------------------------------------


def prob(value: float | None) -> str:
    """A probability: 4 decimals, scientific below 0.0001 (a moved fact often has P ~ 1e-6), '—' when absent."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.4f}" if value >= 1e-4 or value == 0 else f"{value:.1e}"


def number(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> dict[str, Any]:
    return {"headers": list(headers), "data": [list(r) for r in rows] or [["" for _ in headers]]}


# ---- edit: before / after -----------------------------------------------------------------------------

PROBE_GROUPS = {"rewrite": "edit prompt", "paraphrase": "paraphrase", "neighborhood": "neighbour",
                "neighborhood_plus": "loud fact (Specificity+)"}
SHOWN_PER_GROUP = 2  # paraphrases and neighbours shown side by side (the audit measures them all)


@dataclass(frozen=True)
class ProbeLine:
    """One probe of the before/after table: what should win over what, and what the model said each time."""

    group: str                  # a key of PROBE_GROUPS
    prompt: str
    target: str                 # the answer that should win (target_new; a neighbour's own answer)
    foil: str | None            # what it is compared with
    before: tuple[float | None, float | None] = (None, None)   # P(target), P(foil) before the edit
    after: tuple[float | None, float | None] = (None, None)    # ... after it
    generation_before: str = ""
    generation_after: str = ""


def shown_probes(record: Any, paraphrases: Sequence[str] = (), neighbors: Sequence[tuple[str, str]] = ()) -> list[ProbeLine]:
    """The probes the Edit tab shows from an audit record: the edit prompt, a few paraphrases and neighbours
    (the user's own first), and one loud-fact probe (a shown neighbour after the edit is stated)."""
    own_para = set(paraphrases)
    own_neigh = {p for p, _ in neighbors}

    def first(probes: Sequence[Any], own: set[str]) -> list[Any]:
        ordered = [p for p in probes if p.prompt in own] + [p for p in probes if p.prompt not in own]
        return ordered[:max(SHOWN_PER_GROUP, len(own))]

    lines = [ProbeLine("rewrite", p.prompt, p.target, p.foil) for p in record.rewrite[:1]]
    lines += [ProbeLine("paraphrase", p.prompt, p.target, p.foil) for p in first(record.paraphrases, own_para)]
    neighbours = first(record.neighborhood, own_neigh)
    lines += [ProbeLine("neighborhood", p.prompt, p.target, p.foil) for p in neighbours]
    loud = [p for p in record.neighborhood_plus if neighbours and p.prompt.endswith(neighbours[0].prompt)]
    lines += [ProbeLine("neighborhood_plus", p.prompt, p.target, p.foil) for p in loud[:1]]
    return lines


BEFORE_AFTER_HEADERS = ("probe", "prompt", "answer", "P before", "P after", "generation before", "generation after")


def before_after(lines: Sequence[ProbeLine]) -> dict[str, Any]:
    """The side-by-side table: per probe a row for the answer that should win, then one for its foil."""
    rows = []
    for line in lines:
        rows.append([PROBE_GROUPS[line.group], line.prompt, f"{line.target} (should win)", prob(line.before[0]),
                     prob(line.after[0]), line.generation_before.strip(), line.generation_after.strip()])
        if line.foil is not None:
            rows.append(["", "", line.foil, prob(line.before[1]), prob(line.after[1]), "", ""])
    return table(BEFORE_AFTER_HEADERS, rows)


def moved(lines: Sequence[ProbeLine]) -> str:
    """One sentence on the edit prompt: P(new) before → after."""
    line = next((x for x in lines if x.group == "rewrite"), None)
    if line is None:
        return ""
    return f"P({line.target}) on the edit prompt: {prob(line.before[0])} → {prob(line.after[0])}"


# ---- audit --------------------------------------------------------------------------------------------

AUDIT_HEADERS = ("check", "edited", "reference", "warn", "refuse", "level")


def audit_checks(report: Any) -> dict[str, Any]:
    """The audit's checks as the CLI's `lmedit audit` prints them."""
    rows = [[c.name, number(c.value), number(c.reference), number(c.warn), number(c.refuse), c.level or "n/a"]
            for c in report.checks.values()]
    return table(AUDIT_HEADERS, rows)


def verdict(report: Any, recorded: int | None = None, refused_note: bool = False) -> str:
    """The audit's verdict as a status line (and whether the edit was recorded)."""
    failing = report.failing()
    text = f"audit: {report.verdict}" + (f" ({', '.join(failing)})" if failing else "")
    text += f", against the {report.reference}"
    if recorded is not None:
        text += f"; recorded as edit {recorded} in the ledger"
    elif refused_note:
        text += "; refused by the audit gate: not recorded, the model is unchanged"
    return status({"keep": "ok", "refuse": "refuse"}.get(report.verdict, "note"), text)


# ---- compare ------------------------------------------------------------------------------------------

COMPARE_METRICS = (("efficacy_score", "efficacy"), ("paraphrase_score", "paraphrase"),
                   ("neighborhood_score", "neighbourhood"), ("specificity_plus_score", "Specificity+"),
                   ("fluency", "fluency"))
COMPARE_HEADERS = ("method", *(label for _, label in COMPARE_METRICS), "edit time (s)", "audit", "settings / note")


@dataclass(frozen=True)
class CompareResult:
    """One method's row of the Compare tab (metrics None when the method failed: `note` says why)."""

    method: str
    metrics: dict[str, float | None] | None
    seconds: float | None
    verdict: str | None
    note: str


def compare_table(results: Sequence[CompareResult], reference: dict[str, float | None] | None) -> dict[str, Any]:
    """One row per method, after a row for the model before any of the edits (`reference`)."""
    rows = []
    if reference is not None:
        rows.append(["(before the edit)", *(number(reference.get(key)) for key, _ in COMPARE_METRICS), "", "", ""])
    for r in results:
        values = [number((r.metrics or {}).get(key)) for key, _ in COMPARE_METRICS]
        rows.append([r.method, *values, number(r.seconds, 2), r.verdict or "—", r.note])
    return table(COMPARE_HEADERS, rows)


# ---- ledger -------------------------------------------------------------------------------------------

LEDGER_HEADERS = ("id", "state", "verdict", "method", "kind", "request", "created")


def request_text(requests: Sequence[dict[str, Any]]) -> str:
    """A ledger row's requests, one `subject prompt → new (was old)` each (braces in stored prompts kept)."""
    return "; ".join(describe_stored(r) for r in requests)


def ledger_table(rows: Sequence[Any]) -> dict[str, Any]:
    return table(LEDGER_HEADERS, [[r.id, r.state, r.verdict or "n/a", r.method, r.kind, request_text(r.requests),
                                   r.created] for r in rows])


REAUDIT_HEADERS = ("id", "verdict", "holds", "efficacy", "paraphrase", "neighbourhood", "warn/refuse checks")


def reaudit_table(reports: dict[int, Any]) -> dict[str, Any]:
    """The re-audits after a revert: do the remaining edits still hold?"""
    rows = []
    for edit_id, report in reports.items():
        c = report.checks
        rows.append([edit_id, report.verdict, "yes" if report.holds else "no", number(c["efficacy"].value),
                     number(c["paraphrase"].value), number(c["neighborhood"].value), ", ".join(report.failing()) or "-"])
    return table(REAUDIT_HEADERS, rows)


# ---- trace --------------------------------------------------------------------------------------------


def peak_layer(result: Any) -> int | None:
    """The layer to mark on a trace: the MLP effect's peak at the last subject token (this prompt's own
    evidence for where the fact lives; `lmedit.suggest_layer` averages the same over many facts)."""
    row = result.scores[result.subject_range[1]]
    finite = [(v, i) for i, v in enumerate(row) if v is not None and not math.isnan(v)]
    return max(finite)[1] if finite else None


def trace_summary(results: dict[str, Any], layer: int | None, seconds: float) -> str:
    first = next(iter(results.values()))
    answer = first.answer_token.strip() or first.answer
    parts = [f"answer {answer!r}: clean p={first.clean_prob:.3f}, corrupted p={first.corrupted_prob:.3f}"]
    if first.answer_n_tokens > 1:
        parts.append(f"the answer has {first.answer_n_tokens} tokens, its first was traced")
    if layer is not None:
        parts.append(f"suggested layer {layer} (MLP peak at the last subject token {first.tokens[first.subject_range[1]]!r})")
    parts.append(f"{first.samples} noise samples, {seconds:.1f} s")
    return status("ok", "; ".join(parts))
