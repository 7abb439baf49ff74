"""`EvalResult` (per-record rows + aggregates) and `evaluate_retrieval`."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .generation import StopRule, as_records, check_fields, generate_answers
from .scoring import default_scorer_name, get_scorer

__all__ = [
    "EvalResult",
    "evaluate_retrieval",
    "score_records",
    "depth_bin_edges",
    "depth_label",
    "auto_length_bins",
    "auto_depth_values",
]

# Generators hit a requested length within +-3 % and measure the needle depth after snapping it to
# a sentence boundary, so the stored ``length``/``depth`` scatter around the requested values.
# Aggregates group them back: lengths within this relative spread form one group ...
LENGTH_GROUP_TOLERANCE = 0.07
# ... and sorted depths closer than this gap form one grid row (if every row stays narrow).
DEPTH_GROUP_GAP = 0.025
DEPTH_GROUP_MAX_SPAN = 0.08


# ----------------------------------------------------------------------------------------------
# grouping helpers (shared with the NIAH grid)
# ----------------------------------------------------------------------------------------------
def depth_bin_edges(bins: int | Sequence[float]) -> list[float]:
    """Edges of depth bins over [0, 1]: ``bins`` equal bins, or explicit increasing edges."""
    if isinstance(bins, int):
        if bins < 1:
            raise ValueError(f"the number of depth bins must be >= 1, got {bins}")
        return [i / bins for i in range(bins + 1)]
    edges = [float(e) for e in bins]
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"depth bin edges must be at least two increasing numbers, got {list(bins)}")
    return edges


def bin_index(value: float, edges: Sequence[float]) -> int | None:
    """Half-open bins [e_i, e_{i+1}), the last one closed; None when outside."""
    if value < edges[0] or value > edges[-1]:
        return None
    for i in range(len(edges) - 1):
        if value < edges[i + 1]:
            return i
    return len(edges) - 2


def depth_label(lo: float, hi: float) -> str:
    """``"0.00-0.20"``: the label of a depth bin."""
    return f"{lo:.2f}-{hi:.2f}"


def nearest_bin(value: float, bins: Sequence[float]) -> float:
    """The element of ``bins`` closest to ``value`` (ties go to the smaller one)."""
    return min(bins, key=lambda b: (abs(b - value), b))


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def auto_length_bins(lengths: Iterable[int], tolerance: float = LENGTH_GROUP_TOLERANCE) -> list[int]:
    """Group measured lengths that lie within ``tolerance`` (relative) of their group's smallest value.

    Returns one representative per group (the rounded median). Distinct requested lengths of a
    generator (e.g. 4096 and 8192, each hit within +-3 %) come back as two groups; exact lengths
    that differ by more than ``tolerance`` stay separate.
    """
    values = sorted(int(v) for v in lengths)
    groups: list[list[int]] = []
    for v in values:
        if groups and v <= groups[-1][0] * (1 + tolerance):
            groups[-1].append(v)
        else:
            groups.append([v])
    return [int(round(_median(g))) for g in groups]


def auto_depth_values(
    depths: Iterable[float], gap: float = DEPTH_GROUP_GAP, max_span: float = DEPTH_GROUP_MAX_SPAN
) -> list[float] | None:
    """The depth grid behind measured depths, or None when the depths are not on a grid.

    Sorted depths closer than ``gap`` join one group; if every group spans at most ``max_span``
    and there are at most 21 groups, the group medians (rounded to 3 decimals) are returned.
    Uniformly random depths fail the test (their groups merge into wide runs) and return None.
    """
    values = sorted(float(d) for d in depths)
    if not values:
        return None
    groups: list[list[float]] = [[values[0]]]
    for v in values[1:]:
        if v - groups[-1][-1] <= gap:
            groups[-1].append(v)
        else:
            groups.append([v])
    if len(groups) > 21 or any(g[-1] - g[0] > max_span for g in groups):
        return None
    return [round(_median(g), 3) for g in groups]


def mean_or_nan(values: Iterable[float]) -> float:
    """The mean of ``values``; NaN (not an error) for an empty group, so tables keep their shape."""
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


# ----------------------------------------------------------------------------------------------
# the result object
# ----------------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    """Per-record rows of an evaluation plus the usual aggregates.

    Every row is a plain dict with at least ``score`` (float in [0, 1]); retrieval rows also carry
    ``index, task, length, depth, key, answer, output, correct``. ``accuracy`` is the mean score,
    so for QA-F1 results it is the mean F1.
    """

    rows: list[dict[str, Any]]
    name: str = ""
    metric: str = "accuracy"
    meta: dict[str, Any] = field(default_factory=dict)
    length_bins: list[int] | None = None

    # -- aggregates ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def accuracy(self) -> float:
        """Mean score over all rows (NaN for an empty result)."""
        return mean_or_nan(r["score"] for r in self.rows)

    @property
    def num_correct(self) -> int:
        return sum(1 for r in self.rows if r.get("correct", r["score"] >= 1.0))

    def outputs(self) -> list[str]:
        return [r.get("output", "") for r in self.rows]

    def _grouped(self, key: Callable[[dict[str, Any]], Any]) -> dict[Any, list[float]]:
        groups: dict[Any, list[float]] = {}
        for row in self.rows:
            k = key(row)
            if k is not None:
                groups.setdefault(k, []).append(row["score"])
        return groups

    def resolve_length_bins(self, bins: Sequence[int] | None = None) -> list[int]:
        """``bins``, else the result's ``length_bins``, else :func:`auto_length_bins` of the rows."""
        if bins:
            return [int(b) for b in bins]
        if self.length_bins:
            return list(self.length_bins)
        return auto_length_bins(r["length"] for r in self.rows if r.get("length") is not None)

    def accuracy_by_length(self, bins: Sequence[int] | None = None) -> dict[int, float]:
        """Mean score per length group, sorted by length.

        Every row goes to the nearest of ``bins`` (e.g. the requested lengths
        ``[4096, 8192, 16384]``); without bins the result's ``length_bins`` are used, and without
        those the measured lengths are grouped automatically (:func:`auto_length_bins`), because
        generated samples hit their requested length only within +-3 %.
        """
        resolved = self.resolve_length_bins(bins)
        groups = self._grouped(lambda r: self._length_key(r, resolved))
        return {k: mean_or_nan(groups[k]) for k in sorted(groups)}

    def counts_by_length(self, bins: Sequence[int] | None = None) -> dict[int, int]:
        resolved = self.resolve_length_bins(bins)
        groups = self._grouped(lambda r: self._length_key(r, resolved))
        return {k: len(groups[k]) for k in sorted(groups)}

    @staticmethod
    def _length_key(row: Mapping[str, Any], bins: Sequence[int] | None) -> int | None:
        length = row.get("length")
        if length is None:
            return None
        return int(nearest_bin(length, bins)) if bins else int(length)

    def accuracy_by_depth(self, bins: int | Sequence[float] = 5) -> dict[str, float]:
        """Mean score per depth bin (``"0.00-0.20"`` ...), rows without a depth are skipped."""
        edges = depth_bin_edges(bins)
        groups = self._grouped(lambda r: self._depth_key(r, edges))
        return {depth_label(edges[i], edges[i + 1]): mean_or_nan(groups[i]) for i in sorted(groups)}

    def counts_by_depth(self, bins: int | Sequence[float] = 5) -> dict[str, int]:
        edges = depth_bin_edges(bins)
        groups = self._grouped(lambda r: self._depth_key(r, edges))
        return {depth_label(edges[i], edges[i + 1]): len(groups[i]) for i in sorted(groups)}

    @staticmethod
    def _depth_key(row: Mapping[str, Any], edges: Sequence[float]) -> int | None:
        depth = row.get("depth")
        if depth is None or (isinstance(depth, float) and math.isnan(depth)):
            return None
        return bin_index(float(depth), edges)

    def accuracy_by_task(self) -> dict[str, float]:
        groups = self._grouped(lambda r: r.get("task"))
        return {k: mean_or_nan(groups[k]) for k in sorted(groups)}

    def summary(
        self, length_bins: Sequence[int] | None = None, depth_bins: int | Sequence[float] = 5
    ) -> dict:
        """All aggregates as a JSON-ready dict."""
        return {
            "name": self.name,
            "metric": self.metric,
            "n": self.n,
            "accuracy": self.accuracy,
            "accuracy_by_length": self.accuracy_by_length(length_bins),
            "count_by_length": self.counts_by_length(length_bins),
            "accuracy_by_depth": self.accuracy_by_depth(depth_bins),
            "count_by_depth": self.counts_by_depth(depth_bins),
            "accuracy_by_task": self.accuracy_by_task(),
        }

    # -- output -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _jsonable(
            {"summary": self.summary(), "meta": self.meta, "length_bins": self.length_bins, "rows": self.rows}
        )

    def to_json(self, path: str | Path) -> Path:
        """Write summary + meta + every row as indented JSON; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> EvalResult:
        """Load a result written by :meth:`to_json` (e.g. to plot it later)."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or "rows" not in data:
            raise ValueError(f"{path} is not an EvalResult JSON file (no 'rows'); write one with to_json()")
        summary = data.get("summary", {})
        return cls(
            rows=data["rows"],
            name=summary.get("name", ""),
            metric=summary.get("metric", "accuracy"),
            meta=data.get("meta", {}),
            length_bins=data.get("length_bins"),
        )

    def to_csv(self, path: str | Path) -> Path:
        """Write one CSV line per row (lists/dicts JSON-encoded); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        columns: list[str] = []
        for row in self.rows:
            columns.extend(k for k in row if k not in columns)
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for row in self.rows:
                writer.writerow(
                    {
                        k: json.dumps(_jsonable(v), ensure_ascii=False) if isinstance(v, (list, dict)) else v
                        for k, v in row.items()
                    }
                )
        return path

    def table(self, length_bins: Sequence[int] | None = None, depth_bins: int | Sequence[float] = 5) -> str:
        """A printable text table: overall, per length, per depth bin (and per task if mixed)."""
        title = f"{self.name or 'result'}: {self.metric} {self.accuracy:.3f}"
        if self.metric == "accuracy":
            title += f" ({self.num_correct}/{self.n})"
        else:
            title += f" (n={self.n})"
        lines = [title]

        def section(header: str, acc: Mapping[Any, float], counts: Mapping[Any, int]) -> None:
            if not acc:
                return
            width = max(len(header), *(len(str(k)) for k in acc))
            lines.append("")
            lines.append(f"{header:>{width}}  {'n':>5}  {self.metric:>8}")
            for k, v in acc.items():
                lines.append(f"{k!s:>{width}}  {counts[k]:>5}  {v:>8.3f}")

        section("length", self.accuracy_by_length(length_bins), self.counts_by_length(length_bins))
        section("depth", self.accuracy_by_depth(depth_bins), self.counts_by_depth(depth_bins))
        by_task = self.accuracy_by_task()
        if len(by_task) > 1:
            tasks = self._grouped(lambda r: r.get("task"))
            section("task", by_task, {k: len(v) for k, v in tasks.items()})
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------
def score_records(
    records: Sequence[Mapping[str, Any]],
    outputs: Sequence[str],
    scorer: str | Callable[[Mapping[str, Any], str], float | bool] = "auto",
) -> list[float]:
    """Score each (record, output): ``"auto"`` picks the scorer from the record's ``task`` and
    ``prompt_format`` (:func:`~seal_peft.evaluation.scoring.default_scorer_name`)."""
    if len(records) != len(outputs):
        raise ValueError(f"got {len(records)} records but {len(outputs)} outputs; pass one output per record")
    check_fields(records, ("answer",), "scoring")
    fixed = None if scorer == "auto" else get_scorer(scorer)
    scores = []
    for record, output in zip(records, outputs):
        fn = fixed or get_scorer(default_scorer_name(record.get("task"), record.get("prompt_format")))
        scores.append(float(fn(record, output)))
    return scores


def evaluate_retrieval(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: Any,
    max_new_tokens: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    scorer: str | Callable[[Mapping[str, Any], str], float | bool] = "auto",
    stop_rule: str | StopRule | None = "auto",
    name: str = "",
    length_bins: Sequence[int] | None = None,
) -> EvalResult:
    """Generate an answer for every record and score it.

    Args:
        model, tokenizer: the model under test (plain or ``PeftModel``) and its tokenizer.
        dataset: records with ``input_ids``, ``prompt_length``, ``answer`` and optionally ``task``,
            ``length``, ``depth``, ``key`` (what ``seal_peft.data`` produces).
        max_new_tokens: new-token cap; ``None`` = per record (LongEval's 100 under ``prompt_format=
            "longeval"``, else 24; see :func:`~seal_peft.evaluation.generation.default_max_new_tokens`).
        scorer: ``"auto"`` (for ``line_retrieval``: LongEval's last-integer rule under
            ``prompt_format="longeval"``, the first-integer rule otherwise; word-boundary containment
            for other tasks), a name from :data:`seal_peft.evaluation.SCORERS` or a callable
            ``(record, output) -> bool | float``.
        stop_rule: see :func:`generate_answers`.
        name: label stored in the result (used by tables and plots).
        length_bins: the requested lengths (e.g. ``[4096, 8192]``); per-length aggregates put each
            row in the nearest one. ``None`` groups the measured lengths automatically.

    Returns:
        :class:`EvalResult` with one row per record:
        ``index, task, length, depth, key, answer, output, correct, score``.
    """
    records = as_records(dataset)
    check_fields(records, ("input_ids", "prompt_length", "answer"), "retrieval evaluation")
    outputs = generate_answers(
        model,
        tokenizer,
        records,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
        stop_rule=stop_rule,
    )
    scores = score_records(records, outputs, scorer)
    rows = []
    for i, (record, output, score) in enumerate(zip(records, outputs, scores)):
        rows.append(
            {
                "index": i,
                "task": record.get("task"),
                "length": int(record["length"])
                if record.get("length") is not None
                else int(record["prompt_length"]),
                "depth": float(record["depth"]) if record.get("depth") is not None else None,
                "key": record.get("key"),
                "answer": record["answer"],
                "prompt_format": record.get("prompt_format"),
                "output": output,
                "correct": score >= 1.0,
                "score": score,
            }
        )
    meta = {"max_new_tokens": max_new_tokens, "scorer": scorer if isinstance(scorer, str) else "custom"}
    return EvalResult(
        rows=rows,
        name=name,
        metric="accuracy",
        meta=meta,
        length_bins=[int(b) for b in length_bins] if length_bins else None,
    )
