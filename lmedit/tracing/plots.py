"""Plots of traces: the heatmap of one trace, the severing bars and the averaged plot (matplotlib's Agg
canvas directly: no pyplot global state, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from lmedit.tracing.engine import BUCKETS

if TYPE_CHECKING:
    from lmedit.tracing.average import AverageTraceResult
    from lmedit.tracing.single import TraceResult


_CMAPS = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}
_TITLES = {"resid": "single restored layer", "mlp": "MLP", "attn": "attention"}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> list[Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for suffix in (".png", ".svg"):
        target = path.with_suffix(suffix)
        fig.savefig(target, dpi=110 if suffix == ".png" else None, bbox_inches="tight")
        out.append(target)
    return out


def plot_trace(result: TraceResult, path: str | Path, mark_layer: int | None = None) -> list[Path]:
    """Heatmap of a `TraceResult` (tokens down, layers across, subject tokens starred, colour bar).

    Args:
        mark_layer: a layer to mark with a dashed vertical line and a label (e.g. the layer to edit).

    Returns:
        The written PNG and SVG paths (`path` with those suffixes).
    """
    import numpy as np

    grid = np.array(result.scores, dtype=float)
    n_pos, n_layers = grid.shape
    fig = _figure(1.2 + 0.28 * n_layers, 0.9 + 0.32 * n_pos)
    ax = fig.add_subplot()
    low = result.corrupted_prob
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=_CMAPS.get(result.kind, "Purples"), aspect="auto",
                      vmin=min(low, np.nanmin(grid)) if np.isfinite(grid).any() else low,
                      interpolation="nearest")
    first, last = result.subject_range
    ax.set_yticks(range(n_pos))
    ax.set_yticklabels([repr(tok)[1:-1] + (" *" if first <= i <= last else "") for i, tok in enumerate(result.tokens)])
    ax.set_xticks(range(0, n_layers, max(1, n_layers // 10)))
    if result.kind == "resid":
        xlabel = "single restored layer"
    else:
        xlabel = f"center of interval of {result.window} restored {_TITLES[result.kind]} layers"
    if result.source_prompt is not None:
        title = f"Patching states from {result.source_prompt!r}"
    elif result.severed:
        title = f"Restoring the residual stream, later {_TITLES[result.severed]} severed"
    else:
        what = "state" if result.kind == "resid" else _TITLES[result.kind]
        title = f"Impact of restoring {what} after corrupted input"
    ax.set_title(title, fontsize=9)
    if mark_layer is not None:
        ax.axvline(mark_layer, color="black", ls="--", lw=1)
        xlabel += f"\n(dashed: layer {mark_layer})"
    ax.set_xlabel(xlabel)
    bar = fig.colorbar(image, ax=ax)
    bar.ax.set_title(f"p({result.answer_token.strip()})", fontsize=8)
    notes = f"clean p={result.clean_prob:.3f}, corrupted p={result.corrupted_prob:.3f}"
    if result.answer_n_tokens > 1:
        notes += f" (first of {result.answer_n_tokens} answer tokens)"
    fig.text(0.01, 0.0, notes, fontsize=7)
    return _save(fig, path)


def plot_severing(plain: TraceResult, severed: Mapping[str, TraceResult], path: str | Path,
                  token: int | None = None) -> list[Path]:
    """Bar plot of the indirect effect per layer at `token` (default: last subject token), restoring the
    residual stream with nothing severed and with later MLP / attention outputs frozen (the paper's Fig. 3)."""
    import numpy as np

    token = plain.subject_range[1] if token is None else token
    n_layers = len(plain.scores[0])
    fig = _figure(max(5.0, 0.35 * n_layers), 3.2)
    ax = fig.add_subplot()
    series = {"no severing": plain, **{f"{_TITLES[k]} severed": r for k, r in severed.items()}}
    width = 0.8 / len(series)
    colours = {"no severing": "tab:purple", "MLP severed": "tab:green", "attention severed": "tab:red"}
    for i, (label, result) in enumerate(series.items()):
        effect = np.array(result.scores[token], dtype=float) - result.corrupted_prob
        ax.bar(np.arange(n_layers) + (i - (len(series) - 1) / 2) * width, effect, width, label=label,
               color=colours.get(label))
    ax.set_xlabel("restored layer")
    ax.set_ylabel(f"indirect effect on p({plain.answer_token.strip()})")
    ax.set_title(f"Severing later layers at token {repr(plain.tokens[token])[1:-1]}", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_average(result: AverageTraceResult, path: str | Path) -> list[Path]:
    """The averaged plot: per kind, a bucket × layer heatmap and the lines with 95% bands."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    n_kinds = len(result.kinds)
    fig = _figure(4.6 * n_kinds, 6.4)
    axes = fig.subplots(2, n_kinds, squeeze=False)
    colours = ["tab:blue", "tab:cyan", "tab:red", "tab:orange", "tab:olive", "tab:gray"]
    for col, kind in enumerate(result.kinds):
        mean = np.array(result.mean[kind], dtype=float)
        band = np.array(result.band[kind], dtype=float)
        ax = axes[0][col]
        image = ax.imshow(np.ma.masked_invalid(mean), cmap=_CMAPS[kind], aspect="auto", interpolation="nearest")
        ax.set_yticks(range(len(result.buckets)))
        ax.set_yticklabels(result.buckets if col == 0 else [""] * len(result.buckets), fontsize=8)
        ax.set_title(f"Average indirect effect: {_TITLES[kind] if kind != 'resid' else 'residual stream'}",
                     fontsize=9)
        fig.colorbar(image, ax=ax)
        ax = axes[1][col]
        layers = np.arange(mean.shape[1])
        for b, bucket in enumerate(result.buckets):
            if np.isnan(mean[b]).all():
                continue
            ax.plot(layers, mean[b], label=bucket, color=colours[BUCKETS.index(bucket) % len(colours)])
            ax.fill_between(layers, mean[b] - band[b], mean[b] + band[b], alpha=0.2,
                            color=colours[BUCKETS.index(bucket) % len(colours)])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer" if kind == "resid" else f"center of {result.window}-layer window")
        if col == 0:
            ax.set_ylabel("average indirect effect")
            ax.legend(fontsize=7)
    fig.suptitle(f"{result.model}: average over {result.n_known or result.n_given} facts "
                 f"({'known' if result.n_known else 'all'}; {result.samples} noise samples, 95% bands)", fontsize=10)
    return _save(fig, path)
