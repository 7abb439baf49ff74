"""Every place where SEAL corrects PEFT behaviour, in one mixin: the one file to revisit on a PEFT upgrade.

:class:`PeftCompat` sits before ``BaseTuner`` in ``SealModel``'s bases. Each override says what PEFT
does, why SEAL must differ, and the PEFT versions it was written for. All were written for and are
tested on PEFT 0.21.x (the range ``pyproject.toml`` pins: ``peft>=0.21,<0.22``); none has been checked
against other releases, so on an upgrade run ``tests/tuner/`` and drop any override PEFT made redundant.

Private PEFT APIs SEAL relies on (names as in PEFT 0.21), here and in ``model.py`` / ``layer.py``:
``BaseTuner._check_merge_allowed``, ``._unload_and_optionally_merge``, ``._enable_adapter_layers``,
``._replace_module``, ``._prepare_adapter_config``, ``._create_and_replace``,
``._remap_adapter_state_dict_for_load``, ``._get_adapter_state_dict``, ``._enable_peft_forward_hooks``,
``peft.utils.other.AuxiliaryTrainingWrapper`` and ``peft.tuners.tuners_utils.check_adapters_to_merge``.

Workarounds outside the tuner (they concern loading, not the method): ``seal_peft.loading`` restores a
model PEFT half-wrapped during a failed ``PeftModel.from_pretrained`` and writes adapters atomically.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .layer import SealLayer

#: Module-name segments of torch's wrappers (FSDP1 units, activation-checkpoint wrappers). They appear in
#: ``named_modules()`` wherever a wrapper sits, but never in the state dicts those wrappers produce.
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def without_wrappers(name: str) -> str:
    """``name`` with every wrapper segment removed, as the wrappers' state dicts spell it."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)


class _WrapperFreeNames:
    """The model as ``BaseTuner._get_adapter_state_dict`` sees it: ``named_modules()`` without wrapper
    segments (PEFT 0.21 reads nothing else of the model there)."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model

    def named_modules(self, *args: Any, **kwargs: Any):
        for name, module in self._model.named_modules(*args, **kwargs):
            yield without_wrappers(name), module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


class PeftCompat(BaseTuner):
    """Overrides of ``BaseTuner`` that only correct PEFT behaviour (see the module docstring)."""

    # ------------------------------------------------------------------ all-or-nothing merges
    # PEFT (0.21): merge_adapter / merge_and_unload merge layer by layer, so a safe_merge failure (non-finite
    # weights) in layer k leaves layers 0..k-1 merged. SEAL checks every layer first (SealLayer.check_merge),
    # so a merge either happens everywhere or nowhere.
    def _check_merge_all(self, adapter_names: list[str] | None, safe_merge: bool) -> None:
        for module in self.model.modules():
            if isinstance(module, SealLayer):
                module.check_merge(adapter_names=adapter_names, safe_merge=safe_merge)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """PEFT's ``merge_adapter``, but a merge that fails in one layer changes no layer."""
        self._check_merge_allowed()
        self._check_merge_all(adapter_names, safe_merge)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        # unloading also unwraps the layers: a half-done merge here would be irrecoverable.
        if merge:
            self._check_merge_allowed()
            self._check_merge_all(adapter_names, safe_merge)
        # The layers are dropped right after merging and never unmerged: keep no copy of half-precision
        # weights for an exact unmerge (SealConfig.exact_unmerge), it would only raise the peak memory.
        layers = [m for m in self.model.modules() if isinstance(m, SealLayer)] if merge else []
        for layer in layers:
            layer._seal_merging_to_unload = True
        try:
            return super()._unload_and_optionally_merge(
                merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
            )
        finally:
            for layer in layers:
                layer._seal_merging_to_unload = False

    # ------------------------------------------------------------------ enable / disable
    # PEFT (0.21): _enable_adapter_layers(True) goes through set_adapter(), which sets requires_grad=True on
    # the active adapter's parameters. SEAL adapters are often loaded for inference only; after
    # `with model.disable_adapter():` they must not silently become trainable.
    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        # Remember requires_grad when disabling and put it back when enabling.
        saved = getattr(self, "_seal_requires_grad", None)
        if not enabled and saved is None:
            self._seal_requires_grad = {n: p.requires_grad for n, p in self.model.named_parameters()}
        super()._enable_adapter_layers(enabled)
        if enabled and saved is not None:
            self._seal_requires_grad = None
            for name, param in self.model.named_parameters():
                if name in saved:
                    param.requires_grad_(saved[name])

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        self._seal_requires_grad = None  # an explicit switch decides trainability from now on
        super().set_adapter(adapter_name, inference_mode=inference_mode)

    # ------------------------------------------------------------------ adapter names
    # PEFT (0.21): save_pretrained of one adapter drops every key containing ".<other adapter name>.", so an
    # adapter named like a module of the model makes the other adapters save incompletely. Refused up front.
    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        others = set(getattr(self, "peft_config", {})) - {adapter_name}
        parts = {p for key in model.state_dict() for p in key.split(".")} - others
        parts |= {"seal_scale", "base_layer", "modules_to_save", "original_module"}  # added by PEFT/SEAL
        if adapter_name in parts:
            raise ValueError(
                f"Adapter name {adapter_name!r} is also a module/parameter name inside the model; PEFT would then "
                f"save other adapters' weights incompletely. Choose another adapter name (e.g. 'seal_{adapter_name}')."
            )
        super().inject_adapter(model, adapter_name, *args, **kwargs)

    # ------------------------------------------------------------------ saving
    # PEFT (0.21): get_peft_model_state_dict (save_pretrained) picks the adapter's entries of the state dict by
    # the names of the model's tuner modules (BaseTuner._get_adapter_state_dict) and strips only a *leading*
    # "_fsdp_wrapped_module." from them. FSDP1 units nested in the root (every decoder layer, with SEAL's policy
    # and with PEFT's, which the Trainer installs) and activation-checkpoint wrappers put wrapper segments in the
    # middle of the names, while their state dicts (FULL_STATE_DICT included) have none: no name matched and PEFT
    # wrote an adapter without a single scale, without a word. SEAL matches by names without any wrapper
    # segment, and refuses to hand PEFT a selection that lacks the full scale of any SEAL layer of the adapter
    # (a state dict without them, or with shards of them), so save_pretrained can never write such an adapter.
    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: Any,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        given_empty = not state_dict
        state_dict = {without_wrappers(k): v for k, v in state_dict.items()}
        view = _WrapperFreeNames(model)
        selected = super()._get_adapter_state_dict(
            model=view,
            config=config,
            adapter_name=adapter_name,
            state_dict=state_dict,
            unwanted_adapter_names=unwanted_adapter_names,
        )
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if given_empty and distributed and torch.distributed.get_rank() != 0:
            # FSDP1's FULL_STATE_DICT with rank0_only=True (accelerate's get_state_dict) and DeepSpeed's
            # consolidated state dict are empty on the other ranks by design; those ranks write nothing
            # (save_pretrained(is_main_process=False)), so there is nothing to refuse.
            return selected
        cls._check_full_scales(view, adapter_name, selected)
        return selected

    @staticmethod
    def _check_full_scales(
        view: _WrapperFreeNames, adapter_name: str, selected: dict[str, torch.Tensor]
    ) -> None:
        problems: list[str] = []
        layers = 0
        aux: list[str] = []
        for name, module in view.named_modules():
            if isinstance(module, AuxiliaryTrainingWrapper):
                aux.append(name)  # its copies are saved by PEFT's modules_to_save path, as in BaseTuner
            if not isinstance(module, SealLayer) or adapter_name not in module.seal_scale:
                continue
            if any(name == a or name.startswith(f"{a}.") for a in aux):
                continue
            layers += 1
            key = f"{name}.seal_scale.{adapter_name}" if name else f"seal_scale.{adapter_name}"
            needed = (module.in_features // module.seal_group[adapter_name],)
            value = selected.get(key)
            if value is None:
                problems.append(f"no scales for {key!r}")
            elif type(value) not in (torch.Tensor, nn.Parameter):
                problems.append(f"a {type(value).__name__} (a shard, not the full scales) for {key!r}")
            elif tuple(value.shape) != needed:
                problems.append(f"{tuple(value.shape)} scales for {key!r}, which needs {needed}")
        if not layers and not aux:
            raise ValueError(
                f"Refusing to save SEAL adapter {adapter_name!r}: the model has no SEAL layer holding it, so the "
                f"adapter would hold no scales. Save an adapter the model was built with (model.peft_config keys)."
            )
        if problems:
            raise ValueError(
                f"Refusing to save SEAL adapter {adapter_name!r}: the state dict handed to save_pretrained / "
                f"get_peft_model_state_dict holds {problems[0]} ({len(problems)} of the {layers} SEAL layer(s) "
                f"lack their full scales); the adapter would be incomplete. This happens with a sharded model "
                f"(FSDP, DeepSpeed ZeRO-3): save it with seal_peft.distributed.save_sharded_adapter(model, path) "
                f"called on every rank, or pass a full state dict (FSDP1: StateDictType.FULL_STATE_DICT; "
                f"DeepSpeed ZeRO-3: stage3_gather_16bit_weights_on_model_save / zero3_save_16bit_model: true)."
            )

    # ------------------------------------------------------------------ loading
    # PEFT (0.21): set_peft_model_state_dict raises a bare size-mismatch error for scales of another shape,
    # silently skips scales of layers the model lacks, leaves missing layers at their init, and would copy a
    # stray key such as 'lm_head.weight' onto the base model. A SEAL adapter for another model must never load
    # half-way, so the checkpoint is checked against the model before PEFT loads it.
    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: Any, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Map checkpoint keys to the model and refuse adapters that do not fit it.

        PEFT alone would raise a bare size-mismatch error, or silently ignore scales of layers the
        model does not have; a SEAL adapter for another model must never load half-way.
        """
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        suffix = f".seal_scale.{adapter_name}"
        model_state = model.state_dict()
        own = {k: v for k, v in model_state.items() if k.endswith(suffix)}
        loaded = {k: v for k, v in remapped.items() if ".seal_scale" in k}
        base = getattr(config, "base_model_name_or_path", None)
        hint = f" It was saved for base model {base!r}." if base else ""
        # Anything else must land in this adapter's modules_to_save copies. A key that maps onto a base
        # weight (e.g. 'lm_head.weight' when adapter_config.json lost its modules_to_save) would make
        # PEFT overwrite the base model itself.
        stray = sorted(
            k
            for k in remapped
            if ".seal_scale" not in k and not (f".modules_to_save.{adapter_name}." in k and k in model_state)
        )
        if stray:
            raise ValueError(
                f"This SEAL adapter file holds {len(stray)} weight(s) that are neither SEAL scales nor "
                f"modules_to_save copies of its config (e.g. {stray[0]!r}); loading would overwrite base model "
                f"weights. adapter_config.json does not match adapter_model.safetensors (is `modules_to_save` "
                f"missing from the config?). Restore the config saved with these weights."
            )
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
