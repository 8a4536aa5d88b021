"""Replaying a ledger onto another model: the recorded *requests* are edited again, not the weight deltas.

A weight delta only means something for the weights it was computed on; a request ("The Eiffel Tower is
located in the city of" -> Rome) means the same thing to any model. For each applied edit, in order,
`replay` runs the same method on the other model with settings chosen for that model:
  1. the settings lmedit ships for that model and method (`lmedit.settings`, by the model's identity), or
     `<config_dir>/<method>/<model name>.yaml` when a `config_dir` is given and holds one;
  2. else the recorded config, with its `layer` field (when the method has one) set to the layer causal
     tracing suggests for the new model (`lmedit.tracing.suggest_layer`, cached per model).
Each new edit goes through the audit gate of the receiving ledger (a new one for the other model, or a
temporary one when only the report is wanted), on top of the edits replayed before it. An edit
"carried over" when it was recorded there and its fact holds; otherwise it "failed" (refused by the
gate, or the editor raised).

Not handled: methods whose layer setting is not a single `layer` field (e.g. a range of layers) keep
their recorded value when no config file exists for the new model.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmedit.editors import get_editor
from lmedit.errors import LMEditError
from lmedit.registry import editors
from lmedit.settings import shipped_settings
from lmedit.types import request_from_dict

if TYPE_CHECKING:
    from lmedit.ledger.audit import AuditReport
    from lmedit.ledger.ledger import Ledger
    from lmedit.models.load import LM

log = logging.getLogger(__name__)


@dataclass
class ReplayItem:
    """The outcome of replaying one recorded edit."""

    source_id: int
    requests: list[dict[str, Any]]
    method: str
    settings: str                         # where the settings came from
    status: str                           # "carried over" or "failed"
    new_id: int | None = None             # id in the receiving ledger (None: not recorded)
    report: AuditReport | None = None
    message: str = ""

    @property
    def carried_over(self) -> bool:
        return self.status == "carried over"


@dataclass
class ReplayResult:
    source: str
    onto: str
    into: str | None                      # the receiving ledger (None: a temporary one, deleted)
    items: list[ReplayItem] = field(default_factory=list)

    @property
    def carried_over(self) -> list[ReplayItem]:
        return [i for i in self.items if i.carried_over]

    @property
    def failed(self) -> list[ReplayItem]:
        return [i for i in self.items if not i.carried_over]


def replay_settings(method: str, onto: LM, recorded: dict[str, Any], config_dir: Path | None = None) -> tuple[Any, str]:
    """The config to edit `onto` with, and a line saying where it came from."""
    if config_dir is not None:
        path = config_dir / method / f"{Path(onto.name).name}.yaml"
        if path.exists():
            return path, str(path)
    else:
        shipped, source = shipped_settings(method, onto)
        if shipped is not None:
            return shipped, source
    names = {f.name for f in dataclasses.fields(editors.get(method).config_class)}
    settings = {k: v for k, v in recorded.items() if k in names}
    if "layer" in names:
        from lmedit.tracing import suggest_layer

        settings["layer"] = suggest_layer(onto).layer
        return settings, f"recorded config, layer {settings['layer']} from suggest_layer"
    return settings, "recorded config"


def replay(ledger: Ledger, onto: LM, *, into: str | Path | Ledger | None = None, config_dir: str | Path | None = None,
           force: bool = False) -> ReplayResult:
    """Re-run `ledger`'s applied requests on `onto` and audit each (see the module docstring).

    Args:
        ledger: the source ledger.
        onto: the other model, unedited; it ends as base + the carried-over edits when `into` is given,
            unedited otherwise.
        into: the ledger that receives the new edits (a path or `Ledger`); None: a temporary one.
        config_dir: where `<method>/<model name>.yaml` files are looked up (default: the shipped settings).
        force: record edits the audit gate refuses.

    Returns:
        `ReplayResult` with one `ReplayItem` per applied edit of `ledger`.
    """
    from lmedit.ledger.ledger import Ledger

    config_dir = Path(config_dir) if config_dir is not None else None
    scratch = None
    if into is None:
        scratch = tempfile.TemporaryDirectory(prefix="lmedit-replay-")
        target = Ledger(scratch.name, audit_config=ledger.audit_config)
    elif isinstance(into, Ledger):
        target = into
    else:
        target = Ledger(into, audit_config=ledger.audit_config)
    if target.path == ledger.path:
        raise LMEditError("replay needs a different receiving ledger than its source")
    result = ReplayResult(source=str(ledger.path), onto=onto.name, into=None if scratch else str(target.path))
    try:
        settings_cache: dict[str, tuple[Any, str]] = {}
        for row in ledger.entries("applied"):
            requests = [request_from_dict(r) for r in row.requests]
            item = ReplayItem(row.id, row.requests, row.method, "", "failed")
            result.items.append(item)
            try:
                if row.method not in settings_cache:
                    settings_cache[row.method] = replay_settings(row.method, onto, row.config, config_dir)
                settings, item.settings = settings_cache[row.method]
                target.apply(onto)
                made = get_editor(row.method, settings).edit(onto, requests)
                commit = target.record(onto, made, force=force, source=f"replay:{ledger.path}#{row.id}")
            except Exception as exc:  # noqa: BLE001  (one edit that cannot be replayed must not stop the others)
                item.message = f"{type(exc).__name__}: {exc}"
                log.warning("replaying edit %d failed: %s", row.id, item.message, exc_info=log.isEnabledFor(logging.DEBUG))
                continue
            item.report, item.new_id = commit.report, commit.edit_id
            if commit.recorded and commit.report.holds:
                item.status = "carried over"
            else:
                item.message = ("refused by the audit gate: " if not commit.recorded else "does not hold: ") + \
                    ", ".join(commit.report.failing("refuse") or commit.report.failing("warn"))
    finally:
        if scratch is not None:
            target.detach(onto)  # back to the unedited model: the temporary ledger goes away
            target.close()
            scratch.cleanup()
    return result
