"""Training-free context extension, usable under a SEAL adapter (paper section on context extension).

One call extends an already loaded model's usable context::

    from seal_peft.extension import extend_context

    extend_context(model, "ntk", factor=2)                        # static NTK-aware RoPE base scaling
    extend_context(model, "dynamic_ntk", factor=2)                # transformers' "dynamic" RoPE
    extend_context(model, "yarn", factor=2)                       # transformers' "yarn" RoPE
    extend_context(model, "self_extend", factor=4, window=1024)   # Self-Extend: group size 4

Methods:

- ``"ntk"``: the RoPE base becomes ``theta * factor ** (d / (d - 2))`` (``d`` = rotary dim), so the
  lowest frequency stretches over ``factor`` times the native window. transformers has no static
  NTK type, so this is a change of ``rope_parameters["rope_theta"]``.
- ``"dynamic_ntk"`` / ``"yarn"``: transformers' own ``rope_type="dynamic"`` / ``"yarn"``
  (``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS``) written into ``config.rope_parameters``.
- ``"self_extend"``: Self-Extend (Jin et al. 2024) as an attention implementation registered with
  transformers (``AttentionInterface``). Key ``j`` seen from query ``i`` keeps its exact relative
  position when ``i - j < window``; farther keys use grouped positions: the query sits at
  ``i // group + window - window // group`` and the key at ``j // group``, so the two regions meet at the
  window edge. Both scores are computed and merged by distance before one softmax. Only the attention
  core is replaced; ``o_proj`` (and the SEAL scales on it) is untouched.

For the three RoPE methods the rotary-embedding module is rebuilt from the changed config, so the change
takes effect on a model that is already loaded (and under a ``PeftModel``).

The extension is recorded as a small dict (``{"method": "ntk", "factor": 2.0}``; Self-Extend adds
``"window"``) in ``model.config.seal_extension`` and, when ``extend_context`` is called on a
``PeftModel`` (or :func:`record_extension` is called), in every SEAL adapter's
``SealConfig.extension``, which ``save_pretrained`` writes to ``adapter_config.json``.
Reloading applies it with :func:`from_pretrained` (or :func:`apply_from_config` before
``seal_peft.from_pretrained``); see ``docs/extension.md``.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .tuner.config import EXTENSION_METHODS

__all__ = [
    "EXTENSION_METHODS",
    "SELF_EXTEND_MODEL_TYPES",
    "SelfExtendState",
    "apply_from_config",
    "extend_context",
    "extended_context_length",
    "extension_of",
    "from_pretrained",
    "parse_extend",
    "record_extension",
]

#: Model types whose attention Self-Extend supports: RoPE on the full head with the rotate-half layout,
#: rotation applied before the attention core (so the core can re-rotate), no soft-capping.
SELF_EXTEND_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3")

_SELF_EXTEND_NAMES = {"sdpa": "seal_self_extend_sdpa", "eager": "seal_self_extend_eager"}
_OPTIONS = {
    "ntk": (),
    "dynamic_ntk": (),
    "yarn": ("attention_factor", "beta_fast", "beta_slow"),
    "self_extend": ("window",),
}
_ORIGINAL = "_seal_extension_original"  # plain attribute on the transformers model: what to restore


# --------------------------------------------------------------------------------------------- helpers
def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a ``PeftModel`` (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _text_config(model: nn.Module):
    config = model.config
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _rotary_dim(config) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    return int(
        head_dim * rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0) or 1.0)
    )


def _native_window(config) -> int:
    original = getattr(config, "seal_extension", None)
    if isinstance(original, Mapping) and "native_max_position_embeddings" in original:
        return int(original["native_max_position_embeddings"])
    return int(config.max_position_embeddings)


def _check_factor(method: str, factor: Any) -> float:
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor):
        raise TypeError(f"extend_context(method={method!r}): factor must be a number > 1, got {factor!r}.")
    if factor <= 1:
        raise ValueError(
            f"extend_context(method={method!r}): factor={factor!r} does not extend anything; use a factor > 1 "
            f"(e.g. 2 to double an 8K window to 16K; for self_extend the group size, e.g. 4)."
        )
    if method == "self_extend" and int(factor) != factor:
        raise ValueError(
            f"extend_context('self_extend'): factor is the group size and must be an integer > 1, got {factor!r}."
        )
    return float(factor)


def _normalise(method: Any, factor: Any, opts: Mapping[str, Any], config) -> dict[str, Any]:
    """Validate one extension request and return its record (the dict stored with the adapter)."""
    if method not in EXTENSION_METHODS:
        raise ValueError(
            f"unknown context-extension method {method!r}; use one of {', '.join(EXTENSION_METHODS)}."
        )
    factor = _check_factor(method, factor)
    unknown = set(opts) - set(_OPTIONS[method])
    if unknown:
        allowed = ", ".join(_OPTIONS[method]) or "none"
        raise ValueError(
            f"extend_context({method!r}) got unknown option(s) {sorted(unknown)}; options of {method!r}: {allowed}."
        )
    record: dict[str, Any] = {"method": method, "factor": factor}
    native = _native_window(config)
    if method == "self_extend":
        model_type = getattr(config, "model_type", None)
        if model_type not in SELF_EXTEND_MODEL_TYPES:
            raise ValueError(
                f"Self-Extend is implemented for model types {', '.join(SELF_EXTEND_MODEL_TYPES)}; this model is "
                f"{model_type!r}. Use a RoPE method instead (extend_context(model, 'ntk' | 'dynamic_ntk' | 'yarn'))."
            )
        window = opts.get("window")
        if window is None:
            window = min(1024, native // 4)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(
                f"Self-Extend window must be a positive integer number of tokens, got {window!r}."
            )
        if window >= native:
            raise ValueError(
                f"Self-Extend window={window} must be smaller than the model's native window "
                f"max_position_embeddings={native}: the neighbour tokens keep exact positions, and the grouped "
                f"positions of the far tokens start at the window edge. Use e.g. window={min(1024, native // 4)}."
            )
        if window < factor:
            raise ValueError(
                f"Self-Extend window={window} must be at least the group size {int(factor)}; use a larger window."
            )
        record["factor"] = int(factor)
        record["window"] = window
    else:
        rope = getattr(config, "rope_parameters", None)
        if not isinstance(rope, Mapping) or "rope_theta" not in rope:
            raise ValueError(
                f"extend_context({method!r}) needs a RoPE model (config.rope_parameters with rope_theta); "
                f"{type(config).__name__} has none."
            )
        for key in _OPTIONS[method]:
            if opts.get(key) is not None:
                value = opts[key]
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise TypeError(f"extend_context({method!r}): {key} must be a number, got {value!r}.")
                record[key] = float(value)
    return record


def extension_of(model: nn.Module) -> dict[str, Any] | None:
    """The extension applied to ``model`` (a ``PeftModel`` or transformers model), or ``None``."""
    record = getattr(_text_config(_base_model(model)), "seal_extension", None)
    if not isinstance(record, Mapping):
        return None
    return {k: v for k, v in record.items() if k != "native_max_position_embeddings"}


def extended_context_length(model: nn.Module) -> int:
    """Tokens the (extended) model is meant to handle.

    RoPE methods: ``native * factor``. Self-Extend: the longest input whose grouped positions stay
    inside the native window, ``(native - window + window // group) * group``. Unextended: native.
    """
    config = _text_config(_base_model(model))
    native = _native_window(config)
    record = extension_of(model)
    if record is None:
        return native
    if record["method"] == "self_extend":
        group, window = int(record["factor"]), int(record["window"])
        return (native - window + window // group) * group
    return int(native * record["factor"])


# ------------------------------------------------------------------------------------------ RoPE methods
def _rebuild_rotary(model: nn.Module, config) -> int:
    """Re-create every rotary-embedding module from ``config`` (same class, same device). Returns how many."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if (
            not name
            or not type(module).__name__.endswith("RotaryEmbedding")
            or not hasattr(module, "inv_freq")
        ):
            continue
        cls = type(module)
        params = inspect.signature(cls.__init__).parameters
        kwargs: dict[str, Any] = {"config": config}
        device = module.inv_freq.device
        if "device" in params:
            kwargs["device"] = device
        new = cls(**kwargs).to(device)
        new.train(module.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        replaced += 1
    if not replaced:
        raise ValueError(
            f"{type(model).__name__} has no rotary-embedding module (a '*RotaryEmbedding' with inv_freq) to "
            f"re-initialise; RoPE context extension needs a RoPE model."
        )
    return replaced


def _apply_rope(model: nn.Module, config, record: Mapping[str, Any]) -> None:
    method, factor = record["method"], float(record["factor"])
    native = int(config.max_position_embeddings)
    rope = dict(config.rope_parameters)
    theta = float(rope["rope_theta"])
    if rope.get("rope_type", "default") != "default":
        raise ValueError(
            f"this model already uses rope_type={rope['rope_type']!r}; extend_context applies NTK / dynamic NTK / "
            f"YaRN on top of plain RoPE only. Load the model without rope scaling first."
        )
    if method == "ntk":
        dim = _rotary_dim(config)
        rope["rope_theta"] = theta * factor ** (dim / (dim - 2))
        config.max_position_embeddings = int(native * factor)
    elif method == "dynamic_ntk":
        # transformers rescales the base once the input is longer than max_position_embeddings, which must
        # therefore stay the native window.
        rope.update(rope_type="dynamic", factor=factor)
    else:  # yarn
        rope.update(rope_type="yarn", factor=factor, original_max_position_embeddings=native)
        for key in _OPTIONS["yarn"]:
            if key in record:
                rope[key] = float(record[key])
        config.max_position_embeddings = int(native * factor)
    config.rope_parameters = rope
    if hasattr(config, "rope_theta") and method == "ntk":
        config.rope_theta = rope["rope_theta"]
    _rebuild_rotary(model, config)


# ------------------------------------------------------------------------------------------ Self-Extend
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
        for m in _attention_modules(_base_model(model))
        if getattr(m, "_seal_self_extend", None) is not None
    ]


# -------------------------------------------------------------------------------------------- public API
def extend_context(model: nn.Module, method: str, factor: float = 2.0, **opts: Any) -> nn.Module:
    """Extend the usable context of a loaded model in place; returns ``model``.

    Args:
        model: a transformers causal LM, or a ``PeftModel`` with SEAL adapters on one (then the record
            is also written into every SEAL adapter's ``SealConfig.extension``, so it is saved with it).
        method: ``"ntk"``, ``"dynamic_ntk"``, ``"yarn"`` or ``"self_extend"``.
        factor: > 1. RoPE methods: the context multiple (2 = twice the native window). Self-Extend: the
            group size (an integer).
        **opts: ``window`` (Self-Extend neighbour window in tokens, default ``min(1024, native // 4)``,
            must be < the native window); YaRN: ``attention_factor``, ``beta_fast``, ``beta_slow``.

    Applying the same extension again is a no-op; a different one on an extended model is an error
    (load a fresh model). Raises ``ValueError``/``TypeError`` naming the bad value and the fix.
    """
    base_model = _base_model(model)
    config = _text_config(base_model)
    record = _normalise(method, factor, opts, config)
    existing = extension_of(base_model)
    if existing is not None:
        if existing != record:
            raise ValueError(
                f"this model is already extended with {existing}; cannot apply {record} on top. Load a fresh "
                f"model to use another extension."
            )
        if record["method"] == "self_extend" and not self_extend_states(base_model):
            _apply_self_extend(base_model, config, record)  # e.g. a merged model reloaded from disk
        record_extension(model)
        return model
    setattr(
        base_model,
        _ORIGINAL,
        {
            "rope_parameters": copy.deepcopy(getattr(config, "rope_parameters", None)),
            "max_position_embeddings": config.max_position_embeddings,
            "attn_implementation": config._attn_implementation,
        },
    )
    native = int(config.max_position_embeddings)
    if record["method"] == "self_extend":
        _apply_self_extend(base_model, config, record)
    else:
        _apply_rope(base_model, config, record)
    config.seal_extension = {**record, "native_max_position_embeddings": native}
    record_extension(model)
    return model


def remove_extension(model: nn.Module) -> nn.Module:
    """Undo :func:`extend_context` on ``model`` (restores RoPE settings and attention); returns ``model``."""
    base_model = _base_model(model)
    config = _text_config(base_model)
    original = getattr(base_model, _ORIGINAL, None)
    if original is None:
        if extension_of(base_model) is not None:
            raise ValueError(
                "this model was saved with its extension applied; reload the original model instead."
            )
        return model
    if original["rope_parameters"] is not None:
        config.rope_parameters = copy.deepcopy(original["rope_parameters"])
        if hasattr(config, "rope_theta"):
            config.rope_theta = config.rope_parameters["rope_theta"]
    config.max_position_embeddings = original["max_position_embeddings"]
    if config._attn_implementation != original["attn_implementation"]:
        base_model.set_attn_implementation(original["attn_implementation"])
    for module in _attention_modules(base_model):
        if getattr(module, "_seal_self_extend", None) is not None:
            del module._seal_self_extend
    if original["rope_parameters"] is not None:
        _rebuild_rotary(base_model, config)
    del config.seal_extension
    delattr(base_model, _ORIGINAL)
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, Mapping):
        for cfg in peft_config.values():
            if hasattr(cfg, "extension"):
                cfg.extension = None
    return model


def record_extension(model: nn.Module) -> None:
    """Copy the model's extension into every SEAL adapter config of ``model`` (a ``PeftModel``).

    Needed when the base model was extended *before* ``get_peft_model``; ``extend_context`` on a
    ``PeftModel`` does it itself. A no-op for plain models.
    """
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, Mapping):
        return
    record = extension_of(model)
    for cfg in peft_config.values():
        if hasattr(cfg, "extension"):
            cfg.extension = dict(record) if record is not None else None


def _record_from(config: Any) -> dict[str, Any] | None:
    if config is None:
        return None
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if os.path.isdir(path):  # an adapter folder, or a merged checkpoint (config.json: seal_extension)
            adapter = os.path.join(path, "adapter_config.json")
            path = adapter if os.path.isfile(adapter) else os.path.join(path, "config.json")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    if isinstance(config, Mapping) and "method" in config:
        record = config
    elif isinstance(config, Mapping):
        record = config.get("extension") or config.get("seal_extension")
    else:  # a SealConfig (extension) or a transformers config (seal_extension)
        record = getattr(config, "extension", None) or getattr(config, "seal_extension", None)
    if not isinstance(record, Mapping):
        return None
    return {k: v for k, v in record.items() if k != "native_max_position_embeddings"}


def apply_from_config(model: nn.Module, config: Any) -> nn.Module:
    """Apply the extension recorded in ``config`` to ``model``; returns ``model``.

    ``config``: a ``SealConfig``, an adapter folder or its ``adapter_config.json``, a config dict, the
    extension record itself (``{"method": "ntk", "factor": 2.0}``), or a merged checkpoint (its folder,
    ``config.json`` or transformers config: the ``seal_extension`` entry ``seal-peft merge`` writes). No
    record: nothing happens. Call it on the base model *before* loading the adapter (or use
    :func:`from_pretrained`); on a merged checkpoint loaded with plain transformers it re-applies
    Self-Extend (the RoPE methods are already in its config, so for them it is a no-op).
    """
    record = _record_from(config)
    if record is None:
        return model
    record = dict(record)
    method, factor = record.pop("method"), record.pop("factor", None)
    return extend_context(model, method, factor=factor, **record)


def from_pretrained(model: nn.Module, adapter: str | os.PathLike, **kwargs: Any):
    """``seal_peft.from_pretrained`` that first applies the extension recorded with the adapter.

    Use it for adapters trained on an extended model: the scales were learned for those positions.
    """
    from .loading import from_pretrained as load

    path = os.fspath(adapter)
    sub = kwargs.get("subfolder")
    folder = os.path.join(path, sub) if sub else path
    if os.path.isdir(folder):
        apply_from_config(model, folder)
    peft_model = load(model, adapter, **kwargs)
    record_extension(peft_model)
    return peft_model


def parse_extend(text: str) -> dict[str, Any]:
    """Parse the CLI form ``METHOD:FACTOR[:key=value,...]`` into a record.

    Examples: ``ntk:2``, ``yarn:2``, ``dynamic_ntk:2``, ``self_extend:4``, ``self_extend:4:window=512``.
    """
    parts = str(text).split(":")
    if len(parts) < 2 or parts[0] not in EXTENSION_METHODS:
        raise ValueError(
            f"--extend {text!r}: expected METHOD:FACTOR[:key=value,...] with METHOD one of "
            f"{', '.join(EXTENSION_METHODS)} (e.g. ntk:2, self_extend:4:window=1024)."
        )
    try:
        factor = float(parts[1])
    except ValueError:
        raise ValueError(f"--extend {text!r}: FACTOR {parts[1]!r} is not a number.") from None
    record: dict[str, Any] = {"method": parts[0], "factor": int(factor) if factor.is_integer() else factor}
    for item in ":".join(parts[2:]).split(",") if len(parts) > 2 else []:
        if not item.strip():
            continue
        name, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--extend {text!r}: option {item!r} must be key=value (e.g. window=1024).")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"--extend {text!r}: option {name}={value!r} is not a number.") from None
        record[name.strip()] = int(number) if number.is_integer() and name.strip() == "window" else number
    return record
