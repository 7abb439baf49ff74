"""Self-Extend (Jin et al. 2024) as an attention implementation registered with transformers."""

from __future__ import annotations

import sys
import weakref
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

    ``impl`` chooses the attention core beyond the window: ``"fused"`` (default) runs a neighbour pass
    and a grouped pass through PyTorch's fused CPU flash-attention kernel and merges them by their
    log-sum-exp, with memory linear in the length; ``"reference"`` is the original eager formulation
    (grouped and exact scores for a block of queries, merged by distance, one softmax). ``"fused"`` uses
    the reference where the fused kernel does not apply (not on CPU, gradients or dropout needed, position
    ids that are not the cache index minus a per-row offset); ``path_counts`` counts which core ran.

    ``record_positions=True`` makes every long forward store in ``stats`` the largest relative distance
    used by the neighbour scores, the largest grouped relative distance and the largest grouped query
    position (for tests and diagnostics; costs a device sync and O(queries x keys) memory).
    """

    group: int
    window: int
    base: str  # the attention implementation that short inputs are delegated to: "sdpa" or "eager"
    rotary: Any = field(repr=False)  # the model's rotary-embedding module (for inv_freq)
    block_size: int | None = None  # queries per block of the blocked paths; None = by memory
    record_positions: bool = False
    stats: dict[str, int] = field(default_factory=dict)
    impl: str = "fused"  # "fused" or "reference"
    path_counts: dict[str, int] = field(default_factory=dict, repr=False)
    # grouped keys of the previous decode step (see _GroupedKeyCache); never saved
    grouped_cache: Any = field(default_factory=lambda: _GroupedKeyCache(), repr=False, compare=False)


_IMPLS = ("fused", "reference")
_HOOK = "_seal_self_extend_hook"  # attribute holding the forward pre-hook handle (KV-cache layer capture)


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


def _count(state: SelfExtendState, path: str) -> None:
    state.path_counts[path] = state.path_counts.get(path, 0) + 1


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
    model's original implementation (bit-identical outputs). Beyond, the fused core (or the reference,
    ``SelfExtendState.impl``) computes Self-Extend attention.
    """
    state: SelfExtendState | None = getattr(module, "_seal_self_extend", None)
    if state is None:
        raise ValueError(
            f"{type(module).__name__} runs with the Self-Extend attention implementation but has no Self-Extend "
            f"settings; apply it with seal_peft.extension.extend_context(model, 'self_extend', ...)."
        )
    if state.impl not in _IMPLS:
        raise ValueError(
            f"SelfExtendState.impl={state.impl!r} is not a Self-Extend implementation; use one of {_IMPLS} "
            f"('fused' is the default, 'reference' the original eager formulation)."
        )
    kv_len = key.shape[2]
    if kv_len <= state.window:
        _count(state, "base")
        return _base_attention(state, module)(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    batch, heads, q_len, dim = query.shape
    scaling = dim**-0.5 if scaling is None else scaling
    device = query.device

    # positions: queries from position_ids (left padding shifts them), keys = index - that row's offset
    index_q = torch.arange(kv_len - q_len, kv_len, device=device)
    position_ids = kwargs.get("position_ids")
    if isinstance(position_ids, torch.Tensor) and position_ids.shape[-1] == q_len:
        pos_q = position_ids.to(device=device, dtype=torch.long).expand(batch, q_len)
    else:
        pos_q = index_q.expand(batch, q_len)
    offset = (kv_len - 1) - pos_q[:, -1:]  # (batch, 1)
    # key positions: torch.arange(kv_len) - offset (built only where needed)
    if state.record_positions:
        _record_positions(state, pos_q, _key_positions(offset, 0, kv_len))

    core = _reference_core
    if state.impl == "fused" and _fused_applies(query, key, value, attention_mask, dropout, module):
        if q_len == 1 or _positions_are_offsets(pos_q, index_q, offset, attention_mask):
            core = _fused_core
    _count(state, "fused" if core is _fused_core else "reference")
    out = core(state, query, key, value, attention_mask, scaling, dropout, module, index_q, pos_q, offset)
    if isinstance(state.grouped_cache, _GroupedKeyCache):
        state.grouped_cache.current = None
    return out.transpose(1, 2).contiguous(), None


def _key_positions(offset: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Positions of the cache entries ``[start, end)``: index - the row's offset, (batch, end - start)."""
    return torch.arange(start, end, device=offset.device)[None, :] - offset


def _record_positions(state: SelfExtendState, pos_q: torch.Tensor, pos_k: torch.Tensor) -> None:
    group, window = state.group, state.window
    group_k = torch.div(pos_k, group, rounding_mode="floor")
    group_q = torch.div(pos_q, group, rounding_mode="floor") + (window - window // group)
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


def _reference_core(
    state, query, key, value, attention_mask, scaling, dropout, module, index_q, pos_q, offset
):
    """The original formulation: for a block of queries, grouped scores for all keys (re-rotated queries
    and keys), exact scores for the keys within ``window`` of the block, merged by distance, masked,
    one fp32 softmax. Memory O(heads x block x keys) per block; kept as the reference of the fused core."""
    batch, heads, q_len, dim = query.shape
    kv_len, kv_heads = key.shape[2], key.shape[1]
    rep = heads // kv_heads
    device = query.device
    group, window = state.group, state.window
    shift = window - window // group
    pos_k = _key_positions(offset, 0, kv_len)
    group_k = torch.div(pos_k, group, rounding_mode="floor")
    group_q = torch.div(pos_q, group, rounding_mode="floor") + shift

    inv_freq = state.rotary.inv_freq
    key_grouped = _rotate(key, group_k - pos_k, inv_freq)
    query_grouped = _rotate(query, group_q - pos_q, inv_freq)

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
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)


# ------------------------------------------------------------------------------------------ fused core
#
# Query i (cache index) and key j are at distance i - j (positions = index - a per-row offset). Self-Extend
# attention of query i is one softmax over two disjoint key sets:
#   neighbour keys  i - window < j <= i   scored with the exact rotations,
#   far keys        j <= i - window       scored with the grouped rotations.
# Each set goes through the fused kernel, which returns the normalised output o and the log-sum-exp l of the
# scores; the softmax over the union is  (o1 e^l1 + o2 e^l2) / (e^l1 + e^l2)  (computed with the larger l
# subtracted; a set without keys has l = -inf and weight 0). Nothing of size queries x keys is built:
#   prefill (no mask): the far set is causal attention shifted by `window` (queries [W, L) against keys
#     [0, L - W), one is_causal call); the neighbour set is cut into query blocks of `window` rows: keys of the
#     same block (causal, is_causal) and of the previous block (key c of the previous block is a neighbour of
#     row r iff c > r: causal after reversing both, so is_causal again).
#   anything else (padding masks, chunked prefill, decode): query blocks of bounded size, each with the
#     neighbour keys of the block and the far keys before it, with explicit masks of block x keys.


def _fused_applies(query, key, value, attention_mask, dropout, module) -> bool:
    if query.device.type != "cpu" or not hasattr(
        torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"
    ):
        return False
    if dropout and module.training:
        return False
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return False  # the kernel's log-sum-exp has no gradient; training uses the reference
    if query.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return attention_mask is None or attention_mask.dim() == 4


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min


def _positions_are_offsets(pos_q, index_q, offset, attention_mask) -> bool:
    """Whether every query row that attends to anything sits at ``index - offset`` (then distances are
    index differences, which the fused core relies on). Rows the mask hides entirely (left padding,
    whose position ids transformers sets to 1) do not count."""
    bad = pos_q != index_q[None, :] - offset
    if not bool(bad.any()):
        return True
    if attention_mask is None:
        return False
    rows = bad.nonzero()
    visible = _allowed(attention_mask[rows[:, 0], :, rows[:, 1]]).any()
    return not bool(visible)


def _flash(q, k, v, scale, mask=None, causal=False):
    """(out, lse) of the fused kernel; lse in fp32, shape (batch, heads, queries)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=mask, scale=scale
    )
    return out, lse


def _merge_weights(lses):
    """Softmax weights of disjoint key sets from their log-sum-exps (fp32); a set without keys gets 0."""
    top = lses[0]
    for lse in lses[1:]:
        top = torch.maximum(top, lse)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    exps = [torch.exp(lse - top) for lse in lses]
    den = exps[0]
    for e in exps[1:]:
        den = den + e
    den = den.clamp_min(torch.finfo(torch.float32).tiny)
    return [e / den for e in exps]


def _merge_into(dst: torch.Tensor, parts) -> torch.Tensor:
    """Write into ``dst`` the softmax over the union of disjoint key sets, from each set's (normalised
    output, log-sum-exp): sum_i o_i e^{l_i} / sum_i e^{l_i}, with the largest l subtracted first."""
    weights = _merge_weights([lse for _, lse in parts])
    torch.mul(parts[0][0], weights[0][..., None], out=dst)
    for (out, _), w in zip(parts[1:], weights[1:]):
        dst.addcmul_(out, w[..., None])
    return dst


def _merge(parts) -> torch.Tensor:
    """:func:`_merge_into` a new fp32 tensor."""
    out = parts[0][0]
    return _merge_into(torch.empty(out.shape, dtype=torch.float32, device=out.device), parts)


def _blocks(x: torch.Tensor, nb: int, size: int) -> torch.Tensor:
    """(B, h, >= nb*size, D) -> (B*nb, h, size, D): blocks of the sequence as batch entries."""
    b, h, _, d = x.shape
    return x[:, :, : nb * size].unflatten(2, (nb, size)).transpose(1, 2).reshape(b * nb, h, size, d)


def _unblocks(y: torch.Tensor, batch: int) -> torch.Tensor:
    """Inverse of :func:`_blocks` for outputs (B*nb, h, size, ...) -> (B, h, nb*size, ...)."""
    y = y.unflatten(0, (batch, -1)).transpose(1, 2)
    return y.flatten(2, 3)


def _grouped_rotations(state, query, key, pos_q, offset, q_rows: slice, k_end: int):
    """Grouped queries (rows ``q_rows``) and grouped keys ``[0, k_end)``, rotated exactly as the reference."""
    group, window = state.group, state.window
    shift = window - window // group
    pq = pos_q[:, q_rows]
    delta = torch.div(pq, group, rounding_mode="floor") + shift - pq
    qg = _rotate_into(query[:, :, q_rows], delta, state.rotary.inv_freq)
    return qg, _grouped_keys(state, key, offset, k_end)


def _rotate_into(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor, out=None) -> torch.Tensor:
    """:func:`_rotate` (same fp32 arithmetic on each half, no concatenations), optionally into ``out``."""
    freqs = delta.to(torch.float32)[..., None] * inv_freq.to(device=x.device, dtype=torch.float32)
    cos, sin = freqs.cos()[:, None], freqs.sin()[:, None]  # (batch, 1, n, dim / 2)
    half = x.shape[-1] // 2
    direct = out is not None and out.dtype == torch.float32
    res = out if direct else torch.empty(x.shape, dtype=torch.float32, device=x.device)
    x1, x2, r1, r2 = x[..., :half], x[..., half:], res[..., :half], res[..., half:]
    torch.mul(x1, cos, out=r1)
    r1.addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=r2)
    r2.addcmul_(x1, sin)
    if direct:
        return res
    if out is not None:
        return out.copy_(res)
    return res.to(x.dtype)


def _key_rotation(state, key, offset, start, end, out=None):
    pk = _key_positions(offset, start, end)
    delta = torch.div(pk, state.group, rounding_mode="floor") - pk
    return _rotate_into(key[:, :, start:end], delta, state.rotary.inv_freq, out)


class _GroupedKeys:
    """Grouped keys of one KV-cache layer, reused by the next decode step (one per cache layer)."""

    __slots__ = ("buf", "n", "source", "version", "offset", "settings")


class _GroupedKeyCache:
    """Grouped keys kept between calls of one attention module, so decoding re-rotates only new keys.

    A key's grouped rotation depends only on its position, but the keys arrive from the KV cache as a new
    tensor every step, so reuse must be proven: a forward pre-hook (:func:`_capture_cache`) looks at the
    module's transformers ``DynamicLayer`` *before* it is updated; its keys tensor must be the very tensor
    (same object, same in-place version counter) the stored grouped keys were computed from. A
    ``DynamicLayer`` update only appends (``torch.cat``), so the old keys are then a prefix of the new ones;
    a subclass with ``seal_append_only = True`` promises the same (the evaluator's reserved-room layer).
    Beam-search reordering, cropping, a new cache or any other cache class replace or bypass that tensor and
    the grouped keys are recomputed. Entries live as long as their cache layer (weak keys); never saved.
    Under ``torch.inference_mode`` (the evaluator's) tensors have no version counter, so there only the
    identity and the layer type are checked (:func:`_version`).
    """

    def __init__(self) -> None:
        self.entries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.current: tuple | None = None

    def __deepcopy__(self, memo):  # a copied model starts with an empty cache
        return _GroupedKeyCache()

    def __getstate__(self):
        return {}

    def __setstate__(self, _state) -> None:
        self.__init__()

    def capture(self, cache: Any, layer_idx: Any) -> None:
        """Note ``cache``'s layer ``layer_idx`` (if a ``DynamicLayer``) and whether its keys are still the
        tensor the stored grouped keys came from; called before the layer is updated."""
        self.current = None
        layers = getattr(cache, "layers", None)
        if not isinstance(layer_idx, int) or not isinstance(layers, list) or layer_idx >= len(layers):
            return
        from transformers.cache_utils import DynamicLayer

        layer = layers[layer_idx]
        # DynamicLayer's update appends (torch.cat); subclasses must say they keep held positions as they are
        if type(layer) is not DynamicLayer and not getattr(type(layer), "seal_append_only", False):
            return
        before = layer.keys if getattr(layer, "is_initialized", False) else None
        entry = self.entries.get(layer)
        prefix = (
            entry is not None
            and before is not None
            and entry.source() is before
            and _version(before) == entry.version
        )
        self.current = (weakref.ref(layer), prefix)

    def take(self, key: torch.Tensor):
        """The cache layer captured for this call and its reusable entry (or None). The layer must hold
        ``key`` itself (what ``DynamicLayer.update`` returns), so a capture that belongs to another call
        (another thread, a direct call of the attention function) is never used."""
        current, self.current = self.current, None
        if current is None:
            return None, None
        ref, prefix = current
        layer = ref()
        if layer is None or getattr(layer, "keys", None) is not key:
            return None, None
        return layer, (self.entries.get(layer) if prefix else None)


def _version(t: torch.Tensor) -> int | None:
    """``t``'s in-place version counter; ``None`` for a tensor made under ``torch.inference_mode`` (it has
    none). There the proof of reuse rests on the tensor's identity and the cache layer's type alone: neither
    ``DynamicLayer`` nor an append-only layer writes a position it already holds."""
    return None if t.is_inference() else t._version


def _capture_cache(module: nn.Module, args, kwargs) -> None:
    """Forward pre-hook of a Self-Extend attention module: note its KV-cache layer before the update."""
    state = getattr(module, "_seal_self_extend", None)
    if state is not None and isinstance(state.grouped_cache, _GroupedKeyCache):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        state.grouped_cache.capture(cache, getattr(module, "layer_idx", None))


def _grouped_keys(state, key, offset, k_end):
    """Grouped keys ``[0, k_end)``; reuses (and extends) those of the previous step when provably valid."""
    store = state.grouped_cache if isinstance(state.grouped_cache, _GroupedKeyCache) else None
    layer, entry = store.take(key) if store is not None else (None, None)
    if layer is None:
        return _key_rotation(state, key, offset, 0, k_end)
    inv_freq = state.rotary.inv_freq
    settings = (state.group, key.dtype, key.shape[:2], inv_freq.data_ptr(), _version(inv_freq))
    start = 0
    if entry is not None and entry.settings == settings and torch.equal(entry.offset, offset):
        start = min(entry.n, k_end)
        _count(state, "grouped_keys_reused")
    else:
        entry = _GroupedKeys()
        entry.buf, entry.n, entry.settings, entry.offset = None, 0, settings, offset.clone()
    if start < k_end:
        if entry.buf is None or entry.buf.shape[2] < k_end:
            grown = key.new_empty(*key.shape[:2], k_end + max(256, k_end // 16), key.shape[3])
            if start:
                grown[:, :, :start] = entry.buf[:, :, :start]
            entry.buf = grown
        _key_rotation(state, key, offset, start, k_end, out=entry.buf[:, :, start:k_end])
    entry.n = k_end
    entry.source, entry.version = weakref.ref(key), _version(key)
    store.entries[layer] = entry
    return entry.buf[:, :, :k_end]


def _fused_core(state, query, key, value, attention_mask, scaling, dropout, module, index_q, pos_q, offset):
    q_len, kv_len = query.shape[2], key.shape[2]
    if q_len == 1 and state.block_size is None:
        return _fused_decode(state, query, key, value, attention_mask, scaling, pos_q, offset)
    if attention_mask is None and q_len == kv_len and state.block_size is None:
        _count(state, "fused_prefill")
        return _fused_prefill(state, query, key, value, scaling, pos_q, offset)
    return _fused_blocked(state, query, key, value, attention_mask, scaling, index_q, pos_q, offset)


def _fused_decode(state, query, key, value, attention_mask, scaling, pos_q, offset) -> torch.Tensor:
    """One query (the last cache index): neighbours = the last ``window`` keys, far keys = all before them.
    Both passes are plain kernel calls (the model's mask, if any, sliced); two sets merge as a lerp."""
    kv_len, w = key.shape[2], state.window
    k_end = kv_len - w
    qg, kg = _grouped_rotations(state, query, key, pos_q, offset, slice(0, 1), k_end)
    near = far = None
    if attention_mask is not None:
        dtype = query.dtype
        low = torch.finfo(dtype).min
        mask = attention_mask[:, :, -1:, :kv_len]
        if mask.dtype == torch.bool:
            add = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, low)
        else:
            add = mask.to(dtype).clamp_min(low)
        near, far = add[..., k_end:], add[..., :k_end]
    o1, l1 = _flash(query, key[:, :, k_end:], value[:, :, k_end:], scaling, near)
    o2, l2 = _flash(qg, kg, value[:, :, :k_end], scaling, far)
    # softmax over both sets: weight of the neighbours = e^l1 / (e^l1 + e^l2) = sigmoid(l1 - l2)
    out = torch.lerp(o2.to(torch.float32), o1.to(torch.float32), torch.sigmoid(l1 - l2)[..., None])
    return out.to(value.dtype)


def _fused_prefill(state, query, key, value, scaling, pos_q, offset) -> torch.Tensor:
    """Causal prefill without a mask (queries = keys = [0, L), L > window). Returns (B, H, L, D), a view of
    a (B, L, H, D) buffer (the layout transformers wants next). The passes run one after the other and are
    merged into that buffer as they finish, so at most about four (B, H, L, D) buffers are alive."""
    batch, heads, length, dim = query.shape
    w = state.window
    nb, tail = divmod(length, w)
    dtype, device = query.dtype, query.device
    # far keys, grouped positions: query i sees keys j <= i - w, i.e. causal between [w, L) and [0, L - w)
    qg, kg = _grouped_rotations(state, query, key, pos_q, offset, slice(w, length), length - w)
    og, lg = _flash(qg, kg, value[:, :, : length - w], scaling, causal=True)  # rows w.. of the output
    del qg, kg
    # neighbour keys in the query's own block: causal (all blocks in one call, as batch entries)
    od, ld = _flash(_blocks(query, nb, w), _blocks(key, nb, w), _blocks(value, nb, w), scaling, causal=True)
    od, ld = od.unflatten(0, (batch, nb)), ld.unflatten(0, (batch, nb))  # (B, nb, H, w, D), (B, nb, H, w)
    final = torch.empty(batch, length, heads, dim, dtype=value.dtype, device=device)
    acc = (
        final
        if value.dtype == torch.float32
        else torch.empty(final.shape, dtype=torch.float32, device=device)
    )
    acc5 = acc[:, : nb * w].unflatten(1, (nb, w)).transpose(2, 3)  # (B, nb, H, w, D) view
    acc5[:, 0] = od[:, 0]  # the first block has neither earlier neighbours nor far keys
    far_tail = (og[:, :, (nb - 1) * w :].clone(), lg[:, :, (nb - 1) * w :].clone()) if tail else None
    if nb > 1:
        og5 = og[:, :, : (nb - 1) * w].unflatten(2, (nb - 1, w)).transpose(1, 2)
        lg4 = lg[:, :, : (nb - 1) * w].unflatten(2, (nb - 1, w)).transpose(1, 2)
        _merge_into(acc5[:, 1:], [(od[:, 1:], ld[:, 1:]), (og5, lg4)])
        lse = torch.logaddexp(ld[:, 1:], lg4)  # of the keys merged so far
        del og5, lg4
    del og, lg, od, ld
    if nb > 1:
        # neighbour keys in the previous block: key c is a neighbour of row r iff c > r. Reversing rows and
        # keys makes that causal (row r' = w-1-r sees key c' = w-1-c iff c' < r': rows 1.. against keys ..w-2)
        qf = _blocks(query[:, :, w:], nb - 1, w).flip(2)[:, :, 1:]
        kf = _blocks(key, nb - 1, w).flip(2)[:, :, : w - 1]
        vf = _blocks(value, nb - 1, w).flip(2)[:, :, : w - 1]
        o, lo = _flash(qf, kf, vf, scaling, causal=True)
        del qf, kf, vf
        # back in row order; row w-1 of a block has no neighbour in the previous block (weight 0)
        op = o.new_empty(batch, nb - 1, heads, w, dim)
        op[..., : w - 1, :] = o.unflatten(0, (batch, nb - 1)).flip(3)
        op[..., w - 1, :] = 0
        del o
        lp = lo.new_empty(batch, nb - 1, heads, w)
        lp[..., : w - 1] = lo.unflatten(0, (batch, nb - 1)).flip(3)
        lp[..., w - 1] = float("-inf")
        _merge_into(acc5[:, 1:], [(acc5[:, 1:], lse), (op, lp)])
        del op, lp, lse
    if tail:  # the last, partial block: its own keys (causal), the block before (explicit mask), far keys
        t0 = nb * w
        parts = [_flash(query[:, :, t0:], key[:, :, t0:], value[:, :, t0:], scaling, causal=True)]
        r = torch.arange(tail, device=device)[:, None]
        c = torch.arange(w, device=device)[None, :]
        mask = torch.zeros(tail, w, dtype=dtype, device=device).masked_fill(c <= r, torch.finfo(dtype).min)
        ks = t0 - w
        parts.append(_flash(query[:, :, t0:], key[:, :, ks:t0], value[:, :, ks:t0], scaling, mask=mask))
        parts.append(far_tail)
        _merge_into(acc[:, t0:].transpose(1, 2), parts)
    if acc is not final:
        final.copy_(acc)
    return final.transpose(1, 2)


def _fused_blocked(state, query, key, value, attention_mask, scaling, index_q, pos_q, offset) -> torch.Tensor:
    """Any other call (masks, chunked prefill, decode): query blocks, explicit masks of block x keys."""
    batch, heads, q_len, dim = query.shape
    kv_len = key.shape[2]
    w = state.window
    dtype, device = query.dtype, query.device
    low = torch.finfo(dtype).min
    k_end = kv_len - w  # far keys of the last query: [0, kv_len - w)
    qg, kg = _grouped_rotations(state, query, key, pos_q, offset, slice(0, q_len), max(k_end, 0))
    block = state.block_size or max(1, min(q_len, (1 << 22) // max(1, batch * kv_len)))
    outputs = []
    for qs in range(0, q_len, block):
        qe = min(q_len, qs + block)
        i = index_q[qs:qe, None]
        first, last = int(index_q[qs]), int(index_q[qe - 1])
        parts = []
        # neighbours: keys (first - w, last]
        e0 = max(0, first - w + 1)
        j = torch.arange(e0, last + 1, device=device)[None, :]
        ok = (i >= j) & (i - j < w)
        mask = _block_mask(ok, attention_mask, qs, qe, e0, last + 1, dtype, low)
        parts.append(
            _flash(query[:, :, qs:qe], key[:, :, e0 : last + 1], value[:, :, e0 : last + 1], scaling, mask)
        )
        # far keys: [0, last - w]
        g1 = last - w + 1
        if g1 > 0:
            j = torch.arange(g1, device=device)[None, :]
            mask = _block_mask(i - j >= w, attention_mask, qs, qe, 0, g1, dtype, low)
            parts.append(_flash(qg[:, :, qs:qe], kg[:, :, :g1], value[:, :, :g1], scaling, mask))
        outputs.append(_merge(parts).to(value.dtype))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)


def _block_mask(ok, attention_mask, qs, qe, ks, ke, dtype, low):
    """Additive mask (0 / dtype min) for one block: structural ``ok`` (queries x keys) and the model's mask.
    The min value, not -inf, keeps the kernel's log-sum-exp of a fully hidden row at about ``min``, so that
    row gets weight 0 in the merge (with -inf the kernel reports lse 0)."""
    if attention_mask is None:
        if bool(ok.all()):
            return None
        return torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill(~ok, low)
    model = attention_mask[:, :, qs:qe, ks:ke]
    if model.dtype == torch.bool:
        return torch.zeros(model.shape, dtype=dtype, device=ok.device).masked_fill(~(model & ok), low)
    return torch.where(ok, model.to(dtype).clamp_min(low), torch.tensor(low, dtype=dtype, device=ok.device))


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
        if getattr(module, _HOOK, None) is None:
            setattr(module, _HOOK, module.register_forward_pre_hook(_capture_cache, with_kwargs=True))
    model.set_attn_implementation(_SELF_EXTEND_NAMES[base])


def _detach_self_extend(module: nn.Module) -> None:
    """Remove Self-Extend's settings and cache hook from one attention module (``remove_extension``)."""
    if getattr(module, "_seal_self_extend", None) is not None:
        del module._seal_self_extend
    handle = getattr(module, _HOOK, None)
    if handle is not None:
        handle.remove()
        delattr(module, _HOOK)


def self_extend_states(model: nn.Module) -> list[SelfExtendState]:
    """The Self-Extend settings of every attention module of ``model`` (empty when not applied)."""
    return [
        m._seal_self_extend
        for m in _attention_modules(get_base_model(model))
        if getattr(m, "_seal_self_extend", None) is not None
    ]
