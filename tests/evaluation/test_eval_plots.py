"""NIAH grid aggregation and PNG plots."""

from __future__ import annotations

import math

import pytest

from seal_peft.evaluation import EvalResult, needle_grid, plot_accuracy_vs_length, plot_heatmap

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def rows():
    out = []
    for length in (1024, 2048):
        for depth in (0.0, 0.5, 1.0):
            for k in range(2):
                correct = not (length == 2048 and depth == 0.5 and k == 0)
                out.append({"length": length, "depth": depth, "score": float(correct), "correct": correct})
    return out


def test_needle_grid_discrete_depths():
    grid = needle_grid(EvalResult(rows=rows(), name="base"))
    assert grid.lengths == [1024, 2048]
    assert grid.depths == [0.0, 0.5, 1.0] and grid.depth_labels == ["0%", "50%", "100%"]
    assert grid.accuracy == [[1.0, 1.0], [1.0, 0.5], [1.0, 1.0]]
    assert grid.counts == [[2, 2], [2, 2], [2, 2]]
    assert grid.overall == pytest.approx(11 / 12)
    assert grid.to_dict()["name"] == "base"


def test_needle_grid_bins_and_length_targets():
    data = [{"length": 1000 + i, "depth": i / 40, "score": 1.0} for i in range(40)]
    grid = needle_grid(data, length_bins=[1024])
    assert grid.lengths == [1024] and len(grid.depths) == 10  # 40 distinct depths -> 10 bins
    assert grid.counts == [[4]] * 10
    grid = needle_grid(data, depth_bins=[0.0, 0.5, 1.0], length_bins=[1024])
    assert grid.depth_labels == ["0-50%", "50-100%"] and grid.counts == [[20], [20]]
    sparse = needle_grid(
        [{"length": 1, "depth": 0.0, "score": 1.0}, {"length": 2, "depth": 1.0, "score": 0.0}]
    )
    assert math.isnan(sparse.accuracy[0][1]) and sparse.counts[0][1] == 0
    with pytest.raises(ValueError, match="no rows with both"):
        needle_grid([{"score": 1.0, "length": 3}])


def test_heatmap_and_accuracy_plot_are_written(tmp_path):
    base = EvalResult(rows=rows(), name="base")
    better = EvalResult(rows=[dict(r, score=1.0, correct=True) for r in rows()], name="SEAL-H")
    heat = plot_heatmap(needle_grid(base), tmp_path / "plots" / "niah.png")
    assert heat.read_bytes()[:8] == PNG_MAGIC and heat.stat().st_size > 1000
    line = plot_accuracy_vs_length(
        {"base": base, "SEAL-H": better, "paper": {1024: 0.9, 2048: 0.8}}, tmp_path / "acc.png"
    )
    assert line.read_bytes()[:8] == PNG_MAGIC and line.stat().st_size > 1000
    with pytest.raises(ValueError, match="no results"):
        plot_accuracy_vs_length({}, tmp_path / "x.png")
