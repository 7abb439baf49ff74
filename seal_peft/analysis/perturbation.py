"""Exact head perturbation: set chosen SEAL-H probe scales to a value (0 = remove the head, 1.5 =
amplify it) and measure the change of the answer log-likelihood and of teacher-forced accuracy.

One probe adapter is injected once; every condition sets its heads' scales in place and resets
them afterwards (no re-wrapping, no reloading). Per sample, one unperturbed forward records every
decoder layer's output, and each condition then recomputes only the layers from its lowest
perturbed layer upwards (:class:`~seal_peft.analysis._probe.PrefixReuse`). A condition may perturb
several heads at once (a group), which is one forward.
"""

from __future__ import annotations

import csv
import json
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..models import input_device
from ._probe import Head, PrefixReuse, SealProbe, answer_loss, as_record_list, forward_logits, prepare
from .attribution import HeadAttribution, spearman

__all__ = [
    "PerturbationResult",
    "answer_scores",
    "perturb_heads",
    "random_heads",
    "top_vs_random",
    "attribution_agreement",
    "head_name",
]


def head_name(head: Head) -> str:
    return f"L{int(head[0])}.H{int(head[1])}"


@dataclass
class PerturbationResult:
    """Answer NLL / teacher-forced correctness per sample, unperturbed and under each condition.

    ``delta_loglik`` of a condition = mean over samples of (perturbed - unperturbed) answer
    log-likelihood per answer token: negative = the perturbation hurts retrieval. ``effect`` =
    ``delta_loglik / (value - 1)``, the finite-difference slope, which has the sign convention of the
    attribution (positive = scaling the head up helps), so the two can be compared directly.
    """

    value: float
    conditions: dict[str, list[Head]]
    base_nll: np.ndarray
    base_correct: np.ndarray
    nll: dict[str, np.ndarray]
    correct: dict[str, np.ndarray]
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def base_accuracy(self) -> float:
        return float(np.mean(self.base_correct))

    def delta_loglik(self, name: str) -> np.ndarray:
        return self.base_nll - self.nll[name]

    def effect(self, name: str) -> float:
        return float(np.mean(self.delta_loglik(name)) / (self.value - 1.0))

    def row(self, name: str) -> dict[str, Any]:
        d = self.delta_loglik(name)
        return {
            "condition": name,
            "heads": " ".join(head_name(h) for h in self.conditions[name]),
            "num_heads": len(self.conditions[name]),
            "value": self.value,
            "delta_loglik": float(d.mean()),
            "delta_loglik_std": float(d.std(ddof=1)) if d.size > 1 else 0.0,
            "effect": self.effect(name),
            "base_accuracy": self.base_accuracy,
            "accuracy": float(np.mean(self.correct[name])),
            "delta_accuracy": float(np.mean(self.correct[name]) - self.base_accuracy),
        }

    def rows(self) -> list[dict[str, Any]]:
        return [self.row(n) for n in self.conditions]

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "num_samples": int(self.base_nll.size),
            "seconds": round(self.seconds, 2),
            "base_answer_nll": float(self.base_nll.mean()),
            "base_accuracy_teacher_forced": self.base_accuracy,
            "meta": self.meta,
            "conditions": self.rows(),
            "per_sample": {
                "base_nll": self.base_nll.tolist(),
                "nll": {k: v.tolist() for k, v in self.nll.items()},
                "correct": {k: [bool(x) for x in v] for k, v in self.correct.items()},
            },
        }

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    def to_csv(self, path: str | Path) -> Path:
        rows = self.rows()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return path

    def table(self) -> str:
        lines = [
            "| condition | heads | Δ log-lik / answer token | accuracy (base → perturbed) |",
            "|---|---|---|---|",
        ]
        for r in self.rows():
            lines.append(
                f"| {r['condition']} | {r['heads']} | {r['delta_loglik']:+.3f} ± {r['delta_loglik_std']:.3f} | "
                f"{r['base_accuracy']:.2f} → {r['accuracy']:.2f} |"
            )
        return "\n".join(lines)


def _normalise_conditions(conditions: Any) -> dict[str, list[Head]]:
    if isinstance(conditions, Mapping):
        out = {str(k): [(int(h[0]), int(h[1])) for h in v] for k, v in conditions.items()}
    else:  # a list of heads: one condition per head
        out = {head_name(h): [(int(h[0]), int(h[1]))] for h in conditions}
    if not out:
        raise ValueError("no perturbation conditions; pass heads [(layer, head), ...] or {name: [heads]}")
    for name, heads in out.items():
        if not heads:
            raise ValueError(f"perturbation condition {name!r} has no heads")
    return out


def perturb_heads(
    model: nn.Module,
    data: Any,
    conditions: Mapping[str, Sequence[Head]] | Sequence[Head],
    value: float = 0.0,
    tokenizer: Any = None,
    *,
    reuse_prefix: bool = True,
    head_dim: int | None = None,
    target_modules: Any = None,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
) -> PerturbationResult:
    """Scale heads to ``value`` and measure answer log-likelihood and teacher-forced accuracy.

    Args:
        model: plain causal LM or ``PeftModel`` with unmerged SEAL adapters (restored on return).
        data: records with ``input_ids`` / ``labels`` (``seal_peft.data``).
        conditions: ``{name: [(layer, head), ...]}`` (each condition perturbs its heads together, in
            one forward) or a list of heads (one condition per head, named ``L<layer>.H<head>``).
        value: the scale the heads are set to (0 removes them; 1 would change nothing).
        tokenizer: optional, for the numeric-answer accuracy rule (see :func:`head_attribution`).
        reuse_prefix: skip the unchanged layers below the lowest perturbed one (exact; turn off for
            models whose decoder layers are not called in sequence).
    """
    if float(value) == 1.0:
        raise ValueError("value=1.0 leaves the heads unchanged; use e.g. 0.0 (remove) or 1.5 (amplify)")
    conds = _normalise_conditions(conditions)
    records = as_record_list(data)
    start = time.perf_counter()
    with SealProbe(model, head_dim=head_dim, target_modules=target_modules) as probe:
        for heads in conds.values():
            for h in heads:
                probe.layout.check_head(h)
        reuse = PrefixReuse(probe.peft_model, probe.layout, enabled=reuse_prefix)
        samples = prepare(records, tokenizer, probe.device)
        base_nll, base_ok = [], []
        nll: dict[str, list[float]] = {k: [] for k in conds}
        ok: dict[str, list[bool]] = {k: [] for k in conds}
        total = len(samples) * (len(conds) + 1)
        with torch.no_grad(), tqdm(total=total, desc="head perturbation", disable=not progress) as bar:
            for sample in samples:
                with reuse.recording():
                    loss, correct = answer_loss(
                        forward_logits(probe.peft_model, sample, probe.use_keep), sample
                    )
                base_nll.append(float(loss))
                base_ok.append(correct)
                bar.update(1)
                for name, heads in conds.items():
                    lowest = probe.set_heads(heads, value)
                    try:
                        with reuse.skip_below(lowest):
                            logits = forward_logits(probe.peft_model, sample, probe.use_keep)
                        loss, correct = answer_loss(logits, sample)
                    finally:
                        probe.reset()
                    nll[name].append(float(loss))
                    ok[name].append(correct)
                    bar.update(1)
                reuse.outputs = {}
    return PerturbationResult(
        value=float(value),
        conditions=conds,
        base_nll=np.array(base_nll),
        base_correct=np.array(base_ok, dtype=bool),
        nll={k: np.array(v) for k, v in nll.items()},
        correct={k: np.array(v, dtype=bool) for k, v in ok.items()},
        seconds=time.perf_counter() - start,
        meta=dict(meta or {}),
    )


def answer_scores(
    model: nn.Module, data: Any, tokenizer: Any = None, progress: bool = True
) -> dict[str, Any]:
    """Answer NLL (mean per answer token) and teacher-forced correctness of ``model`` as it is (plain or
    ``PeftModel``), one forward per sample: ``{"nll": [...], "correct": [...], "answer_nll": mean,
    "accuracy": mean}``. The cheap evaluation used by ``benchmarks/attribution.py``."""
    from ..models import accepts_logits_to_keep

    records = as_record_list(data)
    device = input_device(model)
    use_keep = accepts_logits_to_keep(model)
    was_training = model.training
    model.eval()
    nll, correct = [], []
    try:
        with torch.no_grad():
            for sample in tqdm(
                prepare(records, tokenizer, device), desc="answer scores", disable=not progress
            ):
                loss, ok = answer_loss(forward_logits(model, sample, use_keep), sample)
                nll.append(float(loss))
                correct.append(ok)
    finally:
        model.train(was_training)
    return {
        "nll": nll,
        "correct": correct,
        "answer_nll": float(np.mean(nll)),
        "accuracy": float(np.mean(correct)),
    }


def random_heads(
    attribution: HeadAttribution, k: int, seed: int = 0, exclude: Sequence[Head] = ()
) -> list[Head]:
    """``k`` heads drawn uniformly (without replacement) from the attribution grid, minus ``exclude``."""
    excluded = {(int(a), int(b)) for a, b in exclude}
    pool = sorted((lid, h) for lid, h, _ in attribution.ranked("positive") if (lid, h) not in excluded)
    if k > len(pool):
        raise ValueError(f"cannot draw {k} heads from {len(pool)}")
    return sorted(random.Random(seed).sample(pool, k))


def top_vs_random(
    model: nn.Module,
    data: Any,
    attribution: HeadAttribution,
    k: int = 5,
    draws: int = 3,
    value: float = 0.0,
    tokenizer: Any = None,
    seed: int = 0,
    single_heads: int = 0,
    **kwargs: Any,
) -> PerturbationResult:
    """The perturbation check of the attribution: the ``k`` most positive heads, the ``k`` most
    negative heads and ``draws`` groups of ``k`` random heads (seeds ``seed``, ``seed+1`` ...; the top
    and bottom heads excluded), each set to ``value`` as a group. With ``single_heads=n``, also ``n``
    single heads (a third most positive, a third most negative, the rest random) for
    :func:`attribution_agreement`."""
    top, bottom = attribution.top(k, "positive"), attribution.top(k, "negative")
    conds: dict[str, list[Head]] = {}
    if k > 0:  # k=0: single heads only
        conds = {f"top{k}_positive": top, f"top{k}_negative": bottom}
        for d in range(draws):
            conds[f"random{k}_{d}"] = random_heads(attribution, k, seed + d, exclude=top + bottom)
    if single_heads:
        third = max(1, single_heads // 3)
        chosen = (attribution.top(third, "positive") + attribution.top(third, "negative"))[:single_heads]
        chosen += random_heads(attribution, max(0, single_heads - len(chosen)), seed + 1000, exclude=chosen)
        for h in chosen:
            conds[head_name(h)] = [h]
    return perturb_heads(model, data, conds, value=value, tokenizer=tokenizer, **kwargs)


def attribution_agreement(attribution: HeadAttribution, result: PerturbationResult) -> dict[str, Any]:
    """Spearman rank correlation between the attribution of single heads and their exact perturbation
    effect (``delta_loglik / (value - 1)``), over the single-head conditions of ``result``.

    Also returns the Pearson correlation and the pairs, and how well the linear prediction
    ``attribution * (value - 1)`` matches the measured change in size (median ratio).
    """
    pairs = []
    for name, heads in result.conditions.items():
        if len(heads) == 1:
            pairs.append((name, attribution.value(heads[0]), result.effect(name)))
    if not pairs:
        raise ValueError("the perturbation result has no single-head conditions to compare with")
    a = np.array([p[1] for p in pairs])
    e = np.array([p[2] for p in pairs])
    pearson = (
        float(np.corrcoef(a, e)[0, 1]) if len(pairs) > 2 and a.std() > 0 and e.std() > 0 else float("nan")
    )
    nonzero = np.abs(a) > 1e-12
    ratio = float(np.median(e[nonzero] / a[nonzero])) if nonzero.any() else float("nan")
    return {
        "num_heads": len(pairs),
        "spearman": spearman(a, e),
        "pearson": pearson,
        "median_effect_over_attribution": ratio,
        "pairs": [{"head": n, "attribution": float(x), "effect": float(y)} for n, x, y in pairs],
    }
