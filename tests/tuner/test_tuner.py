"""Core tuner behaviour on tiny models of every supported architecture family."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ALL_ARCHS, CORE_ARCHS, L, make_model, tiny_config
from peft import PeftModel, get_peft_model

from seal_peft import TARGET_MODULES_MAPPING, SealConfig, SealLayer


def seal_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SealLayer)]


def output_projections(model):
    """Names of the attention output projections of a plain model (independent of SEAL's matching)."""
    suffixes = TARGET_MODULES_MAPPING[model.config.model_type]
    return [n for n, _ in model.named_modules() if any(n.endswith("." + s) for s in suffixes)]


@pytest.mark.parametrize("arch", ALL_ARCHS)
@pytest.mark.parametrize("granularity", ["head", "channel"])
def test_identity_at_init_and_param_count(arch, granularity, inputs):
    base = make_model(arch)
    ref = base(inputs).logits
    _, heads, head_dim = tiny_config(arch)
    model = get_peft_model(base, SealConfig(granularity=granularity))
    out = model(inputs).logits
    assert torch.equal(out, ref)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == (L * heads if granularity == "head" else L * heads * head_dim)
    assert len(seal_layers(model)) == L
    for name, p in model.named_parameters():
        assert p.requires_grad == ("seal_" in name), name


def test_gpt2_targets_attention_not_mlp():
    model = get_peft_model(make_model("gpt2"), SealConfig())
    names = [n for n, _ in seal_layers(model)]
    assert names and all(n.endswith("attn.c_proj") for n in names)
    assert not any("mlp" in n for n in names)


def _hooked_reference(arch, channel_scale, inputs):
    """Logits of the plain model with the o_proj input multiplied by ``channel_scale`` via a hook."""
    base = make_model(arch)
    handles = []
    for name in output_projections(base):
        module = base.get_submodule(name)
        handles.append(
            module.register_forward_pre_hook(lambda m, args: (args[0] * channel_scale,) + args[1:])
        )
    try:
        return base(inputs).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_head_scale_changes_exactly_that_head(arch, inputs):
    _, heads, head_dim = tiny_config(arch)
    model = get_peft_model(make_model(arch), SealConfig(granularity="head"))
    h = heads - 2
    with torch.no_grad():
        for _, layer in seal_layers(model):
            layer.seal_scale["default"][h] = 0.0
    zeroed = model(inputs).logits
    vector = torch.ones(heads * head_dim)
    vector[h * head_dim : (h + 1) * head_dim] = 0.0
    torch.testing.assert_close(zeroed, _hooked_reference(arch, vector, inputs), atol=1e-5, rtol=1e-5)
    # and it actually changed the output
    assert not torch.allclose(zeroed, make_model(arch)(inputs).logits, atol=1e-4)


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_channel_scale_matches_independent_hook(arch, inputs):
    _, heads, head_dim = tiny_config(arch)
    model = get_peft_model(make_model(arch), SealConfig(granularity="channel"))
    torch.manual_seed(5)
    vector = 1 + 0.3 * torch.randn(heads * head_dim)
    with torch.no_grad():
        for _, layer in seal_layers(model):
            layer.seal_scale["default"].copy_(vector)
    torch.testing.assert_close(
        model(inputs).logits, _hooked_reference(arch, vector, inputs), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("arch", CORE_ARCHS)
@pytest.mark.parametrize("granularity", ["head", "channel"])
def test_merge_unmerge(arch, granularity, inputs):
    model = get_peft_model(make_model(arch), SealConfig(granularity=granularity, init_weights=False))
    before = {n: m.get_base_layer().weight.detach().clone() for n, m in seal_layers(model)}
    unmerged = model(inputs).logits
    model.merge_adapter()
    assert all(m.merged for _, m in seal_layers(model))
    torch.testing.assert_close(model(inputs).logits, unmerged, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    for n, m in seal_layers(model):
        assert_ulp_close(m.get_base_layer().weight, before[n])  # fp32: one division, within one ulp
    torch.testing.assert_close(model(inputs).logits, unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_merge_and_unload_gives_plain_model(arch, inputs):
    model = get_peft_model(make_model(arch), SealConfig(init_weights=False))
    unmerged = model(inputs).logits
    merged = model.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, SealLayer) for m in merged.modules())
    assert not hasattr(merged, "peft_config")
    assert type(merged).__module__.startswith("transformers.")
    torch.testing.assert_close(merged(inputs).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_unload_restores_base(inputs):
    base = make_model("llama")
    ref = base(inputs).logits
    model = get_peft_model(base, SealConfig(init_weights=False))
    assert not torch.allclose(model(inputs).logits, ref)
    plain = model.unload()
    assert not any(isinstance(m, SealLayer) for m in plain.modules())
    assert torch.equal(plain(inputs).logits, ref)


def test_near_zero_scales_unmerge_exactly():
    model = get_peft_model(make_model("mistral"), SealConfig(granularity="channel"))
    layer = seal_layers(model)[0][1]
    with torch.no_grad():
        layer.seal_scale["default"][:5] = torch.tensor([0.0, 1e-12, -1e-9, 1e-3, 1e-30])
    weight = layer.get_base_layer().weight.detach().clone()
    model.merge_adapter()
    assert torch.all(layer.get_base_layer().weight[:, 0] == 0)
    model.unmerge_adapter()
    assert torch.equal(layer.get_base_layer().weight[:, :5], weight[:, :5])
    assert_ulp_close(layer.get_base_layer().weight, weight)


FP32_EPS = torch.finfo(torch.float32).eps


def assert_ulp_close(actual, expected, ulps: float = 1.0):
    """``|actual - expected| <= ulps * eps * |expected|`` elementwise (eps of ``expected``'s dtype)."""
    eps = torch.finfo(expected.dtype).eps
    err = (actual.double() - expected.double()).abs()
    bound = ulps * eps * expected.double().abs()
    assert bool((err <= bound).all()), f"max error {float((err - bound).max()):.3g} above {ulps} ulp"


@pytest.mark.parametrize("granularity", ["head", "channel"])
@pytest.mark.parametrize("change", ["in_place", "optimizer_step", "load_adapter"])
def test_unmerge_uses_merged_values_even_if_scale_changed_after_merge(granularity, change, tmp_path):
    """The merge state is a copy: changing the scales after a merge must not change what unmerge divides by."""
    model = get_peft_model(make_model("llama"), SealConfig(granularity=granularity, init_weights=False))
    other = get_peft_model(
        make_model("llama", seed=1), SealConfig(granularity=granularity, init_weights=False)
    )
    other.save_pretrained(tmp_path)
    layers = [m for _, m in seal_layers(model)]
    weights = [m.get_base_layer().weight.detach().clone() for m in layers]
    scales = [m.seal_scale["default"].detach().clone() for m in layers]
    model.merge_adapter()
    if change == "in_place":
        with torch.no_grad():
            for m in layers:
                m.seal_scale["default"].mul_(2.0)
    elif change == "optimizer_step":
        opt = torch.optim.SGD([m.seal_scale["default"] for m in layers], lr=10.0)
        for m in layers:
            m.seal_scale["default"].grad = torch.ones_like(m.seal_scale["default"])
        opt.step()
    else:
        model.load_adapter(tmp_path, adapter_name="default")
    assert all(not torch.equal(m.seal_scale["default"], s) for m, s in zip(layers, scales))  # really changed
    model.unmerge_adapter()
    for m, w in zip(layers, weights):
        assert_ulp_close(m.get_base_layer().weight, w)


@pytest.mark.parametrize("granularity", ["head", "channel"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("exit_via", ["unmerge_adapter", "disable_adapter"])
def test_merge_state_follows_dtype_moves(granularity, dtype, exit_via, inputs):
    """Merge in fp32, cast the model, then unmerge (directly or inside disable_adapter()): no error, and
    the weights are the cast original weights up to the rounding of the cast merged weight."""
    model = get_peft_model(make_model("llama"), SealConfig(granularity=granularity, init_weights=False))
    weights = {n: m.get_base_layer().weight.detach().clone() for n, m in seal_layers(model)}
    with torch.no_grad():  # zero and tiny scales: those columns are restored from the kept originals
        for _, m in seal_layers(model):
            m.seal_scale["default"][0] = 0.0
    model.merge_adapter()
    model.to(dtype)
    if exit_via == "unmerge_adapter":
        model.unmerge_adapter()
    else:
        with model.disable_adapter(), torch.no_grad():
            out = model(inputs).logits
        assert out.dtype == dtype
    for n, m in seal_layers(model):
        assert not m.merged and not m._seal_merge_state
        w = m.get_base_layer().weight
        assert w.dtype == dtype
        expected = weights[n].to(dtype)
        # the cast rounds the merged weight once (1/2 ulp), the unmerge division rounds once more (1/2 ulp)
        assert_ulp_close(
            w, expected, ulps=1.0 if dtype != torch.float64 else 2 * FP32_EPS / torch.finfo(dtype).eps
        )
        assert torch.equal(w[:, 0], expected[:, 0])  # the kept column was cast with the module


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_merge_then_upcast_unmerges_exactly(dtype):
    model = get_peft_model(
        make_model("llama", dtype=dtype), SealConfig(granularity="channel", init_weights=False)
    )
    weights = {n: m.get_base_layer().weight.detach().clone() for n, m in seal_layers(model)}
    model.merge_adapter()
    model.float()
    model.unmerge_adapter()
    for n, m in seal_layers(model):
        assert torch.equal(m.get_base_layer().weight, weights[n].float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_state_follows_meta_move(dtype):
    model = get_peft_model(
        make_model("llama", dtype=dtype), SealConfig(granularity="channel", init_weights=False)
    )
    with torch.no_grad():
        for _, m in seal_layers(model):
            m.seal_scale["default"][0] = 0.0
    model.merge_adapter()
    model.to("meta")
    assert all(b.device.type == "meta" for b in model.buffers())
    model.unmerge_adapter()
    for _, m in seal_layers(model):
        w = m.get_base_layer().weight
        assert w.device.type == "meta" and w.dtype == dtype and not m.merged and not m._seal_merge_state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_state_is_not_saved(dtype, tmp_path):
    """The merge state (vector, kept columns / weight copy) never reaches a state dict or an adapter file."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    model = get_peft_model(
        make_model("llama", dtype=dtype), SealConfig(granularity="channel", init_weights=False)
    )
    keys = set(model.state_dict())
    inner_keys = set(model.base_model.model.state_dict())
    adapter_keys = set(get_peft_model_state_dict(model))
    buffers = len(list(model.buffers()))
    with torch.no_grad():
        for _, m in seal_layers(model):
            m.seal_scale["default"][0] = 0.0
    model.merge_adapter()
    assert len(list(model.buffers())) > buffers  # there is merge state (buffers, so it follows .to())...
    assert set(model.state_dict()) == keys  # ...but not in the state dict
    assert set(get_peft_model_state_dict(model)) == adapter_keys
    model.save_pretrained(tmp_path)
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == adapter_keys
    assert set(model.base_model.model.state_dict()) == inner_keys


@pytest.mark.parametrize("granularity", ["head", "channel"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_ten_merge_unmerge_cycles_do_not_drift(granularity, dtype, inputs):
    """Half precision: unmerge puts back a copy of the original weight (bit-exact, any number of cycles).
    fp32: unmerge divides; each cycle is within one ulp of the weight it started from."""
    model = get_peft_model(
        make_model("llama", dtype=dtype), SealConfig(granularity=granularity, init_weights=False)
    )
    layers = dict(seal_layers(model))
    original = {n: m.get_base_layer().weight.detach().clone() for n, m in layers.items()}
    for _ in range(10):
        start = {n: m.get_base_layer().weight.detach().clone() for n, m in layers.items()}
        model.merge_adapter()
        model.unmerge_adapter()
        for n, m in layers.items():
            w = m.get_base_layer().weight
            if dtype == torch.float32:
                assert_ulp_close(w, start[n])
            else:
                assert torch.equal(w, original[n])
    if dtype == torch.float32:
        for n, m in layers.items():
            assert_ulp_close(m.get_base_layer().weight, original[n], ulps=10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_exact_unmerge_false_divides_with_bounded_drift(dtype):
    """``exact_unmerge=False`` keeps no weight copy; each cycle then rounds once more (<= 1 ulp)."""
    with pytest.raises(TypeError, match="exact_unmerge must be True or False"):
        SealConfig(exact_unmerge="no")
    model = get_peft_model(
        make_model("llama", dtype=dtype), SealConfig(init_weights=False, exact_unmerge=False)
    )
    layers = dict(seal_layers(model))
    for _ in range(10):
        start = {n: m.get_base_layer().weight.detach().clone() for n, m in layers.items()}
        model.merge_adapter()
        assert not any(
            b.numel() == m.get_base_layer().weight.numel() for m in layers.values() for b in m.buffers()
        )
        model.unmerge_adapter()
        for n, m in layers.items():
            assert_ulp_close(m.get_base_layer().weight, start[n])


def test_merge_and_unload_keeps_no_weight_copy(monkeypatch, inputs):
    """merge_and_unload never unmerges, so it must not pay for a copy of the half-precision weights."""
    model = get_peft_model(make_model("llama", dtype=torch.bfloat16), SealConfig(init_weights=False))
    reference = copy.deepcopy(model)
    reference.merge_adapter()
    expected = reference(inputs).logits
    kept = []
    merge = SealLayer.merge

    def spy(self, *args, **kwargs):
        merge(self, *args, **kwargs)
        kept.append(sum(b.numel() for b in self.buffers()))

    monkeypatch.setattr(SealLayer, "merge", spy)
    merged = model.merge_and_unload()
    assert kept == [0] * L
    assert torch.equal(merged(inputs).logits, expected)


class _SubclassTensor(torch.Tensor):
    """Stands in for a quantized tensor subclass (torchao's AffineQuantizedTensor & co.)."""


@pytest.mark.parametrize("kind", ["float8_e4m3fn", "float8_e5m2", "subclass"])
def test_merge_refuses_float8_and_tensor_subclass_weights(kind, monkeypatch):
    model = get_peft_model(make_model("llama"), SealConfig(init_weights=False))
    layers = [m for _, m in seal_layers(model)]
    target = layers[-1].get_base_layer()  # the last layer: PEFT alone would merge layer 0 first
    if kind == "subclass":
        target.weight = torch.nn.Parameter(
            target.weight.detach().as_subclass(_SubclassTensor), requires_grad=False
        )
        assert type(target.weight) is _SubclassTensor
        match = r"_SubclassTensor tensor subclass \(quantized\) weight of Linear; dequantize the model"
    else:
        dtype = getattr(torch, kind)
        target.weight = torch.nn.Parameter(target.weight.detach().to(dtype), requires_grad=False)
        match = rf"torch\.{kind} \(quantized\) weight of Linear; dequantize the model"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for merge in (
        model.merge_adapter,
        model.merge_and_unload,
        lambda: model.merge_and_unload(safe_merge=True),
    ):
        with pytest.raises(TypeError, match=match):
            merge()
        assert len(seal_layers(model)) == L and not any(m.merged for m in layers)
        assert all(
            torch.equal(v.view(torch.uint8), before[k].view(torch.uint8))
            for k, v in model.state_dict().items()
        )
    if kind == "subclass":
        # unmerged inference on long inputs must not fold the scales into such a weight on the fly either
        calls = []
        merged = SealLayer._merged
        monkeypatch.setattr(SealLayer, "_merged", lambda self, *a: calls.append(1) or merged(self, *a))
        x = torch.randn(1, 200, layers[-1].in_features)
        with torch.no_grad():
            layers[-1](x)
        assert calls == []


def test_safe_merge_nan_raises_and_leaves_weights():
    model = get_peft_model(make_model("llama"), SealConfig())
    layer = seal_layers(model)[0][1]
    weight = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        layer.seal_scale["default"][1] = float("nan")
    with pytest.raises(
        ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"
    ):
        model.merge_and_unload(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, weight)
    assert not layer.merged


def test_multiple_adapters_set_and_combine(inputs):
    base = make_model("qwen2")
    ref = base(inputs).logits
    model = get_peft_model(base, SealConfig(init_weights=False), adapter_name="ret")
    model.add_adapter("kv", SealConfig(granularity="channel", init_weights=False))
    out_a = model(inputs).logits
    assert model.active_adapter == "ret"
    # a newly added adapter is not trainable until activated
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith(".kv"))
    model.set_adapter("kv")
    out_b = model(inputs).logits
    assert all(p.requires_grad for n, p in model.named_parameters() if n.endswith(".kv"))
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith(".ret"))
    assert not torch.allclose(out_a, out_b)
    # both active: product of the two per-channel scales, checked against a hook
    model.base_model.set_adapter(["ret", "kv"])
    both = model(inputs).logits
    assert not torch.allclose(both, out_a) and not torch.allclose(both, out_b)
    # independent reference: the plain model with each o_proj input multiplied by the product of the raw
    # parameters (SEAL-H "ret" repeated over each head's 8 channels, SEAL-C "kv" as is), layer by layer
    _, _, head_dim = tiny_config("qwen2")
    reference = make_model("qwen2")
    handles = []
    for name, m in seal_layers(model):
        vector = m.seal_scale["ret"].detach().repeat_interleave(head_dim) * m.seal_scale["kv"].detach()
        target = reference.get_submodule(name.removeprefix("base_model.model."))
        handles.append(
            target.register_forward_pre_hook(lambda mod, args, v=vector: (args[0] * v,) + args[1:])
        )
    with torch.no_grad():
        expected = reference(inputs).logits
    for h in handles:
        h.remove()
    torch.testing.assert_close(both, expected, atol=1e-5, rtol=1e-5)
    # merging both then unmerging restores
    model.merge_adapter(["ret", "kv"])
    torch.testing.assert_close(model(inputs).logits, both, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(model(inputs).logits, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model(inputs).logits, both, atol=1e-5, rtol=1e-5)


def test_disable_adapter_context_with_merged_adapter(inputs):
    base = make_model("llama")
    ref = base(inputs).logits
    model = get_peft_model(base, SealConfig(init_weights=False))
    tuned = model(inputs).logits
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(model(inputs).logits, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(inputs).logits, tuned, atol=1e-5, rtol=1e-5)


def test_delete_adapter(inputs):
    model = get_peft_model(make_model("llama"), SealConfig(init_weights=False), adapter_name="ret")
    model.add_adapter("kv", SealConfig(init_weights=False))
    model.delete_adapter("ret")
    assert list(model.peft_config) == ["kv"]
    for _, layer in seal_layers(model):
        assert set(layer.seal_scale) == {"kv"} and set(layer.seal_group) == {"kv"}
    with pytest.raises(ValueError, match="does not exist"):
        model.delete_adapter("nope")
    model.merge_adapter()
    with pytest.raises(ValueError):
        model.delete_adapter("kv")
    assert "kv" in model.peft_config


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing (transformers renamed gradient_* to activation_* in 5.x)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # pragma: no cover - transformers before the rename
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@pytest.mark.parametrize("granularity", ["head", "channel"])
def test_gradient_checkpointing_gives_the_same_gradients(granularity):
    """With activation checkpointing the scales get exactly the gradients of a run without it."""
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(4))
    grads, calls = {}, {}
    for ckpt in (False, True):
        base = make_model("llama")
        if ckpt:
            enable_checkpointing(base)
        torch.manual_seed(1)
        model = get_peft_model(base, SealConfig(granularity=granularity, init_weights=False))
        model.train()
        layers = [m for _, m in seal_layers(model)]
        seen: list[int] = []
        for m in layers:
            m.register_forward_pre_hook(lambda *_, seen=seen: seen.append(1))
        model(input_ids=ids, labels=ids).loss.backward()
        grads[ckpt] = [m.seal_scale["default"].grad.clone() for m in layers]
        calls[ckpt] = len(seen)
    assert calls == {False: L, True: 2 * L}  # checkpointing really ran: every SEAL layer recomputed once
    assert all(g.abs().sum() > 0 for g in grads[False])
    for plain, checkpointed in zip(grads[False], grads[True]):
        assert torch.equal(plain, checkpointed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_adapter_in_fp32(dtype, inputs):
    base = make_model("llama", dtype=dtype)
    ref = base(inputs).logits
    model = get_peft_model(base, SealConfig())
    for _, layer in seal_layers(model):
        assert layer.seal_scale["default"].dtype == torch.float32
        assert layer.get_base_layer().weight.dtype == dtype
    out = model(inputs).logits
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    with torch.no_grad():
        for _, layer in seal_layers(model):
            layer.seal_scale["default"].mul_(1.5)
    tuned = model(inputs).logits
    model.merge_adapter()
    assert all(m.get_base_layer().weight.dtype == dtype for _, m in seal_layers(model))
    # merged == unmerged up to half-precision rounding (measured 4e-4 fp16, 2e-3 bf16; the scales move the
    # logits by 8e-2, far above the tolerance)
    tol = 2e-3 if dtype == torch.float16 else 1e-2
    torch.testing.assert_close(model(inputs).logits, tuned, atol=tol, rtol=0)
    assert (tuned - ref).abs().max() > 4 * tol
    # autocast off keeps the adapter in the model dtype
    plain = get_peft_model(make_model("llama", dtype=dtype), SealConfig(), autocast_adapter_dtype=False)
    assert all(m.seal_scale["default"].dtype == dtype for _, m in seal_layers(plain))


def test_layers_to_transform_and_exclude():
    model = get_peft_model(make_model("llama"), SealConfig(layers_to_transform=[1]))
    assert [n for n, _ in seal_layers(model)] == ["base_model.model.model.layers.1.self_attn.o_proj"]
    model = get_peft_model(
        make_model("llama"), SealConfig(exclude_modules=["model.layers.0.self_attn.o_proj"])
    )
    assert [n for n, _ in seal_layers(model)] == ["base_model.model.model.layers.1.self_attn.o_proj"]


def test_regex_target_modules():
    model = get_peft_model(make_model("llama"), SealConfig(target_modules=r".*layers\.0\.self_attn\.o_proj"))
    assert len(seal_layers(model)) == 1


def test_head_dim_override_and_detection():
    # explicit head_dim wins over detection
    model = get_peft_model(make_model("llama"), SealConfig(head_dim=16))
    assert seal_layers(model)[0][1].seal_scale["default"].shape == (2,)
    # gemma3: head_dim from the attention module (16), not hidden/heads (8)
    model = get_peft_model(make_model("gemma3"), SealConfig())
    assert seal_layers(model)[0][1].seal_group["default"] == 16


def _mla_model(version: str = "v3"):
    """A tiny MLA model (DeepSeek-V2/V3): config.head_dim is the RoPE part (4), o_proj's input is 4 x 12."""
    import transformers as tf

    cls = tf.DeepseekV3Config if version == "v3" else tf.DeepseekV2Config
    config = cls(
        vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=L,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=12, first_k_dense_replace=L, n_routed_experts=2, num_experts_per_tok=1,
        n_shared_experts=1, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_mla_head_size_is_v_head_dim(version, inputs):
    base = _mla_model(version)
    assert base.config.head_dim == 4 and base.model.layers[0].self_attn.o_proj.in_features == 4 * 12
    model = get_peft_model(base, SealConfig(target_modules=["self_attn.o_proj"], init_weights=False))
    for _, layer in seal_layers(model):
        assert layer.seal_group["default"] == 12 and layer.seal_scale["default"].shape == (4,)
    vector = seal_layers(model)[0][1].channel_scale("default").detach()
    assert torch.equal(vector, vector.view(4, 12)[:, :1].expand(4, 12).flatten())  # one scale per head


class _FakeAttention(torch.nn.Module):
    def __init__(self, in_features: int, **attrs):
        super().__init__()
        for k, v in attrs.items():
            setattr(self, k, v)
        self.o_proj = torch.nn.Linear(in_features, 8)


class _FakeNet(torch.nn.Module):
    def __init__(self, attention):
        super().__init__()
        self.attn = attention
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 16))

    def forward(self, x):
        return self.attn.o_proj(x)


def test_head_size_must_match_number_of_heads():
    # MLA-like module: head_dim is the RoPE part, v_head_dim the size of a head's output
    net = _FakeNet(_FakeAttention(32, num_heads=4, head_dim=2, v_head_dim=8))
    model = get_peft_model(net, SealConfig(target_modules=["attn.o_proj"]))
    assert seal_layers(model)[0][1].seal_group["default"] == 8
    # a head size that divides in_features but does not match the number of heads is refused
    net = _FakeNet(_FakeAttention(32, num_heads=4, head_dim=4))
    with pytest.raises(
        ValueError, match=r"head size 4 .*4 heads.*16.*32 input features.*SealConfig\(head_dim="
    ):
        get_peft_model(net, SealConfig(target_modules=["attn.o_proj"]))
    # the explicit override is only checked for divisibility, and channel scales need no head size
    net = _FakeNet(_FakeAttention(32, num_heads=4, head_dim=4))
    assert (
        seal_layers(get_peft_model(net, SealConfig(target_modules=["attn.o_proj"], head_dim=4)))[0][
            1
        ].seal_group["default"]
        == 4
    )
    net = _FakeNet(_FakeAttention(32, num_heads=4, head_dim=4))
    get_peft_model(net, SealConfig(target_modules=["attn.o_proj"], granularity="channel"))
    # the config's head count applies to modules that do not report their own
    base = make_model("llama")
    base.config.num_attention_heads = 2  # 2 x head_dim 8 = 16 != 32 input features of o_proj
    with pytest.raises(ValueError, match=r"head size 8 .*2 heads.*32 input features"):
        get_peft_model(base, SealConfig())


def test_head_granularity_refuses_non_attention_targets():
    with pytest.raises(ValueError, match=r"all-linear.*granularity='head'.*head_dim"):
        SealConfig(target_modules="all-linear")
    with pytest.raises(ValueError, match=r"all-linear"):
        SealConfig(target_modules="ALL-LINEAR", granularity="head")
    for target in (["mlp.down_proj"], ["self_attn.q_proj"], ["self_attn.v_proj"]):
        base = make_model("llama")
        with pytest.raises(
            ValueError, match=r"not an attention output projection.*granularity='channel'.*head_dim="
        ):
            get_peft_model(base, SealConfig(target_modules=target))
        assert not any(isinstance(m, SealLayer) for m in base.modules())
    # GPT-2's MLP projection has the same name as the attention's
    with pytest.raises(ValueError, match="not an attention output projection"):
        get_peft_model(make_model("gpt2"), SealConfig(target_modules=["mlp.c_proj"]))
    # channel scales, or an explicit head size, are the user's call
    model = get_peft_model(
        make_model("llama"), SealConfig(target_modules="all-linear", granularity="channel")
    )
    assert any(n.endswith("mlp.down_proj") for n, _ in seal_layers(model))
    model = get_peft_model(make_model("llama"), SealConfig(target_modules="all-linear", head_dim=8))
    assert {m.seal_group["default"] for _, m in seal_layers(model)} == {8}
    model = get_peft_model(make_model("llama"), SealConfig(target_modules=["mlp.down_proj"], head_dim=16))
    assert seal_layers(model)[0][1].seal_scale["default"].shape == (4,)


def test_phi_falcon_gpt2_gpt_neox_head_sizes():
    import transformers as tf

    phi = tf.PhiConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=L, num_attention_heads=4
    )
    torch.manual_seed(0)
    models = {"phi": tf.AutoModelForCausalLM.from_config(phi)}
    models |= {arch: make_model(arch) for arch in ("falcon", "gpt2", "gpt_neox", "gemma3")}
    for arch, base in models.items():
        model = get_peft_model(base, SealConfig())
        groups = {m.seal_group["default"] for _, m in seal_layers(model)}
        assert groups == ({16} if arch == "gemma3" else {8}), arch


def test_modules_to_save_are_trained_and_saved(tmp_path):
    model = get_peft_model(make_model("llama"), SealConfig(modules_to_save=["lm_head"]))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lm_head.modules_to_save" in n for n in names)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert any("lm_head" in k for k in keys) and any("seal_scale" in k for k in keys)


def test_deepcopy_and_state_dict_names():
    model = get_peft_model(make_model("llama"), SealConfig())
    clone = copy.deepcopy(model)
    assert [n for n, _ in seal_layers(clone)] == [n for n, _ in seal_layers(model)]
    assert all("seal_" in k for k in model.state_dict() if "seal" in k)
    assert isinstance(model, PeftModel)
