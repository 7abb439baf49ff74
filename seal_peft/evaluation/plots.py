"""Needle-in-a-haystack grid (length x depth) and PNG plots.

Plots use matplotlib's object API with the Agg canvas, so they never touch the global pyplot
backend of a notebook or script that imports this module. matplotlib is an optional dependency
(``pip install seal-peft[plots]``); it is imported only when a plot is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .results import EvalResult, auto_depth_values, auto_length_bins, bin_index, depth_bin_edges, nearest_bin

__all__ = ["NeedleGrid", "needle_grid", "plot_heatmap", "plot_accuracy_vs_length"]


@dataclass
class NeedleGrid:
    """Accuracy per (depth, length) cell. ``accuracy[i][j]`` is depth row i, length column j.

    Empty cells hold NaN accuracy and count 0.
    """

    lengths: list[int]
    depths: list[float]  # the depth value (discrete grid) or bin midpoint of each row
    depth_labels: list[str]
    accuracy: list[list[float]]
    counts: list[list[int]]
    name: str = ""

    @property
    def overall(self) -> float:
        total = sum(sum(row) for row in self.counts)
        if total == 0:
            return float("nan")
        hits = sum(
            a * c for arow, crow in zip(self.accuracy, self.counts) for a, c in zip(arow, crow) if c > 0
        )
        return hits / total

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "lengths": self.lengths,
            "depths": self.depths,
            "depth_labels": self.depth_labels,
            "accuracy": [[None if math.isnan(a) else a for a in row] for row in self.accuracy],
            "counts": self.counts,
        }


def _rows_of(
    result: EvalResult | Sequence[Mapping[str, Any]],
) -> tuple[list[Mapping[str, Any]], str, list[int] | None]:
    if isinstance(result, EvalResult):
        return list(result.rows), result.name, result.length_bins
    return list(result), "", None


def needle_grid(
    result: EvalResult | Sequence[Mapping[str, Any]],
    depth_bins: int | Sequence[float] | None = None,
    length_bins: Sequence[int] | None = None,
) -> NeedleGrid:
    """Aggregate NIAH rows into a length x depth accuracy grid.

    Args:
        result: an :class:`EvalResult` or its rows (each with ``length``, ``depth``, ``score``).
        depth_bins: ``None`` recovers the requested depth grid (0, 0.1, ..., 1.0) from the
            measured depths when they cluster on one (:func:`auto_depth_values`, one row per grid
            value) and falls back to 10 equal bins otherwise (e.g. random depths); an int gives
            that many equal bins over [0, 1]; a sequence gives explicit edges.
        length_bins: requested lengths; every row goes to the nearest one. ``None`` uses the
            result's ``length_bins`` or groups the measured lengths (:func:`auto_length_bins`).
    """
    rows, name, result_bins = _rows_of(result)
    rows = [r for r in rows if r.get("depth") is not None and r.get("length") is not None]
    if not rows:
        raise ValueError(
            "no rows with both 'length' and 'depth' to build a needle grid from; evaluate records that "
            "carry a depth (e.g. seal_peft.data needle / line-retrieval records)"
        )

    bins = list(length_bins or result_bins or auto_length_bins(r["length"] for r in rows))

    def length_of(row: Mapping[str, Any]) -> int:
        return int(nearest_bin(row["length"], bins))

    lengths = sorted({length_of(r) for r in rows})
    grid_depths = auto_depth_values(r["depth"] for r in rows) if depth_bins is None else None
    if grid_depths is not None:
        depths = grid_depths
        labels = [_percent(d) for d in depths]

        def depth_row(row: Mapping[str, Any]) -> int | None:
            return depths.index(nearest_bin(float(row["depth"]), depths))
    else:
        edges = depth_bin_edges(10 if depth_bins is None else depth_bins)
        depths = [(lo + hi) / 2 for lo, hi in zip(edges, edges[1:])]
        labels = [f"{100 * lo:.0f}-{100 * hi:.0f}%" for lo, hi in zip(edges, edges[1:])]

        def depth_row(row: Mapping[str, Any]) -> int | None:
            return bin_index(float(row["depth"]), edges)

    sums = [[0.0] * len(lengths) for _ in depths]
    counts = [[0] * len(lengths) for _ in depths]
    for row in rows:
        i = depth_row(row)
        if i is None:
            continue
        j = lengths.index(length_of(row))
        sums[i][j] += float(row["score"])
        counts[i][j] += 1
    accuracy = [
        [s / c if c else float("nan") for s, c in zip(srow, crow)] for srow, crow in zip(sums, counts)
    ]
    return NeedleGrid(
        lengths=lengths, depths=depths, depth_labels=labels, accuracy=accuracy, counts=counts, name=name
    )


def _percent(depth: float) -> str:
    pct = 100 * depth
    return f"{pct:.0f}%" if abs(pct - round(pct)) < 1e-6 else f"{pct:.1f}%"


def _format_length(length: float) -> str:
    length = int(length)
    if length >= 1024 and length % 1024 == 0:
        return f"{length // 1024}K"
    if length >= 1000:
        return f"{length / 1000:.1f}k"
    return str(length)


def _new_figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'seal-peft[plots]' (or matplotlib)") from e
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def plot_heatmap(grid: NeedleGrid, path: str | Path, title: str | None = None, annotate: bool = True) -> Path:
    """Draw the NIAH heatmap (x: context length, y: needle depth, colour: accuracy) to a PNG."""
    from matplotlib.colors import LinearSegmentedColormap

    fig = _new_figure(max(4.0, 0.9 * len(grid.lengths) + 2.5), max(3.0, 0.4 * len(grid.depths) + 1.5))
    ax = fig.add_subplot(1, 1, 1)
    cmap = LinearSegmentedColormap.from_list(
        "niah", ["#d7191c", "#fdae61", "#ffffbf", "#a6d96a", "#1a9641"]
    ).with_extremes(bad="#d9d9d9")  # empty cells are grey

    data = np.ma.masked_invalid(np.array(grid.accuracy, dtype=float))
    image = ax.imshow(data, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(grid.lengths)))
    ax.set_xticklabels([_format_length(v) for v in grid.lengths], rotation=45 if len(grid.lengths) > 8 else 0)
    ax.set_yticks(range(len(grid.depths)))
    ax.set_yticklabels(grid.depth_labels)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    if annotate:
        for i, row in enumerate(grid.accuracy):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="black")
    fig.colorbar(image, ax=ax, label="accuracy")
    if title is None:
        title = f"{grid.name + ': ' if grid.name else ''}needle retrieval, mean {grid.overall:.2f}"
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_accuracy_vs_length(
    results: Mapping[str, EvalResult | Mapping[int, float]],
    path: str | Path,
    title: str | None = None,
    length_bins: Sequence[int] | None = None,
) -> Path:
    """One line per named result (``{"base": r0, "SEAL-H": r1}``): accuracy against context length.

    A value may also be a ready ``{length: accuracy}`` mapping (e.g. numbers from a paper table).
    """
    if not results:
        raise ValueError("no results to plot; pass a mapping like {'base': result, 'SEAL-H': result2}")
    fig = _new_figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    all_lengths: set[int] = set()
    for label, result in results.items():
        if isinstance(result, EvalResult):
            by_length = result.accuracy_by_length(length_bins)
        elif isinstance(result, Mapping):
            by_length = {int(k): float(v) for k, v in result.items()}
        else:
            raise TypeError(
                f"result {label!r} is a {type(result).__name__}; pass an EvalResult or {{length: acc}}"
            )
        if not by_length:
            raise ValueError(f"result {label!r} has no rows with a 'length'; nothing to plot")
        xs = sorted(by_length)
        all_lengths.update(xs)
        ax.plot(xs, [by_length[x] for x in xs], marker="o", label=str(label))
    ticks = sorted(all_lengths)
    if len(ticks) <= 12:
        ax.set_xticks(ticks)
        ax.set_xticklabels([_format_length(t) for t in ticks])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title or "retrieval accuracy vs context length")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
