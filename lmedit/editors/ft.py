"""FT, the fine-tuning baseline: Adam steps on target_new's NLL for one or more layers' weights, unconstrained.

A baseline of ROME (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", arXiv:2202.05262,
§4) and of Zhu et al. 2020 ("Modifying Memories in Transformer Models", arXiv:2012.00363). By default one
layer's MLP down-projection (`mlp_out`) is trained; `layers` and `module` (mlp_out | mlp_in | attn_out)
choose others. The loop is `editors/steps/finetune.py`, shared with FT-L (`editors/ft_l.py`), which bounds the
change in L∞ norm. The result is a `WeightEdit` with dense deltas; `info` holds the loss curve.

Not handled: a locality (KL) term, mini-batches, biases/norms; see `steps.finetune.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmedit.editors.steps.finetune import FinetuneConfig, finetune_edit
from lmedit.editors.base import Editor, WeightEdit, check_requests
from lmedit.registry import editors
from lmedit.stats import StatsCache
from lmedit.types import EditRequest

if TYPE_CHECKING:
    from lmedit.models.load import LM


@dataclass(frozen=True, kw_only=True)
class FtConfig(FinetuneConfig):
    """Unconstrained fine-tuning. Fields and defaults (ROME's GPT-2 XL FT baseline) in `FinetuneConfig`."""


@editors.register("ft")
class FtEditor(Editor[FtConfig]):
    """Fine-tuning baseline (arXiv:2202.05262 §4): trains the configured weights on target_new, no constraint."""

    config_class = FtConfig

    def __init__(self, config: FtConfig | None = None, *, cache: StatsCache | None = None) -> None:
        super().__init__(config)
        self.cache = cache if cache is not None else StatsCache()  # sampled prefixes, when they are on

    def edit(self, lm: LM, requests: Sequence[EditRequest]) -> WeightEdit:
        """Fine-tune on all `requests` together; return the unapplied change (the weights stay as they were)."""
        return finetune_edit(lm, check_requests(requests), self.config, "ft", cache=self.cache,
                             progress=self.progress)
