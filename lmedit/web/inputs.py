"""What the web app accepts from a page: every field checked and bounded here, before the model sees it.

Each function takes the raw values of one form (strings, numbers, lists from Gradio components, or from
any client of the app's HTTP API, which skips the page's own limits) and returns typed values, or raises
an `LMEditError` subclass whose message names the field and what was expected. The library then runs its
own checks (a prompt with one `{}`, the subject inside the prompt, the context window in tokens, settings
in range), whose errors the page shows the same way.

Plain Python: no torch, no Gradio (the unit tests call these directly).

Not handled: limits per client (one model serves everyone; the queue runs one job at a time).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from lmedit.errors import ConfigError, RequestError
from lmedit.types import EditRequest

# Bounds on what one page may ask for: long enough for any fact, short enough to keep a job small.
MAX_PROMPT_CHARS = 200
MAX_SUBJECT_CHARS = 100
MAX_TARGET_CHARS = 60
MAX_PROBE_LINES = 5          # extra paraphrases, extra neighbours
MAX_SETTINGS_CHARS = 4000
MAX_TRACE_SAMPLES = 20
MAX_COMPARE_METHODS = 4
MAX_PATH_CHARS = 300
EXPORT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def text(value: Any, field: str, limit: int, *, required: bool = True) -> str | None:
    """A stripped text field, at most `limit` characters; None when empty and not `required`.

    Raises:
        RequestError: not text, empty while required, or longer than `limit`.
    """
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise RequestError(f"{field}: expected text, got {type(value).__name__}")
    value = value.strip()
    if not value:
        if required:
            raise RequestError(f"{field}: required, got an empty field")
        return None
    if len(value) > limit:
        raise RequestError(f"{field}: at most {limit} characters, got {len(value)}")
    return value


def edit_request(prompt: Any, subject: Any, target_new: Any, target_true: Any) -> EditRequest:
    """The Edit and Compare tabs' request (the library checks the `{}` and the subject).

    Raises:
        RequestError: a field missing or too long, or a request the library refuses.
    """
    return EditRequest(text(prompt, "prompt", MAX_PROMPT_CHARS), text(subject, "subject", MAX_SUBJECT_CHARS),
                       text(target_new, "new target", MAX_TARGET_CHARS),
                       text(target_true, "true target", MAX_TARGET_CHARS, required=False))


def _lines(value: Any, field: str) -> list[str]:
    raw = text(value, field, MAX_PROBE_LINES * (MAX_PROMPT_CHARS + MAX_TARGET_CHARS + 4), required=False) or ""
    lines = [line.strip() for line in raw.splitlines() if line.strip()]
    if len(lines) > MAX_PROBE_LINES:
        raise RequestError(f"{field}: at most {MAX_PROBE_LINES} lines, got {len(lines)}")
    return lines


def paraphrases(value: Any) -> list[str]:
    """Extra paraphrases, one filled prompt per line (each should now give the new target)."""
    out = _lines(value, "paraphrases")
    for i, line in enumerate(out, 1):
        text(line, f"paraphrases, line {i}", MAX_PROMPT_CHARS)
    return out


def neighbors(value: Any) -> list[tuple[str, str]]:
    """Extra neighbours, one `PROMPT = ANSWER` per line (ANSWER must survive the edit), as `--neighbor` takes them.

    Raises:
        RequestError: a line without `=`, or with an empty or too long prompt or answer.
    """
    out = []
    for i, line in enumerate(_lines(value, "neighbours"), 1):
        prompt, sep, answer = line.rpartition("=")
        if not sep or not prompt.strip() or not answer.strip():
            raise RequestError(f"neighbours, line {i}: expected PROMPT = ANSWER, got {line!r}")
        out.append((text(prompt, f"neighbours, line {i}, prompt", MAX_PROMPT_CHARS),
                    text(answer, f"neighbours, line {i}, answer", MAX_TARGET_CHARS)))
    return out  # type: ignore[return-value]


def method(value: Any, known: list[str], field: str = "method") -> str:
    """One registered editor name.

    Raises:
        RequestError: nothing chosen, or a name that is not registered.
    """
    name = text(value, field, 64)
    if name not in known:
        raise RequestError(f"{field}: {name!r} is not a registered editor (known: {', '.join(known)})")
    return name  # type: ignore[return-value]


def methods(values: Any, known: list[str]) -> list[str]:
    """The Compare tab's methods: 1 to `MAX_COMPARE_METHODS` registered editors, each once, in the given order."""
    if not isinstance(values, list | tuple) or not values:
        raise RequestError("methods: choose at least one method to compare")
    chosen = list(dict.fromkeys(method(v, known, "methods") for v in values))
    if len(chosen) > MAX_COMPARE_METHODS:
        raise RequestError(f"methods: at most {MAX_COMPARE_METHODS} at a time (each is an edit and an audit), "
                           f"got {len(chosen)}")
    return chosen


def settings(value: Any) -> dict[str, Any]:
    """The Edit tab's settings box: a YAML mapping of config fields (the library checks names, types, ranges).

    Raises:
        ConfigError: too long, not YAML, or not a mapping of field names to values.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ConfigError("settings: empty; choose the method again to fill in its settings")
    if not isinstance(value, str):
        raise ConfigError(f"settings: expected YAML text, got {type(value).__name__}")
    if len(value) > MAX_SETTINGS_CHARS:
        raise ConfigError(f"settings: at most {MAX_SETTINGS_CHARS} characters, got {len(value)}")
    try:
        data = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"settings: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ConfigError(f"settings: expected one `field: value` per line, got a YAML {type(data).__name__}")
    return data


def settings_text(values: dict[str, Any]) -> str:
    """Settings as the YAML the settings box shows (one `field: value` per line, in the config's order)."""
    return yaml.safe_dump(values, sort_keys=False, default_flow_style=False, allow_unicode=True)


@dataclass(frozen=True)
class TraceQuery:
    """The Trace tab's form, checked."""

    prompt: str
    subject: str
    answer: str | None
    samples: int


def trace_query(prompt: Any, subject: Any, answer: Any, samples: Any) -> TraceQuery:
    """The Trace tab's form: a filled prompt (no `{}`), its subject, an optional answer, noise samples.

    Raises:
        RequestError: a field missing or too long, a subject not in the prompt, samples out of range.
    """
    prompt_text = text(prompt, "prompt", MAX_PROMPT_CHARS)
    subject_text = text(subject, "subject", MAX_SUBJECT_CHARS)
    if "{}" in prompt_text:  # type: ignore[operator]
        raise RequestError("prompt: the Trace tab takes the filled prompt (the subject written out), not a `{}` template")
    if subject_text not in prompt_text:  # type: ignore[operator]
        raise RequestError(f"subject: {subject_text!r} does not occur in the prompt {prompt_text!r}")
    return TraceQuery(prompt_text, subject_text, text(answer, "answer", MAX_TARGET_CHARS, required=False),  # type: ignore[arg-type]
                      count(samples, "noise samples", 1, MAX_TRACE_SAMPLES))


def count(value: Any, field: str, low: int, high: int) -> int:
    """A whole number in [low, high] (Gradio's number boxes send floats).

    Raises:
        RequestError: not a whole number, or out of range.
    """
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise RequestError(f"{field}: expected a whole number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value or int(value) != value:
        raise RequestError(f"{field}: expected a whole number, got {value!r}")
    if not low <= int(value) <= high:
        raise RequestError(f"{field}: expected {low} to {high}, got {int(value)}")
    return int(value)


def edit_id(value: Any, known: list[int]) -> int:
    """An edit id of the open ledger.

    Raises:
        RequestError: not a whole number, or no such edit in the ledger.
    """
    if value is None or value == "":
        raise RequestError("edit id: required (an id from the table above)")
    number = count(value, "edit id", 1, 10**9)
    if number not in known:
        raise RequestError(f"edit id: the ledger has no edit {number} (ids: {', '.join(map(str, known)) or 'none yet'})")
    return number


def export_name(value: Any) -> str:
    """A directory name for an exported model (written under the app's output directory).

    Raises:
        RequestError: empty, or not letters, digits, `.`, `_`, `-` (at most 64, not starting with a dot).
    """
    name = text(value, "export name", 64)
    if not EXPORT_NAME.fullmatch(name):  # type: ignore[arg-type]
        raise RequestError(f"export name: letters, digits, '.', '_' and '-' only (a directory name), got {name!r}")
    return name  # type: ignore[return-value]


def ledger_path(value: Any) -> str:
    """The Ledger tab's path (a directory on the server; created on the first recorded edit)."""
    return text(value, "ledger path", MAX_PATH_CHARS)  # type: ignore[return-value]
