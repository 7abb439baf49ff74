"""The RoPE methods (NTK, dynamic NTK, YaRN): change ``rope_parameters`` and rebuild the rotary embedding."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from ._common import _OPTIONS, _rotary_dim


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

