"""PNG plots of head attribution and learned scales (matplotlib, Agg canvas, no pyplot state)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .attribution import HeadAttribution, spearman
from .scales import HeadScales

__all__ = ["plot_head_map", "plot_attribution", "plot_scales", "plot_scale_vs_attribution"]


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'seal-peft[plots]' (or matplotlib)") from e
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_head_map(
    values: np.ndarray,
    path: str | Path,
    *,
    layer_ids: list[int] | None = None,
    center: float = 0.0,
    title: str = "",
    label: str = "",
    mark: dict[str, list[tuple[int, int]]] | None = None,
    cmap: str = "RdBu_r",
) -> Path:
    """Layer (rows, first layer at the top) x head (columns) heatmap with a diverging colormap centred
    at ``center`` (symmetric limits, so equal distances from the centre get equal colour strength).
    ``mark`` = ``{"+": heads, "−": heads}`` writes the symbol into those cells. NaN cells are grey."""
    from matplotlib.colors import TwoSlopeNorm

    grid = np.asarray(values, dtype=float)
    if grid.ndim != 2 or grid.size == 0:
        raise ValueError(f"plot_head_map needs a non-empty [layers, heads] grid, got shape {grid.shape}")
    layer_ids = list(layer_ids) if layer_ids is not None else list(range(grid.shape[0]))
    finite = grid[np.isfinite(grid)]
    span = float(np.max(np.abs(finite - center))) if finite.size else 1.0
    span = span if span > 0 else 1.0
    norm = TwoSlopeNorm(vcenter=center, vmin=center - span, vmax=center + span)
    n_layers, n_heads = grid.shape
    fig = _figure(max(4.0, 0.45 * n_heads + 2.4), max(3.5, 0.22 * n_layers + 1.4))
    ax = fig.add_subplot(1, 1, 1)
    import matplotlib

    colormap = matplotlib.colormaps[cmap].with_extremes(bad="#cccccc")
    image = ax.imshow(
        np.ma.masked_invalid(grid), cmap=colormap, norm=norm, aspect="auto", interpolation="nearest"
    )
    ax.set_xticks(range(n_heads))
    ax.set_xticklabels([str(h) for h in range(n_heads)])
    step = max(1, math.ceil(n_layers / 30))
    ax.set_yticks(range(0, n_layers, step))
    ax.set_yticklabels([str(layer_ids[i]) for i in range(0, n_layers, step)])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    for symbol, heads in (mark or {}).items():
        for layer, head in heads:
            if layer in layer_ids:
                ax.text(
                    head, layer_ids.index(layer), symbol, ha="center", va="center", fontsize=9, color="black"
                )
    fig.colorbar(image, ax=ax, label=label)
    ax.set_title(title)
    return _save(fig, path)


def plot_attribution(
    attribution: HeadAttribution, path: str | Path, k: int = 5, title: str | None = None
) -> Path:
    """Heatmap of the mean attribution; the ``k`` most positive heads are marked ``+``, the ``k`` most
    negative ``−``."""
    return plot_head_map(
        attribution.mean,
        path,
        layer_ids=attribution.layer_ids,
        center=0.0,
        label="attribution  −dLoss/ds  (nats per answer token)",
        title=title or f"head attribution ({attribution.num_samples} samples)",
        mark={"+": attribution.top(k, "positive"), "−": attribution.top(k, "negative")},
    )


def plot_scales(scales: HeadScales, path: str | Path, title: str | None = None) -> Path:
    """Heatmap of learned scales, centred at 1 (red = emphasised, blue = suppressed)."""
    kind = "SEAL-H scale" if scales.granularity == "head" else "SEAL-C scale, mean per head"
    return plot_head_map(
        scales.mean,
        path,
        layer_ids=scales.layer_ids,
        center=1.0,
        label=kind,
        title=title or f"learned {kind}",
    )


def plot_scale_vs_attribution(
    attribution: HeadAttribution, scales: HeadScales, path: str | Path, label_top: int = 6
) -> Path:
    """Scatter: one point per head, x = attribution, y = learned scale; the ``label_top`` heads of
    largest |attribution| are labelled; the title gives the Spearman correlation."""
    xs, ys, names = [], [], []
    for i, lid in enumerate(attribution.layer_ids):
        for h in range(attribution.num_heads):
            a = attribution.mean[i, h]
            s, _ = scales.lookup(lid, h)
            if np.isfinite(a) and np.isfinite(s):
                xs.append(float(a))
                ys.append(s)
                names.append((lid, h))
    if not xs:
        raise ValueError("no head has both an attribution and a learned scale; nothing to plot")
    fig = _figure(5.5, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(xs, ys, s=14, alpha=0.7)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.axvline(0.0, color="grey", lw=0.8, ls="--")
    order = sorted(range(len(xs)), key=lambda j: -abs(xs[j]))[:label_top]
    for j in order:
        ax.annotate(
            f"L{names[j][0]}.H{names[j][1]}",
            (xs[j], ys[j]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xlabel("attribution −dLoss/ds (positive = scaling up helps)")
    ax.set_ylabel("learned scale" + (" (mean per head)" if scales.granularity == "channel" else ""))
    ax.set_title(f"learned scale vs attribution: Spearman ρ = {spearman(xs, ys):.2f} ({len(xs)} heads)")
    ax.grid(True, alpha=0.3)
    return _save(fig, path)
