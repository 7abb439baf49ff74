"""seal_peft.distributed in one process: which modules the FSDP1 policy wraps, the gather, the save guard.

The multi-process runs (FSDP1 / FSDP2 over gloo) are in tests/test_ecosystem_fsdp.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from distributed_worker import build_model
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import seal_peft
from seal_peft.distributed import (
    _GatheredAdapter,
    decoder_layer_classes,
    fsdp_auto_wrap_policy,
    full_adapter_state_dict,
    save_sharded_adapter,
    seal_fsdp_units,
)
from seal_peft.loading import save_adapter


def _seal(granularity="head", **kwargs):
    return get_peft_model(build_model(), seal_peft.SealConfig(granularity=granularity, **kwargs))


def _wrapped_names(model, policy) -> list[str]:
    return [n for n, m in model.named_modules() if n and policy(module=m, recurse=False, nonwrapped_numel=0)]


def test_policy_wraps_decoder_layers_seal_layers_and_their_base_layers():
    model = _seal()
    names = _wrapped_names(model, fsdp_auto_wrap_policy(model))
    prefix = "base_model.model.model.layers"
    assert names == [
        f"{prefix}.{i}{suffix}" for i in (0, 1) for suffix in ("", ".self_attn.o_proj", ".self_attn.o_proj.base_layer")
    ]
    # the SEAL-layer unit then owns exactly the scales: its only parameters outside the base layer
    for i in (0, 1):
        layer = model.get_submodule(f"{prefix}.{i}.self_attn.o_proj")
        own = [n for n, _ in layer.named_parameters() if not n.startswith("base_layer.")]
        assert own == ["seal_scale.default"]


def test_peft_policy_leaves_the_scales_among_frozen_weights():
    """Why SEAL has its own policy: PEFT's wraps trainable *leaf .weight* modules only (LoRA's)."""
    from peft.utils.other import fsdp_auto_wrap_policy as peft_policy

    model = _seal()
    names = _wrapped_names(model, peft_policy(model))
    assert names == ["base_model.model.model.layers.0", "base_model.model.model.layers.1"]


def test_policy_never_wraps_parameter_containers_and_keeps_trainable_leaves():
    # seal_scale (a ParameterDict) is never called, so FSDP could not gather it as a unit of its own
    model = _seal(modules_to_save=["lm_head"])
    policy = fsdp_auto_wrap_policy(model)
    names = _wrapped_names(model, policy)
    assert not any(n.endswith("seal_scale") for n in names)
    # a trainable modules_to_save copy is a leaf whose parameters are all trainable: its own unit (as in PEFT)
    assert "base_model.model.lm_head.modules_to_save.default" in names
    assert "base_model.model.lm_head.original_module" not in names


def test_decoder_layer_classes_default_override_and_error():
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = _seal()
    assert decoder_layer_classes(model) == {LlamaDecoderLayer}
    assert decoder_layer_classes(model, ["LlamaDecoderLayer"]) == {LlamaDecoderLayer}
    units = seal_fsdp_units(model, [LlamaDecoderLayer])
    assert sum(isinstance(u, LlamaDecoderLayer) for u in units) == 2
    with pytest.raises(ValueError, match="layer_cls=\\['YourDecoderLayer'\\]"):
        decoder_layer_classes(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="NoSuchLayer"):
        decoder_layer_classes(model, ["NoSuchLayer"])


def test_full_adapter_state_dict_unsharded():
    model = _seal(init_weights=False)
    scales = full_adapter_state_dict(model)
    expected = {n: p for n, p in model.named_parameters() if "seal_scale" in n}
    assert scales.keys() == expected.keys() and len(scales) == 2
    for key in scales:
        assert torch.equal(scales[key], expected[key]) and scales[key].data_ptr() != expected[key].data_ptr()
    with pytest.raises(ValueError, match="no SEAL layer with an adapter named 'other'"):
        full_adapter_state_dict(model, "other")


def test_save_sharded_adapter_unsharded_round_trip(tmp_path):
    model = _seal("channel", init_weights=False)
    save_sharded_adapter(model, tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    for name in ("adapter_config.json",):
        assert json.loads((tmp_path / "a" / name).read_text()) == json.loads((tmp_path / "b" / name).read_text())
    a, b = load_file(tmp_path / "a" / "adapter_model.safetensors"), load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loaded = PeftModel.from_pretrained(build_model(), tmp_path / "a")
    for (n, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(TypeError, match="needs a PeftModel"):
        save_sharded_adapter(build_model(), tmp_path / "c")


def test_save_guard_refuses_an_incomplete_adapter_and_keeps_the_old_one(tmp_path):
    """If PEFT drops gathered scales (as it did for FSDP1-nested names), nothing is written."""
    model = _seal()
    target = tmp_path / "adapter"
    model.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    scales = full_adapter_state_dict(model)
    scales["base_model.model.model.layers.0.self_attn.q_proj.seal_scale.default"] = torch.ones(4)  # no such layer
    with pytest.raises(RuntimeError, match="PEFT wrote 2 of the 3 gathered SEAL scales"):
        save_adapter(_GatheredAdapter(model, scales, "default"), target, selected_adapters=["default"])
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


# ---------------------------------------------------------------- save_pretrained with wrapper names in the middle
# FSDP1 units nested in the root and activation-checkpoint wrappers put "_fsdp_wrapped_module." /
# "_checkpoint_wrapped_module." inside the module names, while the state dicts they produce have none.
# PEFT 0.21 strips only a leading "_fsdp_wrapped_module.", so plain save_pretrained wrote an empty adapter.


class _FakeFSDP(nn.Module):
    """A wrapper that names its child like FSDP1 does (FSDP itself needs a process group)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._fsdp_wrapped_module = module

    def forward(self, *args, **kwargs):
        return self._fsdp_wrapped_module(*args, **kwargs)


def _wrap(model, wrapper, o_proj: bool = True):
    """``wrapper`` around every decoder layer and (``o_proj``) every SEAL layer inside it."""
    layers = model.base_model.model.model.layers
    for i in range(len(layers)):
        if o_proj:
            attn = layers[i].self_attn
            attn.o_proj = wrapper(attn.o_proj)
        layers[i] = wrapper(layers[i])
    return model


def _trained_scales(model) -> dict[str, torch.Tensor]:
    return {
        n.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", ""): p.detach().clone()
        for n, p in model.named_parameters()
        if "seal_scale" in n
    }


@pytest.mark.parametrize("granularity", ["head", "channel"])
def test_get_peft_model_state_dict_finds_scales_under_fsdp_names_anywhere(granularity):
    from peft import get_peft_model_state_dict

    model = _seal(granularity, init_weights=False)
    clean = model.state_dict()  # what FSDP1's FULL_STATE_DICT gives: no wrapper segment in any key
    expected = get_peft_model_state_dict(model)
    _wrap(model, _FakeFSDP)
    assert any("._fsdp_wrapped_module._fsdp_wrapped_module." not in n and "._fsdp_wrapped_module." in n
               for n, _ in model.named_modules())  # fmt: skip
    got = get_peft_model_state_dict(model, state_dict=clean)
    assert got.keys() == expected.keys() and len(got) == 2
    assert all(torch.equal(got[k], expected[k]) for k in got)


def test_save_pretrained_with_activation_checkpoint_wrappers_round_trips(tmp_path):
    """Real torch wrappers in one process: their state dict strips '_checkpoint_wrapped_module.'."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = _wrap(_seal("channel", init_weights=False), checkpoint_wrapper)
    assert any("._checkpoint_wrapped_module." in n for n, _ in model.named_modules())
    trained = _trained_scales(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build_model(), tmp_path)
    got = {n: p.detach() for n, p in loaded.named_parameters() if "seal_scale" in n}
    assert got.keys() == trained.keys() and len(got) == 2
    assert all(torch.equal(got[k], trained[k]) for k in got)


@pytest.mark.parametrize("what", ["no scales", "one scale missing", "a shard of a scale"])
def test_save_pretrained_refuses_a_state_dict_without_all_scales(tmp_path, what):
    model = _seal()
    state = model.state_dict()
    keys = sorted(k for k in state if "seal_scale" in k)
    if what == "no scales":
        state = {k: v for k, v in state.items() if k not in keys}
    elif what == "one scale missing":
        del state[keys[1]]
    else:
        state[keys[0]] = state[keys[0]][:2]  # what a rank holds of a sharded scale
    with pytest.raises(ValueError, match="seal_peft.distributed.save_sharded_adapter") as err:
        model.save_pretrained(tmp_path, state_dict=state)
    assert "layers.1" in str(err.value) if what == "one scale missing" else "layers.0" in str(err.value)
    assert not (tmp_path / "adapter_model.safetensors").exists()
