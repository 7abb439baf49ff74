"""Using the attribution to set up SEAL training: train only the top-k heads, or start from it.

Two small tools, both measured in ``docs/analysis.md`` (``benchmarks/attribution.py``):

- **Head selection**: :func:`select_heads` picks the ``k`` heads of largest |attribution| (or the
  most positive / negative); :func:`selection_config` returns a ``SealConfig`` adapting only their
  layers (``layers_to_transform`` is per layer), and :func:`restrict_to_heads` masks the gradient of
  every other head in those layers, so only the selected scales move. With AdamW and
  ``weight_decay=0`` (the recipe of ``seal_training_arguments``) a masked scale stays exactly 1.0: its
  gradient, and so both Adam moments and the update, are zero. With weight decay > 0 the decoupled
  decay would still shrink masked scales - keep it 0.
- **Attribution initialisation**: :func:`init_from_attribution` starts the scales at
  ``1 + max_change * a / max|a|`` - one normalised gradient step from the identity in the direction
  the attribution points, applied before the first training step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..tuner.config import SealConfig
from ._probe import Head, layout_of
from .attribution import SIGNS, HeadAttribution

__all__ = ["select_heads", "selection_config", "restrict_to_heads", "HeadMask", "init_from_attribution"]


def select_heads(attribution: HeadAttribution, k: int, by: str = "abs") -> list[Head]:
    """The ``k`` heads ranked first by ``by``: ``"abs"`` (largest |attribution|, both directions),
    ``"positive"`` or ``"negative"``; returned sorted by (layer, head)."""
    if by not in SIGNS:
        raise ValueError(f"by={by!r}: use one of {SIGNS}")
    total = sum(1 for _ in attribution.ranked(by))
    if not 1 <= k <= total:
        raise ValueError(f"k={k} must be between 1 and the number of heads ({total})")
    return sorted(attribution.top(k, by))


def selection_config(heads: Sequence[Head], **kwargs: Any) -> SealConfig:
    """A SEAL-H ``SealConfig`` that adapts only the layers holding ``heads``; combine with
    :func:`restrict_to_heads` to train just those heads. ``kwargs`` go to ``SealConfig``."""
    if not heads:
        raise ValueError("no heads selected")
    if kwargs.get("granularity", "head") != "head":
        raise ValueError("head selection needs granularity='head'")
    kwargs.pop("granularity", None)
    return SealConfig(granularity="head", layers_to_transform=sorted({int(h[0]) for h in heads}), **kwargs)


class HeadMask:
    """Gradient masks on SEAL scales (see :func:`restrict_to_heads`); ``remove()`` lifts them."""

    def __init__(self, handles: list[Any], heads: list[Head], masks: dict[int, torch.Tensor]):
        self._handles = handles
        self.heads = heads
        self.masks = masks  # layer id -> 0/1 mask over that layer's heads (or channels)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _adapter(peft_model: nn.Module, adapter_name: str | None) -> str:
    name = adapter_name or peft_model.active_adapter
    return name[0] if isinstance(name, list) else name


def restrict_to_heads(
    peft_model: nn.Module, heads: Sequence[Head], adapter_name: str | None = None
) -> HeadMask:
    """Zero the gradient of every SEAL scale of ``adapter_name`` except those of ``heads``.

    Works for SEAL-H and SEAL-C adapters (for SEAL-C all channels of a selected head train). Layers
    holding no selected head are frozen completely (better: leave them out with
    :func:`selection_config`). Returns a :class:`HeadMask`; the hooks live until ``remove()``.
    """
    name = _adapter(peft_model, adapter_name)
    layout, modules = layout_of(peft_model, name)
    wanted = {(int(a), int(b)) for a, b in heads}
    known = set(layout.all_heads()) if all(m.seal_group[name] > 1 for m in modules) else None
    if known is not None and wanted - known:
        raise ValueError(f"heads {sorted(wanted - known)[:3]} are not adapted by {name!r}")
    handles, masks = [], {}
    for lid, module in zip(layout.layer_ids, modules):
        param = module.seal_scale[name]
        group = module.seal_group[name]
        n_heads = param.numel() if group > 1 else None
        if n_heads is None:  # SEAL-C: heads of head_dim channels; take the head count from the heads asked
            mask = torch.zeros(param.numel())
            selected = [h for layer, h in wanted if layer == lid]
            if selected:
                per = _channels_per_head(module, peft_model)
                for h in selected:
                    mask[h * per : (h + 1) * per] = 1.0
        else:
            mask = torch.tensor([1.0 if (lid, h) in wanted else 0.0 for h in range(n_heads)])
        mask = mask.to(param.device, param.dtype)
        masks[lid] = mask
        handles.append(param.register_hook(lambda g, m=mask: g * m))
    return HeadMask(handles, sorted(wanted), masks)


def _channels_per_head(module: nn.Module, peft_model: nn.Module) -> int:
    from ..tuner.model import resolve_head_dim
    from ..tuner.utils import text_config

    return resolve_head_dim(
        SealConfig(), module.in_features, None, text_config(peft_model.get_base_model()), "o_proj"
    )


def init_from_attribution(
    peft_model: nn.Module,
    attribution: HeadAttribution,
    max_change: float = 0.1,
    heads: Sequence[Head] | None = None,
    adapter_name: str | None = None,
) -> dict[Head, float]:
    """Set the SEAL scales to ``1 + max_change * a / max|a|`` (``a`` = mean attribution per head).

    ``heads`` limits the initialisation to those heads (others stay 1). SEAL-C adapters get the head's
    value on all its channels. Returns ``{(layer, head): initial scale}`` of the changed heads.
    """
    if max_change <= 0:
        raise ValueError(f"max_change={max_change} must be > 0")
    name = _adapter(peft_model, adapter_name)
    layout, modules = layout_of(peft_model, name)
    mean = attribution.mean
    chosen = None if heads is None else {(int(a), int(b)) for a, b in heads}
    values: dict[Head, float] = {}
    for i, lid in enumerate(attribution.layer_ids):
        for h in range(attribution.num_heads):
            if (chosen is None or (lid, h) in chosen) and not math.isnan(mean[i, h]):
                values[(lid, h)] = float(mean[i, h])
    scale = max((abs(v) for v in values.values()), default=0.0)
    if scale == 0:
        raise ValueError("the attribution is zero everywhere; nothing to initialise from")
    out: dict[Head, float] = {}
    with torch.no_grad():
        for lid, module in zip(layout.layer_ids, modules):
            param = module.seal_scale[name]
            group = module.seal_group[name]
            per = 1 if group > 1 else _channels_per_head(module, peft_model)
            for (layer, h), a in values.items():
                if layer != lid:
                    continue
                v = 1.0 + max_change * a / scale
                param[h * per : (h + 1) * per] = v
                out[(layer, h)] = v
    return out
