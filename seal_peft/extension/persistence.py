"""Extensions recorded with an adapter: record, re-apply on load, and the ``METHOD:FACTOR[:opts]`` text form."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..tuner.config import EXTENSION_METHODS
from .extend import extend_context, record_extension


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
    from ..loading import from_pretrained as load

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

