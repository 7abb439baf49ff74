"""`SealModel`: the PEFT tuner that injects SEAL layers into a transformers model."""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .config import TARGET_MODULES_MAPPING, SealConfig
from .layer import Linear, SealLayer


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        try:
            return config.get_text_config()
        except Exception:  # pragma: no cover - exotic configs
            return config
    return config


def resolve_head_dim(
    config: SealConfig, in_features: int, attention: nn.Module | None, model_config: Any, key: str
) -> int:
    """Number of input channels per head of the output projection ``key``.

    Order: ``config.head_dim`` > the attention module's ``head_dim`` / ``head_size`` > the model
    config's ``head_dim`` > ``in_features // num_attention_heads``. Never falls back silently to
    per-channel scales: if nothing works the user is told to pass ``head_dim``.
    """
    candidates: list[tuple[str, Any]] = [("SealConfig.head_dim", config.head_dim)]
    if attention is not None:
        for attr in ("head_dim", "head_size"):
            candidates.append((f"{type(attention).__name__}.{attr}", getattr(attention, attr, None)))
    if model_config is not None:
        candidates.append(("model config head_dim", getattr(model_config, "head_dim", None)))
        n_heads = getattr(model_config, "num_attention_heads", None)
        if isinstance(n_heads, int) and n_heads > 0 and in_features % n_heads == 0:
            candidates.append(("in_features / config.num_attention_heads", in_features // n_heads))
    for source, value in candidates:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
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


class SealModel(BaseTuner):
    """Injects SEAL scales into the attention output projections of a model.

    Created by ``peft.get_peft_model(model, SealConfig(...))``; users do not instantiate it directly.
    Every generic PEFT operation (merge/unmerge, ``merge_and_unload``, ``unload``, multiple
    adapters, ``disable_adapter``, save/load) works as for LoRA/IA3.
    """

    prefix: str = "seal_"
    tuner_layer_cls = SealLayer
    target_module_mapping = TARGET_MODULES_MAPPING

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
            group = resolve_head_dim(peft_config, in_features, parent, _text_config(self.model), current_key)
        if isinstance(target, SealLayer):
            target.update_layer(
                adapter_name,
                group=group,
                init_weights=peft_config.init_weights,
                inference_mode=peft_config.inference_mode,
            )
            return
        new_module = Linear(
            target,
            adapter_name,
            group=group,
            init_weights=peft_config.init_weights,
            inference_mode=peft_config.inference_mode,
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: SealConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Map checkpoint keys to the model and refuse adapters that do not fit it.

        PEFT alone would raise a bare size-mismatch error, or silently ignore scales of layers the
        model does not have; a SEAL adapter for another model must never load half-way.
        """
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        suffix = f".seal_scale.{adapter_name}"
        own = {k: v for k, v in model.state_dict().items() if k.endswith(suffix)}
        loaded = {k: v for k, v in remapped.items() if ".seal_scale" in k}
        base = getattr(config, "base_model_name_or_path", None)
        hint = f" It was saved for base model {base!r}." if base else ""
        unknown = sorted(set(loaded) - set(own))
        if unknown:
            raise ValueError(
                f"This SEAL adapter does not fit the model: {len(unknown)} scale(s) belong to modules the model "
                f"does not have (e.g. {unknown[0]!r}).{hint} Load it onto the model it was trained on."
            )
        missing = sorted(set(own) - set(loaded))
        if missing:
            raise ValueError(
                f"This SEAL adapter does not fit the model: it has no scales for {len(missing)} SEAL layer(s) "
                f"(e.g. {missing[0]!r}).{hint} Load it onto the model it was trained on."
            )
        for key, value in loaded.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(
                    f"This SEAL adapter does not fit the model: {key!r} has {tuple(value.shape)} scales in the "
                    f"file but the model needs {tuple(own[key].shape)} (a different number of heads or head "
                    f"size).{hint} Load it onto the model it was trained on."
                )
            if not torch.isfinite(value).all():
                raise ValueError(
                    f"The SEAL adapter file holds non-finite scales for {key!r}; it is corrupted or the training "
                    f"diverged. Retrain it or use an earlier checkpoint."
                )
        return remapped
