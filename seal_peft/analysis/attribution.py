"""First-order head attribution: the gradient of the answer loss with respect to SEAL-H scales at 1.0.

One forward and one backward pass per sample give the attribution of *every* head at once:

    attribution(layer, head) = - d loss / d s(layer, head)   at s = 1 (the unchanged model)

where ``loss`` is the mean negative log-likelihood of the answer tokens of a sample and
``s(layer, head)`` multiplies that head's output (the input of ``o_proj``), exactly the SEAL-H scale.
Positive: scaling the head up lowers the answer loss (the head carries retrieval); negative:
scaling it down helps (the head distracts). To first order, setting a head's scale to ``v`` changes
the answer log-likelihood (per token) by ``attribution * (v - 1)``, so zeroing a head with
attribution ``a`` costs about ``a`` nats per answer token.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ._probe import Head, SealProbe, answer_loss, as_record_list, forward_logits, prepare

__all__ = ["HeadAttribution", "head_attribution", "spearman"]

SIGNS = ("positive", "negative", "abs")


@dataclass
class HeadAttribution:
    """Per-sample head attributions and their aggregates.

    Attributes:
        layer_ids: decoder-layer index of each grid row.
        values: ``[num_samples, num_layers, num_heads]`` attributions (``-dLoss/ds``); NaN where a
            layer has fewer heads than the widest one.
        loss: answer NLL (mean per answer token) of each sample under the unchanged model.
        correct: teacher-forced correctness of each sample (every answer token is the argmax).
        seconds: wall time of the computation.
        meta: free-form description (model, data settings ...), stored in the JSON.
    """

    layer_ids: list[int]
    values: np.ndarray
    loss: np.ndarray
    correct: np.ndarray
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return int(self.values.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.values.shape[2])

    @property
    def mean(self) -> np.ndarray:
        """``[num_layers, num_heads]`` mean attribution over samples."""
        return self.values.mean(axis=0)

    @property
    def std(self) -> np.ndarray:
        """``[num_layers, num_heads]`` standard deviation over samples (ddof=1; 0 for one sample)."""
        if self.num_samples < 2:
            return np.zeros_like(self.mean)
        return self.values.std(axis=0, ddof=1)

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.correct))

    def ranked(self, sign: str = "positive") -> list[tuple[int, int, float]]:
        """``(layer, head, mean attribution)`` sorted: most positive first, most negative first, or
        largest magnitude first (``sign="abs"``)."""
        if sign not in SIGNS:
            raise ValueError(f"sign={sign!r}: use one of {SIGNS}")
        mean = self.mean
        rows = [
            (lid, h, float(mean[i, h]))
            for i, lid in enumerate(self.layer_ids)
            for h in range(self.num_heads)
            if not math.isnan(mean[i, h])
        ]
        key = {"positive": lambda r: -r[2], "negative": lambda r: r[2], "abs": lambda r: -abs(r[2])}[sign]
        return sorted(rows, key=key)

    def top(self, k: int, sign: str = "positive") -> list[Head]:
        """The ``k`` heads ranked first by :meth:`ranked` as ``(layer, head)`` pairs."""
        return [(lid, h) for lid, h, _ in self.ranked(sign)[: max(0, int(k))]]

    def value(self, head: Head) -> float:
        return float(self.mean[self.layer_ids.index(int(head[0])), int(head[1])])

    # ------------------------------------------------------------------ records
    def rows(self, scales: Any = None) -> list[dict[str, Any]]:
        """One row per head: ``layer, head, attribution, std, rank`` (1 = most positive) and, with
        ``scales`` (a :class:`~seal_peft.analysis.HeadScales`), ``learned_scale`` (+ ``learned_scale_std``
        across the channels of a SEAL-C head)."""
        mean, std = self.mean, self.std
        rank = {(lid, h): i + 1 for i, (lid, h, _) in enumerate(self.ranked("positive"))}
        out = []
        for i, lid in enumerate(self.layer_ids):
            for h in range(self.num_heads):
                if math.isnan(mean[i, h]):
                    continue
                row = {
                    "layer": lid,
                    "head": h,
                    "attribution": float(mean[i, h]),
                    "std": float(std[i, h]),
                    "rank": rank[(lid, h)],
                }
                if scales is not None:
                    s, s_std = scales.lookup(lid, h)
                    row["learned_scale"] = s
                    if scales.granularity == "channel":
                        row["learned_scale_std"] = s_std
                out.append(row)
        return out

    def to_dict(self, scales: Any = None) -> dict[str, Any]:
        return {
            "sign_convention": "attribution = -dLoss/ds at s=1; positive = scaling the head up helps retrieval",
            "layer_ids": self.layer_ids,
            "num_samples": self.num_samples,
            "seconds": round(self.seconds, 2),
            "base_answer_nll": float(np.mean(self.loss)),
            "base_accuracy_teacher_forced": self.accuracy,
            "meta": self.meta,
            "heads": self.rows(scales),
            "per_sample": {
                "loss": [float(x) for x in self.loss],
                "correct": [bool(x) for x in self.correct],
                "values": np.where(np.isnan(self.values), None, self.values).tolist(),
            },
        }

    def to_json(self, path: str | Path, scales: Any = None) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(scales), indent=1))
        return path

    def to_csv(self, path: str | Path, scales: Any = None) -> Path:
        rows = self.rows(scales)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> HeadAttribution:
        """Read back a file written by :meth:`to_json` (per-sample values included)."""
        try:
            data = json.loads(Path(path).read_text())
            per = data["per_sample"]
            values = np.array(per["values"], dtype=float)  # None -> nan
            return cls(
                layer_ids=[int(x) for x in data["layer_ids"]],
                values=values,
                loss=np.array(per["loss"], dtype=float),
                correct=np.array(per["correct"], dtype=bool),
                seconds=float(data.get("seconds", 0.0)),
                meta=dict(data.get("meta", {})),
            )
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"{path} is not an attribution file written by HeadAttribution.to_json ({err})"
            ) from err


def head_attribution(
    model: nn.Module,
    data: Any,
    tokenizer: Any = None,
    *,
    head_dim: int | None = None,
    target_modules: Any = None,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
) -> HeadAttribution:
    """Attribution of every attention head on ``data``, one forward + backward per sample.

    Args:
        model: a plain causal LM of a supported architecture, or a ``PeftModel`` with (unmerged) SEAL
            adapters - then the attribution is that of the adapted model. The model is restored on
            return (the probe adapter is removed).
        data: records with ``input_ids`` and ``labels`` (-100 except the answer), e.g. from
            ``seal_peft.data.line_retrieval``. Each sample is run on its own (no padding).
        tokenizer: optional; with it, teacher-forced correctness of numeric answers ignores the tokens
            after the number (see ``docs/analysis.md``).
        head_dim, target_modules: passed to ``SealConfig`` for models whose heads cannot be detected.
        progress: tqdm bar over samples.
        meta: stored in the result (and its JSON).

    Returns:
        :class:`HeadAttribution` (mean, std, per-sample values, ranking, JSON/CSV).
    """
    records = as_record_list(data)
    start = time.perf_counter()
    with SealProbe(model, head_dim=head_dim, target_modules=target_modules) as probe:
        samples = prepare(records, tokenizer, probe.device)
        values, losses, correct = [], [], []
        for sample in tqdm(samples, desc="head attribution", disable=not progress, unit="sample"):
            probe.zero_grad()
            with torch.enable_grad():
                logits = forward_logits(probe.peft_model, sample, probe.use_keep)
                loss, ok = answer_loss(logits, sample)
                loss.backward()
            values.append(-probe.gradients())
            losses.append(float(loss.detach()))
            correct.append(ok)
            del logits, loss
        probe.zero_grad()
        layer_ids = list(probe.layout.layer_ids)
    return HeadAttribution(
        layer_ids=layer_ids,
        values=np.stack(values),
        loss=np.array(losses),
        correct=np.array(correct, dtype=bool),
        seconds=time.perf_counter() - start,
        meta=dict(meta or {}),
    )


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks starting at 1, ties get their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation of two equally long sequences (NaN pairs dropped; NaN if fewer than
    3 pairs remain or one side is constant)."""
    a = np.asarray(x, dtype=float).ravel()
    b = np.asarray(y, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"spearman: {a.size} vs {b.size} values; pass sequences of equal length")
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    if a.size < 3:
        return float("nan")
    ra, rb = _ranks(a), _ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")
