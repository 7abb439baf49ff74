"""Two small model helpers every layer of the package needs (the tuner itself included)."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["get_base_model", "text_config"]


def get_base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a ``PeftModel`` (or ``model`` itself when it is not wrapped)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def text_config(model: nn.Module) -> Any:
    """The text part of ``model.config`` (``get_text_config()`` for multimodal configs), the config
    itself when it has no text part, ``None`` when the module has no config."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        try:
            return config.get_text_config()
        except Exception:  # pragma: no cover - exotic configs
            return config
    return config
