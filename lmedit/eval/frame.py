"""Per-record evaluation rows as a flat table: `EvalResult.to_pandas()` (pandas is an optional dependency).

    df = lmedit.evaluate(lm, "starter", method, limit=10).to_pandas()   # method: `lmedit ls editors`
    df[["case_id", "unedited.efficacy_score", "edited.efficacy_score", "edit_info.requests.update_norm"]]

Flattening rules (one row per entry of `EvalResult.rows`, one column per scalar):
  * scalars (numbers, strings, booleans, None) are kept as they are;
  * nested dicts become dotted columns: `edited.efficacy_score`, `edit_info.layer`;
  * a one-element list of dicts (the per-request diagnostics of a one-request edit) is flattened like its
    element, without an index: `edit_info.requests.v_nll`, `edit_info.requests.update_norm`;
  * everything else is left out of the table: vectors (ROME's `v_star`, loss curves, layer lists,
    tensors, arrays), generated texts (`generations`), and diagnostics of several requests at once (batch
    mode). Their sizes are already among the scalars (`delta_norm`, `v_norm`, `update_norm`), and the full
    rows stay in `EvalResult.rows` and records.jsonl;
  * sequential runs' `checkpoint_done` bookkeeping rows are skipped; their `kind` column ("edited",
    "drift", "health") tells the remaining rows apart.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from lmedit.errors import MissingDependencyError

if TYPE_CHECKING:
    import pandas as pd

SEPARATOR = "."


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | bool | numbers.Number)


def flatten_row(row: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The scalar fields of one result row, nested keys joined with "." (see the module docstring)."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_row(value, name + SEPARATOR))
        elif isinstance(value, list | tuple) and len(value) == 1 and isinstance(value[0], Mapping):
            out.update(flatten_row(value[0], name + SEPARATOR))
        elif _scalar(value):
            out[name] = value
    return out


def rows_to_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """A DataFrame with one row per result row (checkpoint markers skipped) and one column per scalar field.

    Raises:
        MissingDependencyError: pandas is not installed.
    """
    try:
        import pandas as pd
    except ImportError:
        raise MissingDependencyError("EvalResult.to_pandas() needs pandas: pip install pandas "
                                     "(or pip install 'lmedit[pandas]')") from None
    flat = [flatten_row(r) for r in rows if r.get("kind") != "checkpoint_done"]
    return pd.DataFrame.from_records(flat)
