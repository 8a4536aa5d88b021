"""The no-op editor: returns an empty `WeightEdit`, so the model is unchanged. The baseline of evaluations.

Its rows in an evaluation equal the unedited model's, which checks the harness itself (edited minus
unedited must be exactly zero) and gives the "no edit" line that every method is compared against.

Not handled: anything else; it edits nothing by design.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lmedit.editors.base import Editor, EditorConfig, WeightEdit, check_requests
from lmedit.registry import editors
from lmedit.types import EditRequest

if TYPE_CHECKING:
    from lmedit.models.load import LM


@editors.register("noop")
class NoopEditor(Editor[EditorConfig]):
    """Makes no change: `edit()` returns a `WeightEdit` with no deltas."""

    config_class = EditorConfig

    def edit(self, lm: LM, requests: Sequence[EditRequest]) -> WeightEdit:
        return WeightEdit(deltas={}, requests=check_requests(requests), method="noop",
                          config={"seed": self.config.seed}, base_fingerprint=lm.fingerprint)
