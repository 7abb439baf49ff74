"""seal-peft: SEAL (Scaling to Emphasize Attention for Long-context retrieval) as a PEFT method.

``import seal_peft`` registers the method with PEFT; from then on ``get_peft_model``,
``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM`` and every other PEFT entry point know
SEAL adapters (``peft_type: "SEAL"``).
"""

from __future__ import annotations

from ._registration import ensure_registered

ensure_registered()

from .config import TARGET_MODULES_MAPPING, SealConfig  # noqa: E402
from .layer import SealLayer  # noqa: E402
from .loading import check_adapter_dir, from_pretrained, save_adapter  # noqa: E402
from .model import SealModel  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "SealConfig",
    "SealLayer",
    "SealModel",
    "TARGET_MODULES_MAPPING",
    "from_pretrained",
    "save_adapter",
    "check_adapter_dir",
    "ensure_registered",
    "__version__",
]
