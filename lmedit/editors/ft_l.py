"""FT-L, fine-tuning with an L∞ norm constraint (Zhu et al. 2020, "Modifying Memories in Transformer Models",
arXiv:2012.00363).

The same Adam loop on target_new's NLL as FT (`editors/steps/finetune.py`), but after every step the trained
weight is projected back onto {W : ‖W − W₀‖∞ ≤ ε} (an elementwise clamp of the change), so no entry moves by
more than ε = `norm_constraint`. ROME (arXiv:2202.05262) used ε = 5e-4 on GPT-2 XL and EasyEdit 5e-5; the
per-model configs in configs/ft_l/ pick ε by measurement, because those values are too small to flip a
fact in a 270M model within a few dozen steps.

Not handled: a locality (KL) term, mini-batches, biases/norms; see `steps.finetune.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmedit.config import check_ranges
from lmedit.editors.steps.finetune import FinetuneConfig, finetune_edit
from lmedit.editors.base import Editor, WeightEdit, check_requests
from lmedit.registry import editors
from lmedit.stats import StatsCache
from lmedit.types import EditRequest

if TYPE_CHECKING:
    from lmedit.models.load import LM


@dataclass(frozen=True, kw_only=True)
class FtLConfig(FinetuneConfig):
    """Fine-tuning with ‖W − W₀‖∞ ≤ norm_constraint. Other fields and defaults in `FinetuneConfig`."""

    norm_constraint: float = 5e-4  # ε of the L∞ ball around the original weights (ROME's GPT-2 XL FT-L: 5e-4)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ranges(self, positive=("norm_constraint",))


@editors.register("ft_l")
class FtLEditor(Editor[FtLConfig]):
    """FT-L (arXiv:2012.00363): fine-tuning whose change is clamped to ±norm_constraint elementwise."""

    config_class = FtLConfig

    def __init__(self, config: FtLConfig | None = None, *, cache: StatsCache | None = None) -> None:
        super().__init__(config)
        self.cache = cache if cache is not None else StatsCache()  # sampled prefixes, when they are on

    def edit(self, lm: LM, requests: Sequence[EditRequest]) -> WeightEdit:
        """Fine-tune within the L∞ ball on all `requests` together; return the unapplied change."""
        return finetune_edit(lm, check_requests(requests), self.config, "ft_l",
                             norm_constraint=self.config.norm_constraint, cache=self.cache, progress=self.progress)
