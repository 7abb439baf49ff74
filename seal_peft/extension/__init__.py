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

from ..tuner.config import EXTENSION_METHODS
from ._common import SELF_EXTEND_MODEL_TYPES, extended_context_length, extension_of
from .extend import extend_context, remove_extension
from .persistence import apply_from_config, from_pretrained, parse_extend, record_extension
from .self_extend import SelfExtendState, self_extend_states

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
    "remove_extension",
    "self_extend_states",
]
