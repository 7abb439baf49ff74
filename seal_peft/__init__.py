"""seal-peft: SEAL (Scaling to Emphasize Attention for Long-context retrieval) as a PEFT method.

``import seal_peft`` registers the method with PEFT; from then on ``get_peft_model``,
``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM`` and every other PEFT entry point know
SEAL adapters (``peft_type: "SEAL"``). Nothing else in PEFT, transformers or huggingface_hub is
changed: ``model.push_to_hub`` stays transformers' method; :func:`push_to_hub` uploads a SEAL adapter
with a SEAL model card.
"""

from __future__ import annotations

from .integrations.hub import model_card, push_to_hub
from .loading import check_adapter_dir, from_pretrained, save_adapter
from .tuner import registration as _registration
from .tuner.config import TARGET_MODULES_MAPPING, SealConfig
from .tuner.layer import SealLayer
from .tuner.model import SealModel

__version__ = "0.1.0"


def ensure_registered() -> None:
    """Make ``PeftType.SEAL`` and SEAL's config/tuner known to PEFT (done on import; idempotent)."""
    _registration.register(SealConfig, SealModel)


ensure_registered()

__all__ = [
    "SealConfig",
    "SealLayer",
    "SealModel",
    "TARGET_MODULES_MAPPING",
    "from_pretrained",
    "save_adapter",
    "check_adapter_dir",
    "push_to_hub",
    "model_card",
    "ensure_registered",
    "__version__",
]
