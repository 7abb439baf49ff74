"""The SEAL PEFT method and nothing else: config, layer, tuner, registration, PEFT workarounds.

Nothing here imports any other part of ``seal_peft`` (enforced by the import-linter contracts in
``pyproject.toml``); the rest of the package builds on these classes.
"""

from __future__ import annotations

from .config import EXTENSION_METHODS, GRANULARITIES, TARGET_MODULES_MAPPING, SealConfig
from .layer import Linear, SealLayer
from .model import SealModel
from .registration import register, seal_peft_type

__all__ = [
    "EXTENSION_METHODS",
    "GRANULARITIES",
    "TARGET_MODULES_MAPPING",
    "Linear",
    "SealConfig",
    "SealLayer",
    "SealModel",
    "register",
    "seal_peft_type",
]
