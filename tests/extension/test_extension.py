"""Context extension (seal_peft.extension): Self-Extend exactness and position range, RoPE methods,
SEAL on top, the extension saved with the adapter, and clear errors for bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import VOCAB, make_model
from peft import get_peft_model

import seal_peft
from seal_peft.extension import (
    apply_from_config,
    extend_context,
    extended_context_length,
    extension_of,
    from_pretrained,
    parse_extend,
    record_extension,
    remove_extension,
    self_extend_states,
)

ARCHS = ["llama", "mistral", "qwen2"]
EXACT_ARCHS = ARCHS + ["qwen3", "mixtral"]
WINDOW = 16


def _model(arch: str, impl: str = "sdpa", seed: int = 0):
    model = make_model(arch, seed=seed)
    model.set_attn_implementation(impl)
    return model


def _ids(n: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _greedy_with_cache(model, ids: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Prefill, then ``steps`` one-token steps through the KV cache; the logits of every step."""
    out = model(input_ids=ids, use_cache=True)
    logits = [out.logits[:, -1]]
    cache = out.past_key_values
    for _ in range(steps):
        nxt = logits[-1].argmax(-1, keepdim=True)
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits[:, -1])
    return logits


# ------------------------------------------------------------------------------------ Self-Extend
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", EXACT_ARCHS)
def test_self_extend_is_exact_inside_window(arch, impl):
    ref = _model(arch, impl)
    ext = extend_context(_model(arch, impl), "self_extend", factor=4, window=WINDOW)
    assert ext.config._attn_implementation == f"seal_self_extend_{impl}"
    ids = _ids(WINDOW)
    with torch.no_grad():
        assert torch.equal(ext(ids).logits, ref(ids).logits)
    # with the KV cache: prompt + generated tokens stay inside the window
    for a, b in zip(_greedy_with_cache(ext, ids[:, :6], 9), _greedy_with_cache(ref, ids[:, :6], 9)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_self_extend_positions_stay_in_trained_range(impl):
    model = extend_context(_model("llama", impl), "self_extend", factor=4, window=WINDOW)
    native = model.config.seal_extension["native_max_position_embeddings"]  # 128
    n = 300  # > 2x the native window
    for state in self_extend_states(model):
        state.record_positions = True
    with torch.no_grad():
        logits = model(_ids(n, batch=1)).logits
    assert torch.isfinite(logits).all()
    _greedy_with_cache(model, _ids(n, batch=1)[:, :-20], 20)  # decoding past the window too
    for state in self_extend_states(model):
        s = state.stats
        assert s["max_neighbour_distance"] == WINDOW - 1
        assert s["max_group_position"] == (n - 1) // 4 + WINDOW - WINDOW // 4 < native
        assert s["max_group_distance"] < native
    assert extended_context_length(model) == (native - WINDOW + WINDOW // 4) * 4
    assert n <= extended_context_length(model)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_self_extend_long_path_machinery(arch, impl):
    """With group 1 the grouped positions are the exact ones, so the long path (blocks, merge by distance,
    masks, GQA, re-rotation) must reproduce the unextended model at any length; block size and the KV
    cache must not change the result with a real group either."""
    ref = _model(arch, impl)
    model = extend_context(_model(arch, impl), "self_extend", factor=4, window=WINDOW)
    ids = _ids(70)
    for state in self_extend_states(model):
        state.group = 1
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
    for state in self_extend_states(model):
        state.group, state.block_size = 4, 5
    with torch.no_grad():
        small_blocks = model(ids).logits
        for state in self_extend_states(model):
            state.block_size = None
        full = model(ids).logits
    torch.testing.assert_close(small_blocks, full, atol=1e-5, rtol=1e-5)
    assert (full - ref(ids).logits).abs().max() > 1e-4  # grouping does change far attention
    # incremental decoding through the cache == one full forward, beyond the window
    steps = _greedy_with_cache(model, ids[:, :60], 0)
    out = model(input_ids=ids[:, :60], use_cache=True)
    cache = out.past_key_values
    with torch.no_grad():
        for t in range(60, 70):
            step = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = step.past_key_values
            torch.testing.assert_close(step.logits[:, -1], full[:, t], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(steps[0], full[:, 59], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("core", ["fused", "reference"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@torch.no_grad()
def test_self_extend_matches_the_formula(impl, core):
    """One attention layer recomputed from scratch: neighbours at exact positions, the rest at
    query ``i // g + window - window // g`` and key ``j // g``, merged by distance, one softmax."""
    from transformers.models.llama.modeling_llama import rotate_half

    group, n = 4, 50
    model = extend_context(_model("llama", impl), "self_extend", factor=group, window=WINDOW)
    for state in self_extend_states(model):
        state.impl = core
    attn = model.model.layers[1].self_attn
    seen = {}
    attn.register_forward_hook(
        lambda mod, args, kwargs, out: seen.update(h=kwargs["hidden_states"], out=out[0]), with_kwargs=True
    )
    model(_ids(n, batch=1))
    h, rot = seen["h"], model.model.rotary_emb

    def heads(proj):
        return proj(h).view(1, n, -1, attn.head_dim).transpose(1, 2)

    def rope(x, positions):
        cos, sin = rot(x, positions[None])
        return x * cos[:, None] + rotate_half(x) * sin[:, None]

    q, k, v = heads(attn.q_proj), heads(attn.k_proj), heads(attn.v_proj)
    pos = torch.arange(n)
    exact = rope(q, pos) @ rope(k, pos).transpose(2, 3)
    grouped = rope(q, pos // group + WINDOW - WINDOW // group) @ rope(k, pos // group).transpose(2, 3)
    dist = pos[:, None] - pos[None, :]
    scores = torch.where(dist < WINDOW, exact, grouped) * attn.scaling
    scores = scores.masked_fill(dist < 0, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    expected = attn.o_proj(out.transpose(1, 2).reshape(1, n, -1))
    torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=1e-4)
    assert self_extend_states(model)[1].path_counts[core] == 1


def test_self_extend_with_seal_on_top_trains():
    ref = extend_context(_model("mistral"), "self_extend", factor=4, window=WINDOW)
    model = extend_context(_model("mistral"), "self_extend", factor=4, window=WINDOW)
    peft_model = get_peft_model(model, seal_peft.SealConfig(granularity="channel"))
    # extended before wrapping: recorded automatically (and record_extension is idempotent)
    record_extension(peft_model)
    assert peft_model.peft_config["default"].extension == {
        "method": "self_extend",
        "factor": 4,
        "window": WINDOW,
    }
    attn = peft_model.base_model.model.model.layers[0].self_attn
    assert isinstance(attn.o_proj, seal_peft.SealLayer)  # SEAL stays on o_proj, the core is Self-Extend
    ids = _ids(50)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, ref(ids).logits)  # scales start at 1
    peft_model.train()
    loss = peft_model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "seal_scale" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


# ---------------------------------------------------------------------------------------- RoPE methods
def test_ntk_scales_rope_base_and_rebuilds_rotary():
    model = _model("llama")
    theta = model.config.rope_parameters["rope_theta"]
    old_inv = model.model.rotary_emb.inv_freq.clone()
    extend_context(model, "ntk", factor=2)
    dim = 8
    assert model.config.rope_parameters["rope_theta"] == pytest.approx(theta * 2 ** (dim / (dim - 2)))
    assert model.config.max_position_embeddings == 256
    expected = 1.0 / (model.config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim))
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, expected)
    assert not torch.allclose(model.model.rotary_emb.inv_freq, old_inv)
    assert extended_context_length(model) == 256
    ids = _ids(20)
    with torch.no_grad():
        assert (model(ids).logits - _model("llama")(ids).logits).abs().max() > 1e-5
    remove_extension(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, _model("llama")(ids).logits)
    assert extension_of(model) is None


def test_dynamic_ntk_and_yarn_use_transformers_rope_types():
    dyn = extend_context(_model("qwen2"), "dynamic_ntk", factor=2)
    assert dyn.model.rotary_emb.rope_type == "dynamic"
    assert dyn.config.max_position_embeddings == 128  # the threshold of transformers' dynamic scaling
    ids = _ids(40)
    with torch.no_grad():  # inside the native window dynamic NTK is the plain model
        assert torch.equal(dyn(ids).logits, _model("qwen2")(ids).logits)
    yarn = extend_context(_model("qwen2"), "yarn", factor=4, beta_fast=16)
    rot = yarn.model.rotary_emb
    assert rot.rope_type == "yarn"
    assert rot.attention_scaling == pytest.approx(0.1 * math.log(4) + 1)
    assert yarn.config.rope_parameters["original_max_position_embeddings"] == 128
    assert yarn.config.rope_parameters["beta_fast"] == 16
    assert extension_of(yarn) == {"method": "yarn", "factor": 4.0, "beta_fast": 16.0}
    with torch.no_grad():
        assert torch.isfinite(yarn(_ids(300, batch=1)).logits).all()


# ---------------------------------------------------------------------------------- saved with adapter
@pytest.mark.parametrize(
    "method, factor, opts",
    [("ntk", 2, {}), ("self_extend", 4, {"window": WINDOW})],
)
def test_extension_round_trips_with_adapter(tmp_path, method, factor, opts):
    peft_model = get_peft_model(_model("llama"), seal_peft.SealConfig(granularity="head", init_weights=False))
    extend_context(peft_model, method, factor=factor, **opts)  # on the PeftModel: recorded in the config
    record = extension_of(peft_model)
    assert peft_model.peft_config["default"].extension == record
    seal_peft.save_adapter(peft_model, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["extension"] == record
    assert seal_peft.check_adapter_dir(tmp_path / "a")["extension"] == record

    reloaded = from_pretrained(_model("llama"), tmp_path / "a")
    assert extension_of(reloaded) == record
    assert reloaded.peft_config["default"].extension == record
    ids = _ids(40)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, peft_model(ids).logits)
    # apply_from_config on a fresh model, then the plain loader: same model
    fresh = apply_from_config(_model("llama"), tmp_path / "a")
    plain = seal_peft.from_pretrained(fresh, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, peft_model(ids).logits)
    apply_from_config(_model("llama"), seal_peft.SealConfig())  # no record: nothing to do


def _our_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "seal_peft.extension.from_pretrained" in str(w.message)]


@pytest.mark.parametrize(
    "method, factor, opts",
    [("ntk", 2, {}), ("self_extend", 4, {"window": WINDOW})],
)
def test_plain_load_of_extended_adapter_warns(tmp_path, method, factor, opts):
    """The plain loaders load the scales onto an unextended model: they must say so (and the right ones not)."""
    import warnings

    from peft import PeftModel

    peft_model = get_peft_model(_model("llama"), seal_peft.SealConfig(init_weights=False))
    extend_context(peft_model, method, factor=factor, **opts)
    seal_peft.save_adapter(peft_model, tmp_path / "a")
    for load in (PeftModel.from_pretrained, seal_peft.from_pretrained):
        with pytest.warns(UserWarning, match=rf"'{method}'.*apply_from_config") as record:
            load(_model("llama"), tmp_path / "a")
        assert any("seal_peft.extension.from_pretrained" in m for m in _our_warnings(record))
    other = extend_context(_model("llama"), "yarn", factor=2)  # a different extension: also a mismatch
    with pytest.warns(UserWarning, match="yarn"):
        PeftModel.from_pretrained(other, tmp_path / "a")
    # the loaders that apply the extension, and wrapping an extended model, stay quiet
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        from_pretrained(_model("llama"), tmp_path / "a")
        seal_peft.from_pretrained(apply_from_config(_model("llama"), tmp_path / "a"), tmp_path / "a")
        get_peft_model(extend_context(_model("llama"), method, factor=factor, **opts), seal_peft.SealConfig())
    assert _our_warnings(record) == []


def test_cli_extend_option(tmp_path):
    from seal_peft.cli import build_parser
    from seal_peft.cli._common import _apply_extend

    args = build_parser().parse_args(["eval", "--extend", "self_extend:4:window=512"])
    assert args.extend == "self_extend:4:window=512"
    assert build_parser().parse_args(["train", "--out", "x", "--extend", "ntk:2"]).extend == "ntk:2"
    assert parse_extend("self_extend:4:window=512") == {"method": "self_extend", "factor": 4, "window": 512}
    assert parse_extend("ntk:1.5") == {"method": "ntk", "factor": 1.5}

    class Tok:
        model_max_length = 100

    tok = Tok()
    model = _apply_extend(_model("llama"), tok, "ntk:2")
    assert extension_of(model) == {"method": "ntk", "factor": 2.0}
    assert tok.model_max_length == 256


# ---------------------------------------------------------------------------------------- bad input
def test_bad_input_gives_clear_errors():
    with pytest.raises(ValueError, match="Self-Extend is implemented for model types"):
        extend_context(make_model("gpt2"), "self_extend", factor=4, window=8)
    for factor in (1, 0.5, -2):
        with pytest.raises(ValueError, match="factor > 1"):
            extend_context(_model("llama"), "ntk", factor=factor)
    with pytest.raises(TypeError, match="factor must be a number"):
        extend_context(_model("llama"), "yarn", factor="2")
    with pytest.raises(ValueError, match="integer"):
        extend_context(_model("llama"), "self_extend", factor=2.5, window=WINDOW)
    with pytest.raises(ValueError, match="smaller than the model's native window"):
        extend_context(_model("llama"), "self_extend", factor=4, window=128)
    with pytest.raises(ValueError, match="unknown context-extension method"):
        extend_context(_model("llama"), "linear", factor=2)
    with pytest.raises(ValueError, match="unknown option"):
        extend_context(_model("llama"), "ntk", factor=2, window=8)
    with pytest.raises(ValueError, match="'sdpa' and 'eager'"):
        model = _model("llama")
        model.config._attn_implementation_internal = "flex_attention"
        extend_context(model, "self_extend", factor=4, window=WINDOW)
    extended = extend_context(_model("llama"), "ntk", factor=2)
    extend_context(extended, "ntk", factor=2)  # the same again: a no-op
    with pytest.raises(ValueError, match="already extended"):
        extend_context(extended, "self_extend", factor=4, window=WINDOW)
    with pytest.raises(ValueError, match="METHOD:FACTOR"):
        parse_extend("ntk")
    with pytest.raises(ValueError, match="not a number"):
        parse_extend("ntk:two")
    with pytest.raises(ValueError, match="extension"):
        seal_peft.SealConfig(extension={"method": "rope", "factor": 2})
    with pytest.raises(ValueError, match="factor"):
        seal_peft.SealConfig(extension={"method": "ntk", "factor": 1})
