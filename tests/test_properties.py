"""Property-based checks of the SEAL arithmetic on a minimal module (milliseconds per example).

The module is an ``attn.o_proj`` projection (``nn.Linear``, or GPT-2's transposed ``Conv1D``) of random
shape; ``head_dim`` is given in the SealConfig, so nothing depends on a transformers config.
"""

from __future__ import annotations

import tempfile

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from seal_peft import SealConfig, SealLayer
from seal_peft.tuner.layer import UNMERGE_EPS

SETTINGS = settings(max_examples=50, deadline=None, derandomize=True)


class Attention(nn.Module):
    def __init__(self, in_features: int, out_features: int, conv1d: bool, bias: bool):
        super().__init__()
        self.o_proj = (
            Conv1D(out_features, in_features) if conv1d else nn.Linear(in_features, out_features, bias=bias)
        )


class Net(nn.Module):
    def __init__(self, heads: int, head_dim: int, out_features: int, conv1d: bool, bias: bool, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.attn = Attention(heads * head_dim, out_features, conv1d, bias)
        if conv1d:  # Conv1D starts with std 0.02 weights and zero bias: make both non-trivial
            with torch.no_grad():
                self.attn.o_proj.weight.normal_()
                self.attn.o_proj.bias.normal_()

    def forward(self, x):
        return self.attn.o_proj(x)


@st.composite
def setups(draw, n_adapters: int = 1):
    heads = draw(st.integers(1, 6))
    head_dim = draw(st.integers(1, 8))
    spec = dict(
        heads=heads,
        head_dim=head_dim,
        out_features=draw(st.integers(1, 12)),
        conv1d=draw(st.booleans()),
        bias=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )
    value = st.one_of(
        st.floats(-4.0, 4.0, allow_nan=False, width=32),
        st.sampled_from([0.0, -0.0, 1e-30, -1e-9, 1e-3, UNMERGE_EPS, 1.0]),
    )
    adapters = []
    for _ in range(n_adapters):
        granularity = draw(st.sampled_from(["head", "channel"]))
        n = heads if granularity == "head" else heads * head_dim
        adapters.append((granularity, draw(st.lists(value, min_size=n, max_size=n))))
    return spec, adapters


def build(spec, adapters):
    model = Net(**spec)
    names = []
    for i, (granularity, scales) in enumerate(adapters):
        name = f"a{i}"
        config = SealConfig(
            target_modules=["attn.o_proj"], head_dim=spec["head_dim"], granularity=granularity
        )
        if i == 0:
            model = get_peft_model(model, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        layer = seal_layer(model)
        with torch.no_grad():
            layer.seal_scale[name].copy_(torch.tensor(scales))
        names.append(name)
    model.base_model.set_adapter(names)
    return model.eval()


def seal_layer(model) -> SealLayer:
    return next(m for m in model.modules() if isinstance(m, SealLayer))


def channel_vector(spec, adapters) -> torch.Tensor:
    vector = torch.ones(spec["heads"] * spec["head_dim"])
    for granularity, scales in adapters:
        s = torch.tensor(scales)
        vector = vector * (s.repeat_interleave(spec["head_dim"]) if granularity == "head" else s)
    return vector


def inputs(spec, seed=0):
    return torch.randn(3, spec["heads"] * spec["head_dim"], generator=torch.Generator().manual_seed(seed))


def weight(model) -> torch.Tensor:
    return seal_layer(model).get_base_layer().weight


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(setups(n_adapters=1) | setups(n_adapters=2))
def test_forward_merge_unmerge(setup):
    spec, adapters = setup
    model = build(spec, adapters)
    x = inputs(spec)
    plain = Net(**spec)
    vector = channel_vector(spec, adapters)
    with torch.no_grad():
        expected = plain(x * vector)  # SEAL's definition
        close(model(x), expected)
        w = weight(model).detach().clone()
        model.merge_adapter()
        # W' = W diag(s): columns of a Linear weight, rows of a (transposed) Conv1D weight
        folded = w * (vector[:, None] if spec["conv1d"] else vector[None, :])
        close(weight(model), folded)
        close(model(x), expected)
        model.unmerge_adapter()
        restored = weight(model)
        small = vector.abs() < UNMERGE_EPS
        kept = restored[small] if spec["conv1d"] else restored[:, small]
        original = w[small] if spec["conv1d"] else w[:, small]
        if len(adapters) == 1:  # near-zero scales: exact (with two adapters, the other one's rounding stays)
            assert torch.equal(kept, original)
        # every other channel: one fp32 multiply and one divide per adapter, each rounding by <= 1/2 ulp
        err = (restored.double() - w.double()).abs()
        assert bool((err <= len(adapters) * torch.finfo(torch.float32).eps * w.double().abs()).all())
        close(model(x), expected)
        with model.disable_adapter():
            torch.testing.assert_close(model(x), plain(x), rtol=1e-6, atol=1e-6)


@SETTINGS
@given(setups(n_adapters=1) | setups(n_adapters=2))
def test_save_load_roundtrip(setup):
    spec, adapters = setup
    model = build(spec, adapters)
    x = inputs(spec, seed=1)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        loaded = PeftModel.from_pretrained(Net(**spec), f"{folder}/a0", adapter_name="a0")
        for i in range(1, len(adapters)):
            loaded.load_adapter(f"{folder}/a{i}", adapter_name=f"a{i}")
    loaded.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
    for name in seal_layer(model).seal_scale:
        assert torch.equal(seal_layer(loaded).seal_scale[name], seal_layer(model).seal_scale[name])
        assert seal_layer(loaded).seal_group[name] == seal_layer(model).seal_group[name]
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))


@SETTINGS
@given(setups(n_adapters=1))
def test_head_scale_equals_repeated_channel_scale(setup):
    spec, adapters = setup
    granularity, scales = adapters[0]
    if granularity == "channel":
        scales = scales[:: spec["head_dim"]]
    head = build(spec, [("head", scales)])
    channel = build(spec, [("channel", torch.tensor(scales).repeat_interleave(spec["head_dim"]).tolist())])
    x = inputs(spec, seed=2)
    with torch.no_grad():
        assert torch.equal(head(x), channel(x))
        head.merge_adapter()
        channel.merge_adapter()
    assert torch.equal(weight(head), weight(channel))
