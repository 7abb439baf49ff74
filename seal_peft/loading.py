"""Loading SEAL adapters with checks that turn PEFT's low-level errors into actionable ones."""

from __future__ import annotations

import json
import os
from typing import Any

from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def check_adapter_dir(path: str | os.PathLike) -> dict:
    """Validate a local SEAL adapter folder and return its parsed config.

    Raises ``ValueError`` naming the problem (missing/invalid ``adapter_config.json``, a non-SEAL
    adapter, a truncated or corrupted ``adapter_model.safetensors``) and how to fix it.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    config_path = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(config_path):
        raise ValueError(f"{path!r} is not a PEFT adapter folder: {ADAPTER_CONFIG} is missing.")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}); re-save the adapter.") from err
    if not isinstance(config, dict) or config.get("peft_type") != "SEAL":
        found = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(
            f"{path!r} holds a {found!r} adapter, not a SEAL one; load it with peft.PeftModel.from_pretrained."
        )
    weights = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        raise ValueError(
            f"{path!r} has no {ADAPTER_WEIGHTS}; the adapter was not saved completely. Save it again with "
            f"model.save_pretrained(...)."
        )
    try:
        with safe_open(weights, framework="pt") as f:
            for key in f.keys():  # SEAL adapters are tiny: read everything to catch short files
                f.get_tensor(key)
    except Exception as err:  # safetensors raises its own error types for bad headers / short files
        raise ValueError(
            f"{weights} is truncated or corrupted ({err}). Re-download or re-save the adapter."
        ) from err
    return config


def from_pretrained(
    model: nn.Module,
    adapter: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    **kwargs: Any,
):
    """Load a SEAL adapter onto ``model`` and return the ``PeftModel``.

    Same as ``peft.PeftModel.from_pretrained`` (which also works after ``import seal_peft``), but a
    local adapter folder is validated first, so a corrupted file or a non-SEAL adapter gives a clear
    error. Hub ids are passed through unchanged.
    """
    from peft import PeftModel

    if os.path.isdir(os.fspath(adapter)):
        sub = kwargs.get("subfolder")
        check_adapter_dir(os.path.join(os.fspath(adapter), sub) if sub else adapter)
    return PeftModel.from_pretrained(
        model, adapter, adapter_name=adapter_name, is_trainable=is_trainable, **kwargs
    )
