"""Causal tracing: which hidden states carry a fact (Meng et al. 2022, "Locating and Editing Factual
Associations in GPT", arXiv:2202.05262, §2 and Fig. 1-3).

Method. A clean run of the prompt; corrupted runs that add Gaussian noise (σ = 3 × the std of token
embeddings over the built-in facts' subject tokens, seeded) to the subject tokens' embeddings; and
restored runs, which are corrupted runs where one state is set back to its clean value. The score of a
restored run is P(answer) at the last position, averaged over `samples` noise draws; the indirect effect
(IE) of a state is P_restored − P_corrupted. Three kinds of state:
  resid  the residual stream after block l (`Site("resid_out", l)`), one layer at a time;
  mlp    MLP outputs (`Site("mlp.out", j)`) restored together over a window of layers centred on l;
  attn   attention outputs (`Site("attn.out", j)`), likewise.
Severing (Fig. 3) restores a residual state while holding later layers' MLP (or attention) outputs at
their corrupted values. Patching from another prompt uses the same machinery with the second prompt's
clean states as the source and no noise; its score is P(the second prompt's answer).

Layout (one module per job; import the public names from `lmedit.tracing`):
  engine.py   settings (noise, window, kinds) and the batched corrupted/restored runs (`Restoration`)
  single.py   one prompt: `trace`, `trace_kinds` (the three heatmaps, severing, patching), `restored_prob`
  facts.py    `Fact`, `load_facts`, `builtin_facts`, `known_facts`
  average.py  `average_trace` over many facts by token bucket
  suggest.py  `suggest_layer` and its on-disk cache
  plots.py    `plot_trace`, `plot_severing`, `plot_average`

Not handled: batched tracing of several prompts in one forward (facts are traced one after another),
restoring attention heads or MLP neurons individually, models without a key/value cache.
"""

from lmedit.tracing.average import AverageTraceResult, average_trace, token_buckets
from lmedit.tracing.engine import (
    BUCKETS,
    KINDS,
    NOISE_MULTIPLIER,
    Kind,
    ProgressFn,
    Restoration,
    default_window,
    embedding_noise,
    max_positions,
    window_layers,
)
from lmedit.tracing.facts import Fact, builtin_facts, known_facts, load_facts
from lmedit.tracing.plots import plot_average, plot_severing, plot_trace
from lmedit.tracing.single import TraceResult, restored_prob, trace, trace_kinds
from lmedit.tracing.suggest import SUGGESTION_VERSION, LayerSuggestion, suggest_layer

__all__ = [
    "BUCKETS", "KINDS", "NOISE_MULTIPLIER", "SUGGESTION_VERSION", "AverageTraceResult", "Fact", "Kind",
    "LayerSuggestion", "ProgressFn", "Restoration", "TraceResult", "average_trace", "builtin_facts",
    "default_window", "embedding_noise", "known_facts", "load_facts", "max_positions", "plot_average",
    "plot_severing", "plot_trace", "restored_prob", "suggest_layer", "token_buckets", "trace", "trace_kinds",
    "window_layers",
]
