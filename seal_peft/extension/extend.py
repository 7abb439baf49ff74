""":func:`extend_context` / :func:`remove_extension`: apply or undo one extension on a loaded model."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..tuner.utils import get_base_model, text_config
from ._common import _ORIGINAL, _normalise, extension_of
from .rope import _apply_rope, _rebuild_rotary
from .self_extend import _apply_self_extend, _attention_modules, _detach_self_extend, self_extend_states


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
    base_model = get_base_model(model)
    config = text_config(base_model)
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
    base_model = get_base_model(model)
    config = text_config(base_model)
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
        _detach_self_extend(module)
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
