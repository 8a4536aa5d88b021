"""FT and FT-L, the fine-tuning baselines: Adam steps on target_new's NLL for one or more layers' weights,
unconstrained (FT) or with the change kept in an L∞ ball (FT-L, the norm-bound option `norm_constraint`).

A baseline of ROME (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", arXiv:2202.05262,
§4) and of Zhu et al. 2020 ("Modifying Memories in Transformer Models", arXiv:2012.00363). By default one
layer's MLP down-projection (`mlp_out`) is trained; `layers` and `module` (mlp_out | mlp_in | attn_out)
choose others. The loop is `editors/steps/finetune.py`. With `norm_constraint` = ε set, after every step the
trained weight is projected back onto {W : ‖W − W₀‖∞ ≤ ε} (an elementwise clamp of the change), so no entry
moves by more than ε: that is FT-L. Both names are registered: `ft` (the bound off unless set) and `ft_l`
(the same editor with the bound on by default, ε = 5e-4 as ROME used on GPT-2 XL; EasyEdit uses 5e-5). The
per-model configs in configs/ft_l/ pick ε by measurement, because those values are too small to flip a fact
in a 270M model within a few dozen steps. The result is a `WeightEdit` with dense deltas; `info` holds the
loss curve.

FT-M (`ft_m`) is the name EasyEdit and the papers that use it (Wang et al. 2024, "EasyEdit: An Easy-to-use
Knowledge Editing Framework for Large Language Models", arXiv:2308.07269; Zhang et al. 2024, "A Comprehensive
Study of Knowledge Editing for Large Language Models", arXiv:2401.01286) give to fine-tuning one MLP layer with
the loss masked to the target tokens and no norm bound, every step taken. That is the objective `ft` trains
(the teacher-forced NLL of target_new's tokens only, `steps/finetune.py`); `ft_m` is registered so that
results can be reported under the name papers use, with FT-M's defaults: no early stop (all `steps` taken), as in
EasyEdit's FT-M, and its own shipped settings per model (configs/ft_m/).

Not handled: a locality (KL) term, mini-batches, biases/norms; see `steps.finetune.py`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from lmedit.config import check_ranges
from lmedit.editors.steps.finetune import FinetuneConfig, finetune_edit
from lmedit.editors.base import Editor, WeightEdit, check_requests
from lmedit.errors import ConfigError
from lmedit.registry import editors
from lmedit.stats import StatsCache
from lmedit.types import EditRequest

if TYPE_CHECKING:
    from lmedit.models.load import LM


@dataclass(frozen=True, kw_only=True)
class FtConfig(FinetuneConfig):
    """Fine-tuning, unconstrained unless `norm_constraint` is set. Other fields, defaults: `FinetuneConfig`."""

    norm_constraint: float | None = None  # ε: keep ‖W − W₀‖∞ ≤ ε after every step (FT-L); None: no bound (FT)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ranges(self, positive=("norm_constraint",))


@dataclass(frozen=True, kw_only=True)
class FtMConfig(FtConfig):
    """FT-M's settings: `FtConfig` without early stopping by default (EasyEdit's FT-M takes every step)."""

    early_stop_loss: float = 0.0


@dataclass(frozen=True, kw_only=True)
class FtLConfig(FtConfig):
    """FT-L's settings: `FtConfig` with the norm bound on by default."""

    norm_constraint: float = 5e-4  # ε of the L∞ ball around the original weights (ROME's GPT-2 XL FT-L: 5e-4)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.norm_constraint is None:  # FT-L without its bound would be FT recorded under another name
            raise ConfigError("FtLConfig.norm_constraint: FT-L needs its norm bound (a number > 0), got None; "
                              "use the 'ft' method for unbounded fine-tuning")


@editors.register("ft")
class FtEditor(Editor[FtConfig]):
    """Fine-tuning baseline (arXiv:2202.05262 §4): trains the configured weights on target_new, the change
    clamped to ±`norm_constraint` elementwise when that is set."""

    config_class = FtConfig
    method: ClassVar[str] = "ft"  # the registry name, recorded on the edit

    def __init__(self, config: FtConfig | None = None, *, cache: StatsCache | None = None) -> None:
        super().__init__(config)
        self.cache = cache if cache is not None else StatsCache()  # sampled prefixes, when they are on

    def edit(self, lm: LM, requests: Sequence[EditRequest]) -> WeightEdit:
        """Fine-tune on all `requests` together; return the unapplied change (the weights stay as they were)."""
        return finetune_edit(lm, check_requests(requests), self.config, self.method,
                             norm_constraint=self.config.norm_constraint, cache=self.cache, progress=self.progress)


@editors.register("ft_l")
class FtLEditor(FtEditor):
    """FT-L (arXiv:2012.00363): FT with the norm bound on by default (`FtLConfig`)."""

    config_class = FtLConfig
    method = "ft_l"


@editors.register("ft_m")
class FtMEditor(FtEditor):
    """FT-M (EasyEdit's name, arXiv:2308.07269): FT's target-token-masked loss, no norm bound, no early stop."""

    config_class = FtMConfig
    method = "ft_m"
