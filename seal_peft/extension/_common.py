"""Shared pieces of context extension: the record format, validation, and reading the model's config."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..tuner.config import EXTENSION_METHODS
from ..tuner.utils import get_base_model, text_config

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
    record = getattr(text_config(get_base_model(model)), "seal_extension", None)
    if not isinstance(record, Mapping):
        return None
    return {k: v for k, v in record.items() if k != "native_max_position_embeddings"}

def extended_context_length(model: nn.Module) -> int:
    """Tokens the (extended) model is meant to handle.

    RoPE methods: ``native * factor``. Self-Extend: the longest input whose grouped positions stay
    inside the native window, ``(native - window + window // group) * group``. Unextended: native.
    """
    config = text_config(get_base_model(model))
    native = _native_window(config)
    record = extension_of(model)
    if record is None:
        return native
    if record["method"] == "self_extend":
        group, window = int(record["factor"]), int(record["window"])
        return (native - window + window // group) * group
    return int(native * record["factor"])

