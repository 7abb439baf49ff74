"""Learned SEAL scales as a layer x head grid, and how they relate to the attribution."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from ..tuner.config import SealConfig
from ..tuner.model import resolve_head_dim
from ..tuner.utils import text_config
from ._probe import _is_peft_model, layout_of
from .attribution import HeadAttribution, spearman

__all__ = ["HeadScales", "learned_head_scales", "scale_correlation"]


@dataclass
class HeadScales:
    """Learned scales per (layer, head).

    ``mean[i, h]`` is the SEAL-H scale of head ``h`` in layer ``layer_ids[i]``; for SEAL-C it is the
    mean of the head's ``head_dim`` channel scales and ``std`` their spread (0 for SEAL-H). Layers the
    adapter does not cover are absent (their effective scale is 1).
    """

    layer_ids: list[int]
    mean: np.ndarray
    std: np.ndarray
    granularity: str
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def lookup(self, layer: int, head: int) -> tuple[float, float]:
        """``(mean, std)`` of one head; NaNs when the adapter does not cover it."""
        if layer not in self.layer_ids or head >= self.mean.shape[1]:
            return float("nan"), float("nan")
        i = self.layer_ids.index(layer)
        return float(self.mean[i, head]), float(self.std[i, head])


def _read_scales(peft_model: nn.Module, adapter_name: str, head_dim: int | None, source: str) -> HeadScales:
    config = peft_model.peft_config[adapter_name]
    granularity = getattr(config, "granularity", "head")
    layout, modules = layout_of(peft_model, adapter_name)
    base = peft_model.get_base_model()
    rows_mean, rows_std = [], []
    for name, module in zip(layout.names, modules):
        scale = module.seal_scale[adapter_name].detach().float().cpu().numpy()
        if module.seal_group[adapter_name] > 1:  # SEAL-H: one value per head already
            rows_mean.append(scale)
            rows_std.append(np.zeros_like(scale))
            continue
        parent_name = name.rsplit(".", 1)[0] if "." in name else ""
        parent = peft_model.get_submodule(parent_name) if parent_name else None
        d = resolve_head_dim(
            SealConfig(head_dim=head_dim), module.in_features, parent, text_config(base), name
        )
        per_head = scale.reshape(-1, d)
        rows_mean.append(per_head.mean(axis=1))
        rows_std.append(per_head.std(axis=1))
    width = max(len(r) for r in rows_mean)
    mean = np.full((len(rows_mean), width), np.nan)
    std = np.full((len(rows_mean), width), np.nan)
    for i, (m, s) in enumerate(zip(rows_mean, rows_std)):
        mean[i, : len(m)] = m
        std[i, : len(s)] = s
    return HeadScales(list(layout.layer_ids), mean, std, granularity, source)


def learned_head_scales(
    model: nn.Module,
    adapter: str | os.PathLike | None = None,
    *,
    adapter_name: str | None = None,
    head_dim: int | None = None,
) -> HeadScales:
    """The learned scales of a SEAL adapter as a layer x head grid.

    Args:
        model: a ``PeftModel`` holding the adapter (then ``adapter`` is ``None``), or the plain base
            model the adapter folder ``adapter`` was trained on. A folder is loaded with
            :func:`seal_peft.from_pretrained` (which refuses adapters of another model with a clear
            ``ValueError``) and removed again afterwards; the model is left unchanged.
        adapter_name: which adapter of a ``PeftModel`` (default: the active one).
        head_dim: for SEAL-C adapters whose head size cannot be detected from the model.
    """
    if adapter is None:
        if not _is_peft_model(model):
            raise ValueError(
                "learned_head_scales needs an adapter: pass a PeftModel with a SEAL adapter, or the base model "
                "and the adapter folder (learned_head_scales(model, 'runs/adapters/seal-h'))"
            )
        name = adapter_name or model.active_adapter
        if isinstance(name, list):
            name = name[0]
        if name not in model.peft_config or type(model.peft_config[name]).__name__ != "SealConfig":
            raise ValueError(
                f"the model has no SEAL adapter named {name!r} (it has {list(model.peft_config)})"
            )
        return _read_scales(model, name, head_dim, source=name)

    from ..loading import from_pretrained

    if _is_peft_model(model):
        raise ValueError("pass the plain base model together with an adapter folder (or a PeftModel alone)")
    if not os.path.isdir(os.fspath(adapter)):
        raise ValueError(f"adapter {os.fspath(adapter)!r} is not a folder (a saved SEAL adapter)")
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    peft_model = from_pretrained(model, adapter, adapter_name="seal_learned")
    try:
        return _read_scales(peft_model, "seal_learned", head_dim, source=os.fspath(adapter))
    finally:
        peft_model.unload()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def scale_correlation(attribution: HeadAttribution, scales: HeadScales) -> dict[str, Any]:
    """How the learned scales relate to the attribution, over the heads both cover.

    ``spearman``: rank correlation of attribution and learned scale. ``sign_agreement``: among heads
    the training moved by more than 0.01, the fraction moved in the attribution's direction
    (up where attribution > 0, down where < 0) - 0.5 is chance.
    """
    a, s = [], []
    for i, lid in enumerate(attribution.layer_ids):
        for h in range(attribution.num_heads):
            value = attribution.mean[i, h]
            learned, _ = scales.lookup(lid, h)
            if not (math.isnan(value) or math.isnan(learned)):
                a.append(value)
                s.append(learned)
    if not a:
        raise ValueError("the attribution and the adapter share no heads (different layers?)")
    av, sv = np.array(a), np.array(s)
    moved = np.abs(sv - 1.0) > 0.01
    agree = float(np.mean(np.sign(av[moved]) == np.sign(sv[moved] - 1.0))) if moved.any() else float("nan")
    pearson = float(np.corrcoef(av, sv)[0, 1]) if av.std() > 0 and sv.std() > 0 else float("nan")
    return {
        "num_heads": len(a),
        "spearman": spearman(av, sv),
        "pearson": pearson,
        "sign_agreement": agree,
        "heads_moved": int(moved.sum()),
        "granularity": scales.granularity,
    }
