"""Self-Extend (Jin et al. 2024) as an attention implementation registered with transformers."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..tuner.utils import get_base_model
from ._common import _SELF_EXTEND_NAMES


@dataclass
class SelfExtendState:
    """Self-Extend settings of one attention module (a plain attribute, not part of the state dict).

    ``record_positions=True`` makes every long forward store in ``stats`` the largest relative distance
    used by the neighbour scores, the largest grouped relative distance and the largest grouped query
    position (for tests and diagnostics; costs a device sync).
    """

    group: int
    window: int
    base: str  # the attention implementation that short inputs are delegated to: "sdpa" or "eager"
    rotary: Any = field(repr=False)  # the model's rotary-embedding module (for inv_freq)
    block_size: int | None = None  # queries per block of the long path; None = by memory (~64 MiB of scores)
    record_positions: bool = False
    stats: dict[str, int] = field(default_factory=dict)

def _rotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (batch, heads, n, dim) by ``delta`` (batch, n) extra RoPE positions (rotate-half layout).

    RoPE rotations compose, so a vector rotated for position ``p`` rotated again by ``g - p`` is the
    vector rotated for ``g``. Done in fp32; the model's attention scaling (YaRN) is already in ``x``.
    """
    freqs = delta.to(torch.float32)[..., None] * inv_freq.to(device=x.device, dtype=torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (batch, 1, n, dim)
    xf = x.to(torch.float32)
    half = xf.shape[-1] // 2
    rotated_half = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * emb.cos() + rotated_half * emb.sin()).to(x.dtype)

def _base_attention(state: SelfExtendState, module: nn.Module):
    if state.base == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    return sys.modules[type(module).__module__].eager_attention_forward

def _self_extend_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
):
    """Attention core with Self-Extend; registered with transformers' ``AttentionInterface``.

    ``query``/``key`` arrive rotated for their exact positions (keys: index in the cache). Up to
    ``window`` keys every distance is a neighbour distance, so the call is delegated unchanged to the
    model's original implementation (bit-identical outputs). Beyond, queries are processed in blocks:
    grouped scores for all keys, exact scores for the keys near the block, merged by distance, masked,
    one softmax.
    """
    state: SelfExtendState | None = getattr(module, "_seal_self_extend", None)
    if state is None:
        raise ValueError(
            f"{type(module).__name__} runs with the Self-Extend attention implementation but has no Self-Extend "
            f"settings; apply it with seal_peft.extension.extend_context(model, 'self_extend', ...)."
        )
    kv_len = key.shape[2]
    if kv_len <= state.window:
        return _base_attention(state, module)(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    rep = heads // kv_heads
    scaling = dim**-0.5 if scaling is None else scaling
    device = query.device
    group, window = state.group, state.window
    shift = window - window // group

    # positions: queries from position_ids (left padding shifts them), keys = index - that row's offset
    index_q = torch.arange(kv_len - q_len, kv_len, device=device)
    position_ids = kwargs.get("position_ids")
    if isinstance(position_ids, torch.Tensor) and position_ids.shape[-1] == q_len:
        pos_q = position_ids.to(device=device, dtype=torch.long).expand(batch, q_len)
    else:
        pos_q = index_q.expand(batch, q_len)
    offset = (kv_len - 1) - pos_q[:, -1:]  # (batch, 1)
    pos_k = torch.arange(kv_len, device=device)[None, :] - offset  # (batch, kv)
    group_k = torch.div(pos_k, group, rounding_mode="floor")
    group_q = torch.div(pos_q, group, rounding_mode="floor") + shift

    inv_freq = state.rotary.inv_freq
    key_grouped = _rotate(key, group_k - pos_k, inv_freq)
    query_grouped = _rotate(query, group_q - pos_q, inv_freq)

    if state.record_positions:
        dist = pos_q[:, :, None] - pos_k[:, None, :]
        used = dist >= 0
        near = used & (dist < window)
        far = used & ~near
        gdist = group_q[:, :, None] - group_k[:, None, :]
        stats = {
            "max_neighbour_distance": int(dist[near].max()) if near.any() else 0,
            "max_group_distance": int(gdist[far].max()) if far.any() else 0,
            "max_group_position": int(group_q.max()),
        }
        for k, v in stats.items():
            state.stats[k] = max(state.stats.get(k, 0), v)

    block = state.block_size or max(1, (1 << 24) // max(1, heads * kv_len))
    outputs = []
    min_value = torch.finfo(torch.float32).min
    for qs in range(0, q_len, block):
        qe = min(q_len, qs + block)
        n = qe - qs
        # keys that can be attended to (causal): up to the last query position of the block (by index)
        kend = kv_len - q_len + qe
        qg = query_grouped[:, :, qs:qe].reshape(batch, kv_heads, rep * n, dim)
        scores = torch.matmul(qg, key_grouped[:, :, :kend].transpose(2, 3)).view(batch, heads, n, kend)
        scores = scores.to(torch.float32)
        # exact scores for keys that are within the window of some query of the block
        ks = max(0, kv_len - q_len + qs - window + 1)
        qx = query[:, :, qs:qe].reshape(batch, kv_heads, rep * n, dim)
        exact = torch.matmul(qx, key[:, :, ks:kend].transpose(2, 3)).view(batch, heads, n, kend - ks)
        dist = pos_q[:, qs:qe, None] - pos_k[:, None, ks:kend]  # (batch, n, kend - ks)
        scores[..., ks:kend] = torch.where(
            (dist < window)[:, None], exact.to(torch.float32), scores[..., ks:kend]
        )
        scores = scores * scaling
        # causal (by index) + the model's mask (padding)
        allowed = index_q[qs:qe, None] >= torch.arange(kend, device=device)[None, :]
        scores = scores.masked_fill(~allowed, min_value)
        if attention_mask is not None:
            mask = attention_mask[:, :, qs:qe, :kend]
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, min_value)
            else:
                scores = scores + mask.to(torch.float32)
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        if dropout and module.training:
            probs = nn.functional.dropout(probs, p=dropout, training=True)
        pv = torch.matmul(probs.view(batch, kv_heads, rep * n, kend), value[:, :, :kend])
        outputs.append(pv.view(batch, heads, n, -1))
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return out.transpose(1, 2).contiguous(), None

def _register_self_extend() -> None:
    """Register the Self-Extend attention (and its mask builders) with transformers; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    masks = {"sdpa": sdpa_mask, "eager": eager_mask}
    for base, name in _SELF_EXTEND_NAMES.items():
        AttentionInterface.register(name, _self_extend_attention)
        AttentionMaskInterface.register(name, masks[base])

def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [
        m
        for m in model.modules()
        if type(m).__name__.endswith("Attention") and hasattr(m, "o_proj") and hasattr(m, "layer_idx")
    ]

def _apply_self_extend(model: nn.Module, config, record: Mapping[str, Any]) -> None:
    current = config._attn_implementation
    base = next((b for b, n in _SELF_EXTEND_NAMES.items() if n == current), current)
    if base not in _SELF_EXTEND_NAMES:
        raise ValueError(
            f"Self-Extend here works with the 'sdpa' and 'eager' attention implementations; this model uses "
            f"{current!r}. Load it with attn_implementation='sdpa' (or call model.set_attn_implementation('sdpa'))."
        )
    rotary = [
        m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding") and hasattr(m, "inv_freq")
    ]
    attention = _attention_modules(model)
    if len(rotary) != 1 or not attention:
        raise ValueError(
            f"Self-Extend needs one rotary-embedding module and Llama-style attention modules; found "
            f"{len(rotary)} rotary module(s) and {len(attention)} attention module(s) in {type(model).__name__}."
        )
    _register_self_extend()
    for module in attention:
        module._seal_self_extend = SelfExtendState(
            group=int(record["factor"]), window=int(record["window"]), base=base, rotary=rotary[0]
        )
    model.set_attn_implementation(_SELF_EXTEND_NAMES[base])

def self_extend_states(model: nn.Module) -> list[SelfExtendState]:
    """The Self-Extend settings of every attention module of ``model`` (empty when not applied)."""
    return [
        m._seal_self_extend
        for m in _attention_modules(get_base_model(model))
        if getattr(m, "_seal_self_extend", None) is not None
    ]

