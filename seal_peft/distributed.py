"""Sharded (FSDP) training of SEAL adapters: wrap policies and saving the gathered adapter.

Why SEAL needs its own FSDP1 policy. PEFT's ``peft.utils.other.fsdp_auto_wrap_policy`` (which the HF
``Trainer`` installs for every ``PeftModel`` under FSDP1) gives an adapter its own FSDP unit only when
it is a *leaf module with a trainable* ``.weight`` -- LoRA's ``lora_A`` / ``lora_B`` ``Linear``. A
SEAL layer's trainable parameters are ``seal_scale.<adapter>`` (an ``nn.ParameterDict``) on the
wrapper that also holds the frozen ``base_layer``, so PEFT's policy leaves the scales in the
decoder-layer unit among frozen weights. FSDP1 then either refuses the model
(``use_orig_params=False``, accelerate's default: "Must flatten tensors with uniform
`requires_grad`") or, with ``use_orig_params=True``, gives the whole decoder-layer flat parameter
a gradient (zeros for the frozen weights).

:func:`fsdp_auto_wrap_policy` wraps each decoder layer, each SEAL layer, and each SEAL layer's base
layer, so every FSDP1 unit is uniformly frozen or uniformly trainable: the SEAL-layer unit holds
only the scales. FSDP2 (``fully_shard``) shards parameter by parameter and accepts frozen and
trainable parameters in one unit; :func:`fsdp2_shard` shards per decoder layer, as accelerate's
``TRANSFORMER_BASED_WRAP`` does.

:func:`full_adapter_state_dict` gathers only the SEAL scales of a sharded model (never the frozen
weights) and :func:`save_sharded_adapter` writes them on rank 0 as an ordinary adapter folder that
``PeftModel.from_pretrained`` loads in a single process. Both are collectives: call them on every
rank. See docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .tuner.layer import SealLayer
from .tuner.peft_compat import WRAPPER_SEGMENTS


def _unwrapped(module: nn.Module) -> nn.Module:
    """``module`` without FSDP1 / activation-checkpoint wrappers (their class is not the layer's)."""
    for attr in WRAPPER_SEGMENTS:
        while hasattr(module, attr):
            module = getattr(module, attr)
    return module


def decoder_layer_classes(model: nn.Module, layer_cls: Iterable[str | type] | None = None) -> set[type]:
    """The module classes that form one FSDP unit each: the model's ``_no_split_modules`` by default.

    ``layer_cls`` overrides them by class or class name (e.g. ``["LlamaDecoderLayer"]``).
    """
    if layer_cls is None:
        names: set[str] = set()
        for module in model.modules():
            names.update(getattr(module, "_no_split_modules", None) or [])
    else:
        names = {c for c in layer_cls if isinstance(c, str)}
    found = {type(_unwrapped(m)) for m in model.modules() if type(_unwrapped(m)).__name__ in names}
    if layer_cls is not None:
        found.update(c for c in layer_cls if isinstance(c, type))
    if not found:
        raise ValueError(
            f"No decoder-layer class to shard was found in {type(model).__name__} (looked for "
            f"{sorted(names) or 'the model`s _no_split_modules'}). Pass layer_cls=['YourDecoderLayer'] "
            f"(the class of one transformer block)."
        )
    return found


def seal_fsdp_units(model: nn.Module, layer_cls: Iterable[str | type] | None = None) -> list[nn.Module]:
    """The modules :func:`fsdp_auto_wrap_policy` makes FSDP1 units (besides the root), in model order."""
    classes = tuple(decoder_layer_classes(model, layer_cls))
    base_ids = {id(m.base_layer) for m in model.modules() if isinstance(m, SealLayer)}
    return [
        m for m in model.modules() if isinstance(m, classes) or isinstance(m, SealLayer) or id(m) in base_ids
    ]


def fsdp_auto_wrap_policy(model: nn.Module, layer_cls: Iterable[str | type] | None = None) -> Callable:
    """An FSDP1 ``auto_wrap_policy`` for a SEAL ``PeftModel``; use it instead of PEFT's.

    Wraps every decoder layer, every SEAL layer and every SEAL layer's base layer (inner units
    first), so the SEAL-layer unit holds exactly the scales: every flat parameter is uniformly
    trainable or frozen, which FSDP1 requires with ``use_orig_params=False`` and which keeps frozen
    weights out of the gradient with ``use_orig_params=True``. Leaf modules whose own parameters
    are all trainable (e.g. a ``modules_to_save`` copy) get their own unit too, as in PEFT's policy.

        FullyShardedDataParallel(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), ...)
        # with accelerate: accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
    """
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    unit_ids = {id(m) for m in seal_fsdp_units(model, layer_cls)}

    def is_unit(module: nn.Module) -> bool:
        if id(module) in unit_ids:
            return True
        if isinstance(module, (nn.ParameterDict, nn.ParameterList)):
            return False  # containers are never called, so FSDP could not gather them (SEAL's seal_scale)
        own = list(module.parameters(recurse=False))
        return not list(module.children()) and bool(own) and all(p.requires_grad for p in own)

    return functools.partial(lambda_auto_wrap_policy, lambda_fn=is_unit)


def fsdp2_shard(
    model: nn.Module, layer_cls: Iterable[str | type] | None = None, **fully_shard_kwargs: Any
) -> nn.Module:
    """Apply FSDP2 ``fully_shard`` to every decoder layer, then to ``model`` (the root); return it.

    FSDP2 shards each parameter on its own, so the SEAL scales can share a unit with the frozen
    weights of their decoder layer (only trainable parameters get gradients); no extra unit is
    needed. ``fully_shard_kwargs`` (``mesh``, ``mp_policy``, ``reshard_after_forward`` ...) go to
    every call.
    """
    from torch.distributed.fsdp import fully_shard

    classes = tuple(decoder_layer_classes(model, layer_cls))
    for module in [m for m in model.modules() if isinstance(m, classes)]:
        fully_shard(module, **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model


def _seal_layers_by_owner(peft_model: nn.Module) -> list[tuple[nn.Module | None, list[tuple[str, SealLayer]]]]:
    """SEAL layers grouped by the FSDP1 unit that owns their parameters (``None``: not FSDP1), in
    model order, each with its parameter-name prefix as ``peft_model.state_dict()`` spells it."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    groups: dict[int, tuple[nn.Module | None, list[tuple[str, SealLayer]]]] = {}

    def walk(module: nn.Module, prefix: str, owner: nn.Module | None) -> None:
        if isinstance(module, FSDP):
            owner = module
        if isinstance(module, SealLayer):
            groups.setdefault(id(owner), (owner, []))[1].append((prefix, module))
        for name, child in module.named_children():
            part = "" if name in WRAPPER_SEGMENTS else f"{name}."
            walk(child, prefix + part, owner)

    walk(peft_model, "", None)
    return list(groups.values())


def full_adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The full (unsharded) SEAL scales of ``adapter_name``, on CPU, on every rank.

    A collective: call it on every rank, outside forward/backward, on the model FSDP returned (the
    root). Only the scales travel, never
    the frozen weights: FSDP2 parameters (DTensors) are all-gathered one by one; for FSDP1 each unit
    that owns scales is unsharded on its own (``summon_full_params(unit, recurse=False)``; with
    :func:`fsdp_auto_wrap_policy` that unit holds nothing but the scales); DDP or unsharded
    models are read directly. Keys are ``peft_model.state_dict()`` names
    (``base_model.model....o_proj.seal_scale.<adapter>``), the form ``save_pretrained(state_dict=...)``
    takes.
    """
    from peft import PeftModel
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.tensor import DTensor

    peft_model = next((m for m in model.modules() if isinstance(m, PeftModel)), model)
    root = next((m for m in model.modules() if isinstance(m, FSDP)), None)
    if root is not None and getattr(root, "_is_root", None) is None:
        # Not run yet: FSDP1 initialises lazily from the root, and unsharding an inner unit first
        # would make that unit a root. Unsharding the root's own parameters initialises all units.
        with FSDP.summon_full_params(root, recurse=False, writeback=False):
            pass
    scales: dict[str, torch.Tensor] = {}
    for owner, layers in _seal_layers_by_owner(peft_model):
        layers = [(prefix, layer) for prefix, layer in layers if adapter_name in layer.seal_group]
        if not layers:
            continue
        if owner is None:
            context = contextlib.nullcontext()
        else:
            context = FSDP.summon_full_params(owner, recurse=False, writeback=False)
        with context, torch.no_grad():
            for prefix, layer in layers:
                value = layer.seal_scale[adapter_name]
                if isinstance(value, DTensor):
                    value = value.full_tensor()
                scales[f"{prefix}seal_scale.{adapter_name}"] = value.detach().to("cpu", copy=True)
    if not scales:
        raise ValueError(
            f"The model has no SEAL layer with an adapter named {adapter_name!r}; pass the adapter name the "
            f"model was built with (model.peft_config keys)."
        )
    return scales


class _GatheredAdapter:
    """What :func:`seal_peft.save_adapter` writes through: PEFT's ``save_pretrained`` of the sharded
    ``PeftModel`` with the gathered scales, then a check that every scale reached the file.

    SEAL's tuner matches the scales by module names without FSDP1 / checkpoint-wrapper segments
    (``PeftCompat._get_adapter_state_dict``; PEFT 0.21 alone wrote an empty adapter for nested FSDP1
    units), so the sharded ``PeftModel`` saves like an unsharded one. The check that every gathered
    scale reached the file runs before :func:`save_adapter` moves the folder into place, so a failure
    leaves an existing adapter at the target untouched.
    """

    def __init__(self, peft_model: nn.Module, scales: dict[str, torch.Tensor], adapter_name: str) -> None:
        self.peft_model, self.scales, self.adapter_name = peft_model, scales, adapter_name

    def save_pretrained(self, directory: str, **kwargs: Any) -> None:
        from safetensors import safe_open

        from .loading import ADAPTER_WEIGHTS

        self.peft_model.save_pretrained(directory, state_dict=self.scales, **kwargs)
        sub = directory if self.adapter_name == "default" else os.path.join(directory, self.adapter_name)
        with safe_open(os.path.join(sub, ADAPTER_WEIGHTS), framework="pt") as f:
            written = set(f.keys())
        suffix = f".{self.adapter_name}"
        expected = {k.removesuffix(suffix) for k in self.scales}
        if written != expected:
            raise RuntimeError(
                f"PEFT wrote {len(written)} of the {len(expected)} gathered SEAL scales (missing e.g. "
                f"{sorted(expected - written)[:1]}); nothing was saved. This PEFT version names the modules of "
                f"the sharded model differently: please report it with the peft and torch versions."
            )


def save_sharded_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> None:
    """Gather the SEAL scales of a sharded ``PeftModel`` and write the adapter folder on rank 0.

    A collective: call it on every rank (the others only take part in the gather). The folder is what
    ``save_pretrained`` writes for the unsharded model (``adapter_config.json``,
    ``adapter_model.safetensors``, model card), written atomically by :func:`seal_peft.save_adapter`
    and checked to hold every scale; load it in one process with ``PeftModel.from_pretrained``.
    """
    from peft import PeftModel

    from .loading import save_adapter

    peft_model = next((m for m in model.modules() if isinstance(m, PeftModel)), None)
    if peft_model is None:
        raise TypeError(
            f"save_sharded_adapter needs a PeftModel (possibly FSDP-wrapped), got {type(model).__name__}; "
            f"build it with peft.get_peft_model(model, SealConfig(...)) before sharding."
        )
    scales = full_adapter_state_dict(model, adapter_name)  # collective: before the rank check
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:
        save_adapter(_GatheredAdapter(peft_model, scales, adapter_name), path, selected_adapters=[adapter_name])
    if distributed:
        torch.distributed.barrier()  # the folder is complete when every rank returns
