"""`SealConfig`: the configuration of a SEAL adapter.

SEAL (Scaling to Emphasize Attention for Long-context retrieval, arXiv 2501.15225) learns one scale
per attention head (SEAL-H, ``granularity="head"``) or per attention-output channel (SEAL-C,
``granularity="channel"``) and multiplies the *input* of each attention output projection
(``o_proj``) by it. Everything else in the model stays frozen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from .registration import seal_peft_type

GRANULARITIES = ("head", "channel")
# Context-extension methods a SEAL adapter can be trained/evaluated on (see seal_peft/extension.py).
EXTENSION_METHODS = ("ntk", "dynamic_ntk", "yarn", "self_extend")

# model_type -> name (suffix) of the attention output projection whose *input* SEAL scales.
# The names are specific enough not to match MLP projections of the same short name
# (GPT-2's ``mlp.c_proj``, Falcon's ``dense_4h_to_h`` ...).
TARGET_MODULES_MAPPING: dict[str, list[str]] = {
    **{
        model_type: ["self_attn.o_proj"]
        for model_type in (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "gemma3_text",
            "phi3",
            "starcoder2",
            "olmo",
            "olmo2",
            "granite",
            "cohere",
            "stablelm",
            "smollm3",
            "ministral",
        )
    },
    "gpt_neox": ["attention.dense"],
    "gpt2": ["attn.c_proj"],
    "gpt_bigcode": ["attn.c_proj"],
    "falcon": ["self_attention.dense"],
    "phi": ["self_attn.dense"],
}


@dataclass
class SealConfig(PeftConfig):
    """Configuration of a SEAL adapter (SEAL-H or SEAL-C).

    Example::

        import seal_peft
        from peft import get_peft_model

        model = get_peft_model(base_model, seal_peft.SealConfig(granularity="head"))
        model.print_trainable_parameters()  # num_layers * num_heads scales

    The scale multiplies the input of the attention output projection, whose columns are
    head-major: column ``h * head_dim + d`` belongs to query head ``h``. Because of that the learned
    scales can be folded into the projection's weight columns (``merge_and_unload``) at no
    inference cost, for grouped-query attention too.
    """

    granularity: Literal["head", "channel"] = field(
        default="head",
        metadata={
            "help": (
                "'head' (SEAL-H): one learned scale per query head and layer (num_layers * num_heads "
                "parameters). 'channel' (SEAL-C): one scale per attention-output channel "
                "(num_layers * num_heads * head_dim parameters)."
            )
        },
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": (
                "The attention output projections to scale: a list of module-name suffixes or a regex "
                "matched against the full module name. Default: chosen from the model type "
                "(e.g. 'self_attn.o_proj' for Llama, 'attn.c_proj' for GPT-2). Only the attention "
                "output projection (whose input is the concatenated head outputs) makes sense here."
            )
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module names (suffixes) or a regex of modules to leave untouched."},
    )
    layers_to_transform: list[int] | int | None = field(
        default=None,
        metadata={"help": "Only adapt these layer indices (needs the layer index in the module name)."},
    )
    layers_pattern: list[str] | str | None = field(
        default=None,
        metadata={
            "help": (
                "Name of the layer container used with `layers_to_transform` when it is not the usual "
                "'layers' / 'h' (e.g. 'blocks')."
            )
        },
    )
    head_dim: int | None = field(
        default=None,
        metadata={
            "help": (
                "Size of one attention head. Normally detected from the attention module or the model "
                "config; set it for custom models where that fails. Only used with granularity='head'."
            )
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": (
                "True: scales start at 1 (identity, the model is unchanged at init). False: random "
                "scales around 1, useful only for testing."
            )
        },
    )
    exact_unmerge: bool = field(
        default=True,
        metadata={
            "help": (
                "True: while this adapter is merged into a bf16/fp16 weight, keep a copy of the original "
                "weight so that unmerge_adapter() (and disable_adapter() on a merged model) restores it "
                "bit-exactly. Costs one extra copy of each adapted projection's weight, only while merged and "
                "only for half-precision weights; merge_and_unload() never keeps it. fp32/fp64 weights are "
                "restored by division (within one ulp) and need no copy. False: divide in half precision "
                "too (each merge/unmerge cycle may round every weight by up to one ulp)."
            )
        },
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Extra modules to train fully and store with the adapter (e.g. a classifier head)."
        },
    )

    extension: dict | None = field(
        default=None,
        metadata={
            "help": (
                "The context extension the adapter was trained on, e.g. {'method': 'ntk', 'factor': 2.0} or "
                "{'method': 'self_extend', 'factor': 4, 'window': 1024}. Written by "
                "seal_peft.extension.extend_context / record_extension and re-applied on load by "
                "seal_peft.extension.from_pretrained (or apply_from_config). None: no extension."
            )
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = seal_peft_type()  # the enum member only: registration is done by seal_peft/__init__
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"SealConfig.granularity={self.granularity!r} is not supported; use 'head' (SEAL-H, one "
                f"scale per attention head) or 'channel' (SEAL-C, one scale per head channel)."
            )
        if self.head_dim is not None:
            if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim <= 0:
                raise ValueError(
                    f"SealConfig.head_dim={self.head_dim!r} must be a positive integer (the size of one "
                    f"attention head), or None to detect it from the model."
                )
        if not isinstance(self.init_weights, bool):
            raise TypeError(f"SealConfig.init_weights must be True or False, got {self.init_weights!r}.")
        if not isinstance(self.exact_unmerge, bool):
            raise TypeError(f"SealConfig.exact_unmerge must be True or False, got {self.exact_unmerge!r}.")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple, set)):
                if not all(isinstance(v, str) for v in value):
                    raise TypeError(
                        f"SealConfig.{name} must be a list of module names or a regex string, got {value!r}."
                    )
                setattr(self, name, set(value))
            elif value is not None and not isinstance(value, str):
                raise TypeError(
                    f"SealConfig.{name} must be a list of module names or a regex string, got {value!r}."
                )
        if isinstance(self.layers_to_transform, bool) or (
            self.layers_to_transform is not None
            and not isinstance(self.layers_to_transform, int)
            and not (
                isinstance(self.layers_to_transform, (list, tuple))
                and all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers_to_transform)
            )
        ):
            raise TypeError(
                f"SealConfig.layers_to_transform must be an int or a list of ints, got {self.layers_to_transform!r}."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                "SealConfig.layers_pattern only has an effect together with layers_to_transform; "
                "set layers_to_transform=[...] or drop layers_pattern."
            )
        if self.extension is not None:
            ext = self.extension
            factor = ext.get("factor") if isinstance(ext, dict) else None
            if not isinstance(ext, dict) or ext.get("method") not in EXTENSION_METHODS:
                raise ValueError(
                    f"SealConfig.extension={ext!r} must be None or a dict with 'method' in "
                    f"{EXTENSION_METHODS} and a 'factor' > 1, e.g. {{'method': 'ntk', 'factor': 2.0}}."
                )
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
                raise ValueError(
                    f"SealConfig.extension['factor']={factor!r} must be a number > 1 (the context multiple, or "
                    f"the Self-Extend group size)."
                )
        if (
            isinstance(self.target_modules, str)
            and self.target_modules.lower() == "all-linear"
            and self.granularity == "head"
            and self.head_dim is None
        ):
            raise ValueError(
                "SealConfig(target_modules='all-linear') with granularity='head': PEFT expands 'all-linear' to "
                "every linear layer (q/k/v, MLP, ...), whose inputs have no attention heads, so per-head scales "
                "would group unrelated channels. Use the default target_modules (the attention output "
                "projections), granularity='channel', or pass the group size explicitly with head_dim=..."
            )
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                "SealConfig: layers_to_transform cannot be combined with a regex target_modules; "
                "put the layer selection into the regex or pass target_modules as a list."
            )
