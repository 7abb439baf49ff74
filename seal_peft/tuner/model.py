"""`SealModel`: the PEFT tuner that injects SEAL layers into a transformers model."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any

from peft.tuners.tuners_utils import BaseTuner
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .config import TARGET_MODULES_MAPPING, SealConfig
from .layer import Linear, SealLayer
from .peft_compat import PeftCompat
from .utils import text_config as _text_config


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


# Attributes that make a module look like an attention block, and names of the *input* projections inside
# one (their input is the hidden state, not the concatenated head outputs SEAL-H scales per head).
_ATTENTION_ATTRS = ("head_dim", "head_size", "v_head_dim", "num_heads", "num_attention_heads")
_INPUT_PROJECTIONS = {
    "q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "c_attn", "q_attn", "Wqkv", "query", "key",
    "value", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "in_proj", "qkv", "to_q", "to_k", "to_v",
}  # fmt: skip


def check_head_target(parent: nn.Module | None, target_name: str, key: str) -> None:
    """Refuse SEAL-H (without an explicit ``head_dim``) on a module that is not an attention output projection.

    Per-head scales only make sense on the input of the attention output projection (the head outputs
    concatenated head-major). On any other module (an MLP projection, q/k/v, every layer of
    ``target_modules="all-linear"``) a head size read from the model config would silently group unrelated
    channels. ``granularity="channel"`` or an explicit ``SealConfig(head_dim=...)`` are the user's call.
    """
    name = type(parent).__name__.lower() if parent is not None else ""
    attention = parent is not None and (
        "attention" in name
        or "attn" in name
        or any(_positive_int(getattr(parent, a, None)) for a in _ATTENTION_ATTRS)
    )
    if attention and target_name not in _INPUT_PROJECTIONS:
        return
    where = (
        f"an input projection of {type(parent).__name__}"
        if attention
        else f"a child of {type(parent).__name__}"
    )
    raise ValueError(
        f"SEAL target {key!r} is not an attention output projection ({where}), so it has no heads: "
        f"granularity='head' would group its input channels by a head size that does not belong to them. Point "
        f"target_modules at the attention output projection (e.g. 'self_attn.o_proj'), use "
        f"granularity='channel', or pass the group size explicitly with SealConfig(head_dim=...)."
    )


def resolve_head_dim(
    config: SealConfig, in_features: int, attention: nn.Module | None, model_config: Any, key: str
) -> int:
    """Number of input channels per head of the output projection ``key``.

    Order: ``config.head_dim`` (an explicit override, only checked to divide ``in_features``) > the
    attention module's ``v_head_dim`` / ``head_dim`` / ``head_size`` > the model config's ``v_head_dim`` /
    ``head_dim`` > ``in_features // num_attention_heads``. ``v_head_dim`` comes first because in MLA models
    (DeepSeek-V2/V3) ``head_dim`` is the RoPE part of a query/key head while the output projection's
    input is ``num_heads * v_head_dim``. A detected head size must satisfy
    ``in_features == num_heads * head_dim`` where the number of heads is known (the attention module's
    ``num_heads`` / ``num_attention_heads``, else the config's ``num_attention_heads``). Never falls back
    silently to per-channel scales: if nothing works the user is told to pass ``head_dim``.
    """
    explicit = _positive_int(config.head_dim)
    if explicit is not None:
        if in_features % explicit != 0:
            raise ValueError(
                f"SEAL: head size {explicit} (from SealConfig.head_dim) does not divide the {in_features} input "
                f"features of {key!r}. The input of an attention output projection is num_heads * head_dim wide; "
                f"pass the right SealConfig(head_dim=...) or check target_modules."
            )
        return explicit
    attention_config = getattr(attention, "config", None)
    if attention_config is not None and not hasattr(attention_config, "num_attention_heads"):
        attention_config = None
    cfg = attention_config if attention_config is not None else model_config
    candidates: list[tuple[str, Any]] = []
    if attention is not None:
        for attr in ("v_head_dim", "head_dim", "head_size"):
            candidates.append((f"{type(attention).__name__}.{attr}", getattr(attention, attr, None)))
    if cfg is not None:
        for attr in ("v_head_dim", "head_dim"):
            candidates.append((f"model config {attr}", getattr(cfg, attr, None)))
    heads: tuple[str, int] | None = None
    for attr in ("num_heads", "num_attention_heads"):
        n = _positive_int(getattr(attention, attr, None)) if attention is not None else None
        if n is not None:
            heads = (f"{type(attention).__name__}.{attr}", n)
            break
    if heads is None and cfg is not None and _positive_int(getattr(cfg, "num_attention_heads", None)):
        heads = ("config.num_attention_heads", cfg.num_attention_heads)
    if heads is not None and in_features % heads[1] == 0:
        candidates.append((f"in_features / {heads[0]}", in_features // heads[1]))
    for source, value in candidates:
        value = _positive_int(value)
        if value is None:
            continue
        if heads is not None and heads[1] * value != in_features:
            raise ValueError(
                f"SEAL: head size {value} (from {source}) times {heads[1]} heads (from {heads[0]}) is "
                f"{heads[1] * value}, but {key!r} has {in_features} input features. The input of an attention "
                f"output projection is num_heads * head_dim wide, so this head size is not the one of this "
                f"layer (in MLA models it is v_head_dim). Pass the right SealConfig(head_dim=...), use "
                f"granularity='channel', or check target_modules."
            )
        if in_features % value != 0:
            raise ValueError(
                f"SEAL: head size {value} (from {source}) does not divide the {in_features} input features "
                f"of {key!r}. The input of an attention output projection is num_heads * head_dim wide; "
                f"pass the right SealConfig(head_dim=...) or check target_modules."
            )
        return value
    raise ValueError(
        f"SEAL could not determine the attention head size for {key!r} (in_features={in_features}): neither "
        f"the attention module nor the model config has head_dim/num_attention_heads. Pass it explicitly, "
        f"e.g. SealConfig(head_dim=64), or use granularity='channel'."
    )


class SealModel(PeftCompat, BaseTuner):
    """Injects SEAL scales into the attention output projections of a model.

    Created by ``peft.get_peft_model(model, SealConfig(...))``; users do not instantiate it directly.
    Every generic PEFT operation (merge/unmerge, ``merge_and_unload``, ``unload``, multiple
    adapters, ``disable_adapter``, save/load) works as for LoRA/IA3.

    This class holds SEAL's own logic (default targets, group size per target, mixed-adapter batches);
    the overrides that only correct PEFT behaviour live in :class:`~seal_peft.tuner.peft_compat.PeftCompat`.
    """

    prefix: str = "seal_"
    tuner_layer_cls = SealLayer
    target_module_mapping = TARGET_MODULES_MAPPING

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)  # PeftCompat checks the name first
        _warn_if_extension_missing(model, self.peft_config[adapter_name], adapter_name)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        """Mixed-adapter batches: ``model(..., adapter_names=[...])`` / ``generate(..., adapter_names=[...])``.

        As for LoRA, sample ``i`` uses adapter ``adapter_names[i]`` (``"__base__"``: no adapter). Each SEAL
        layer then multiplies its input by a ``[batch, in_features]`` matrix of per-sample channel scales,
        so one batch serves several task-specific adapters at the cost of a single adapter.
        """
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is None:
            yield
            return
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise TypeError(
                f"adapter_names must be a list with one adapter name per sample (or '__base__'), got "
                f"{type(adapter_names).__name__}: {adapter_names!r}."
            )
        if self.training:
            raise ValueError(
                "Cannot pass adapter_names when the model is in training mode; call model.eval() first "
                "(mixed-adapter batches are for inference)."
            )
        known: set[str] = set()
        merged: set[str] = set()
        for module in self.model.modules():
            if isinstance(module, SealLayer):
                known |= set(module.seal_scale.keys())
                merged |= set(module.merged_adapters)
        unknown = sorted({n for n in adapter_names if n != "__base__"} - known)
        if unknown:
            raise ValueError(
                f"adapter_names names adapter(s) this model does not have: {', '.join(map(repr, unknown))}. "
                f"Loaded adapters: {', '.join(map(repr, sorted(known)))}; use '__base__' for no adapter."
            )
        if merged:
            raise ValueError(
                f"Cannot pass adapter_names while adapter(s) {', '.join(map(repr, sorted(merged)))} are merged into "
                f"the base weights; call model.unmerge_adapter() first (or use separate merged models)."
            )
        names = list(adapter_names)
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:  # generate() repeats every sample num_beams times
            names = [n for n in names for _ in range(num_beams)]

        def pre_hook(module: nn.Module, hook_args: tuple, hook_kwargs: dict) -> tuple[tuple, dict]:
            hook_kwargs["adapter_names"] = names
            return hook_args, hook_kwargs

        handles = []
        for module in self.model.modules():
            if isinstance(module, (SealLayer, AuxiliaryTrainingWrapper)):
                handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _prepare_adapter_config(self, peft_config: SealConfig, model_config: dict) -> SealConfig:
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            targets = self.target_module_mapping.get(model_type)
            if targets is None:
                raise ValueError(
                    f"SEAL has no default target modules for model_type={model_type!r}. Pass the name of the "
                    f"attention output projection, e.g. SealConfig(target_modules=['self_attn.o_proj']). "
                    f"Known model types: {', '.join(sorted(self.target_module_mapping))}."
                )
            peft_config.target_modules = set(targets)
        # a model extended with seal_peft.extension before wrapping: record the extension with the adapter
        extension = model_config.get("seal_extension")
        if getattr(peft_config, "extension", None) is None and isinstance(extension, dict):
            peft_config.extension = {
                k: v for k, v in extension.items() if k != "native_max_position_embeddings"
            }
        return peft_config

    def _create_and_replace(
        self,
        peft_config: SealConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        base = target.get_base_layer() if isinstance(target, SealLayer) else target
        if not isinstance(base, nn.Linear) and type(base).__name__ != "Conv1D":
            raise TypeError(
                f"SEAL target {current_key!r} is a {type(base).__name__}, not a Linear/Conv1D attention output "
                f"projection. Fix target_modules (e.g. ['self_attn.o_proj'])."
            )
        in_features = base.weight.shape[0] if type(base).__name__ == "Conv1D" else base.in_features
        if peft_config.granularity == "channel":
            group = 1
        else:
            if peft_config.head_dim is None:
                check_head_target(parent, target_name, current_key)
            group = resolve_head_dim(peft_config, in_features, parent, _text_config(self.model), current_key)
        if isinstance(target, SealLayer):
            target.update_layer(
                adapter_name,
                group=group,
                init_weights=peft_config.init_weights,
                inference_mode=peft_config.inference_mode,
                exact_unmerge=peft_config.exact_unmerge,
            )
            return
        new_module = Linear(
            target,
            adapter_name,
            group=group,
            init_weights=peft_config.init_weights,
            inference_mode=peft_config.inference_mode,
            exact_unmerge=peft_config.exact_unmerge,
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)


def _warn_if_extension_missing(model: nn.Module, config: SealConfig, adapter_name: str) -> None:
    """Warn when an adapter trained under a context extension lands on a model without that extension.

    The plain loaders (``PeftModel.from_pretrained``, ``seal_peft.from_pretrained``) load the scales
    but do not extend the model; seal_peft.extension applies the recorded extension first.
    """
    record = getattr(config, "extension", None)
    if not isinstance(record, dict):
        return
    text_config = _text_config(model)
    applied = getattr(text_config, "seal_extension", None)
    if isinstance(applied, dict):
        applied = {k: v for k, v in applied.items() if k != "native_max_position_embeddings"}
    else:
        applied = None
    self_extend_on = str(getattr(text_config, "_attn_implementation", "")).startswith("seal_self_extend")
    if applied == record and (record.get("method") != "self_extend" or self_extend_on):
        return
    if applied is None:
        have = "no context extension"
    elif applied == record:
        have = "it recorded in its config but Self-Extend attention is not active"
    else:
        have = f"another extension ({applied})"
    warnings.warn(
        f"SEAL adapter {adapter_name!r} was trained under the context extension {record['method']!r} ({record}), "
        f"but the model it is loaded onto has {have}: the scales were learned for the extended positions. "
        f"Load it with seal_peft.extension.from_pretrained(model, path), or call "
        f"seal_peft.extension.apply_from_config(model, path) on a fresh base model before loading.",
        UserWarning,
        stacklevel=2,
    )
