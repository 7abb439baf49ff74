"""Self-Extend's fused core (neighbour + grouped passes through the fused kernel, merged by log-sum-exp)
against the reference core: random inputs of many shapes, tiny models with a KV cache, generation, and
the grouped-key cache between decode steps."""

from __future__ import annotations

import types

import pytest
import torch
from conftest import VOCAB, load_benchmark, make_model

from seal_peft.extension import extend_context, self_extend_states
from seal_peft.extension.self_extend import SelfExtendState, _self_extend_attention

TOL = 1e-5  # fp32: the two cores differ only in summation order


def _inv_freq(dim: int) -> torch.Tensor:
    return 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def _inputs(batch, heads, kv_heads, kv_len, q_len, pad=None, mask=None, dim=16, seed=0):
    """Random q/k/v, transformers-style position ids (left padding: ``index - pad``, padded rows 1) and a
    mask as transformers builds it (``None``: causal without padding; ``"bool"``/``"float"``: causal + padding)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=g)
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=g)
    v = torch.randn(batch, kv_heads, kv_len, dim, generator=g)
    index_q = torch.arange(kv_len - q_len, kv_len)
    pad = torch.tensor(pad if pad is not None else [0] * batch)
    pos = index_q[None, :] - pad[:, None]
    pos = torch.where(pos < 0, torch.ones_like(pos), pos)
    attn = None
    if mask is not None:
        keys = torch.arange(kv_len)
        allowed = (index_q[:, None] >= keys[None, :])[None] & (keys[None, None, :] >= pad[:, None, None])
        attn = allowed[:, None]
        if mask == "float":
            attn = torch.zeros(attn.shape).masked_fill(~attn, torch.finfo(torch.float32).min)
    visible = index_q[None, :] >= pad[:, None]  # (batch, q): rows that attend to something
    return q, k, v, attn, pos, visible


def _attend(impl, q, k, v, attn, pos, window, group, block_size=None):
    state = SelfExtendState(
        group=group,
        window=window,
        base="sdpa",
        rotary=types.SimpleNamespace(inv_freq=_inv_freq(q.shape[-1])),
        block_size=block_size,
        impl=impl,
    )
    module = types.SimpleNamespace(_seal_self_extend=state, training=False)
    out, _ = _self_extend_attention(module, q, k, v, attn, scaling=q.shape[-1] ** -0.5, position_ids=pos)
    return out, state  # out: (batch, q, heads, dim)


# name: batch, heads, kv_heads, kv_len, q_len, window, group, pad, mask, block_size, prefill kernel path
CASES = {
    "prefill_mha_window_not_multiple_of_group": (1, 4, 4, 100, 100, 7, 3, None, None, None, True),
    "prefill_gqa_batch": (2, 6, 2, 64, 64, 16, 4, None, None, None, True),
    "prefill_one_past_window": (1, 4, 2, 17, 17, 16, 4, None, None, None, True),
    "prefill_blocks_and_tail": (2, 4, 2, 45, 45, 10, 4, None, None, None, True),
    "prefill_tail_shorter_than_block": (1, 6, 3, 53, 53, 12, 5, None, None, None, True),
    "prefill_small_query_blocks": (2, 4, 2, 50, 50, 10, 3, None, None, 7, False),
    "decode": (2, 6, 3, 90, 1, 10, 4, None, None, None, False),
    "decode_at_window_plus_one": (1, 4, 2, 11, 1, 10, 4, None, None, None, False),
    "chunked_prefill": (2, 4, 2, 80, 23, 10, 3, None, "bool", None, False),
    "chunked_prefill_small_blocks": (1, 4, 2, 80, 30, 9, 4, None, "bool", 4, False),
    "left_padding_bool_mask": (3, 4, 2, 60, 60, 10, 4, [0, 5, 31], "bool", None, False),
    "left_padding_float_mask": (3, 4, 2, 60, 60, 10, 4, [0, 5, 31], "float", None, False),
    "left_padding_decode": (2, 6, 2, 70, 1, 10, 3, [0, 12], "bool", None, False),
    "left_padding_chunk": (2, 4, 2, 70, 25, 8, 3, [4, 40], "float", 6, False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fused_core_matches_reference(name):
    batch, heads, kv_heads, kv_len, q_len, window, group, pad, mask, block, prefill = CASES[name]
    q, k, v, attn, pos, visible = _inputs(batch, heads, kv_heads, kv_len, q_len, pad, mask)
    ref, ref_state = _attend("reference", q, k, v, attn, pos, window, group, block)
    out, state = _attend("fused", q, k, v, attn, pos, window, group, block)
    assert ref_state.path_counts == {"reference": 1}
    expected = {"fused": 1, "fused_prefill": 1} if prefill else {"fused": 1}
    assert state.path_counts == expected
    assert out.shape == ref.shape == (batch, q_len, heads, q.shape[-1])
    assert (out - ref)[visible].abs().max() <= TOL
    assert torch.isfinite(out).all()  # rows hidden by padding: some finite value, as in the reference


def test_merge_is_the_softmax_over_the_union():
    """Partial softmaxes merged by log-sum-exp == one softmax over all keys; a part without keys (lse -inf)
    has weight 0; a row without any key gives 0 (finite)."""
    from seal_peft.extension.self_extend import _merge

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 5, 12, generator=g) * 4
    values = torch.randn(2, 3, 12, 8, generator=g)
    sets = [slice(0, 3), slice(3, 10), slice(10, 12)]
    hidden = torch.zeros(2, 3, 5, 12, dtype=torch.bool)
    hidden[0, :, 1, 3:] = True  # row 1 of batch 0: keys of the first set only
    hidden[1, :, 4, 10:] = True
    scores = scores.masked_fill(hidden, float("-inf"))
    parts = []
    for s in sets:
        part = scores[..., s]
        lse = torch.logsumexp(part, dim=-1)
        out = torch.nan_to_num(torch.softmax(part, dim=-1)) @ values[:, :, s]
        parts.append((out, lse))
    assert torch.isinf(parts[1][1][0, :, 1]).all()
    expected = torch.softmax(scores, dim=-1) @ values
    assert (_merge(parts) - expected).abs().max() <= TOL
    empty = [(torch.zeros(1, 1, 2, 4), torch.full((1, 1, 2), float("-inf")))] * 2
    assert torch.equal(_merge(empty), torch.zeros(1, 1, 2, 4))


def test_fused_prefill_equals_fused_blocks():
    """The maskless prefill path and the blocked path (forced by a block size) agree at several lengths."""
    for kv_len in (21, 40, 41, 77):
        q, k, v, attn, pos, _ = _inputs(2, 6, 3, kv_len, kv_len, seed=kv_len)
        a, sa = _attend("fused", q, k, v, attn, pos, 10, 3)
        b, sb = _attend("fused", q, k, v, attn, pos, 10, 3, block_size=8)
        assert "fused_prefill" in sa.path_counts and "fused_prefill" not in sb.path_counts
        assert (a - b).abs().max() <= TOL


def test_grouping_matters_at_the_window_edge():
    """The cases above can catch a window off by one: the grouped score of the key at distance
    ``window`` (and ``window - 1``) differs from its exact score when the group does not divide the window."""
    q, k, v, attn, pos, _ = _inputs(1, 4, 4, 100, 100)
    base, _ = _attend("fused", q, k, v, attn, pos, 7, 1)  # group 1: grouped == exact, plain causal attention
    plain = (
        torch.softmax((q @ k.transpose(2, 3)) * 0.25 + torch.full((100, 100), float("-inf")).triu(1), dim=-1)
        @ v
    )
    assert (base - plain.transpose(1, 2)).abs().max() <= TOL
    grouped, _ = _attend("fused", q, k, v, attn, pos, 7, 3)
    assert torch.equal(grouped[:, :7], base[:, :7])  # inside the window: neighbours only
    assert (grouped - base)[:, 7:].abs().max() > 1e-2


def test_fused_falls_back_to_reference():
    q, k, v, attn, pos, _ = _inputs(2, 4, 2, 40, 40)
    ref, _ = _attend("reference", q, k, v, attn, pos, 10, 4)
    # position ids that are not "cache index - a per-row offset" on rows that attend: the reference decides
    odd = pos.clone()
    odd[0, 5] += 3
    out, state = _attend("fused", q, k, v, attn, odd, 10, 4)
    assert state.path_counts == {"reference": 1}
    assert torch.equal(out, _attend("reference", q, k, v, attn, odd, 10, 4)[0])
    # gradients needed: the kernel's log-sum-exp has none, so the reference runs (and gradients flow)
    qg = q.clone().requires_grad_(True)
    out, state = _attend("fused", qg, k, v, attn, pos, 10, 4)
    assert state.path_counts == {"reference": 1}
    out.sum().backward()
    assert torch.isfinite(qg.grad).all() and qg.grad.abs().sum() > 0
    assert torch.equal(out.detach(), ref)
    with pytest.raises(ValueError, match="'fused'.*'reference'"):
        _attend("flash", q, k, v, attn, pos, 10, 4)


def test_fused_bf16_close_to_reference():
    q, k, v, attn, pos, _ = _inputs(1, 6, 2, 70, 70)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    ref, _ = _attend("reference", q, k, v, attn, pos, 16, 4)
    out, state = _attend("fused", q, k, v, attn, pos, 16, 4)
    assert out.dtype == torch.bfloat16 and "fused_prefill" in state.path_counts
    assert (out.float() - ref.float()).abs().max() < 3e-2  # bf16 rounding of inputs and outputs (~1e-2)


# ----------------------------------------------------------------------------------------- tiny models
WINDOW = 16


def _extended(arch: str, impl: str, attn_impl: str = "sdpa"):
    model = make_model(arch)
    model.set_attn_implementation(attn_impl)
    extend_context(model, "self_extend", factor=4, window=WINDOW)
    for state in self_extend_states(model):
        state.impl = impl
    return model


def _ids(n, batch=2, seed=0):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def _counts(model) -> dict[str, int]:
    total: dict[str, int] = {}
    for state in self_extend_states(model):
        for k, v in state.path_counts.items():
            total[k] = total.get(k, 0) + v
    return total


@torch.no_grad()
def _chunked_then_decode(model, ids, chunks, steps):
    """Logits of a prompt fed in chunks through the KV cache, then ``steps`` one-token steps."""
    cache, logits, start = None, [], 0
    for end in chunks:
        out = model(input_ids=ids[:, start:end], past_key_values=cache, use_cache=True)
        cache, start = out.past_key_values, end
        logits.append(out.logits)
    for t in range(start, start + steps):
        out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits)
    return torch.cat(logits, dim=1), cache


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "mistral"])  # mistral: 4 query heads on 2 kv heads
def test_fused_model_prefill_chunks_and_decode_match_reference(arch, attn_impl):
    ref, fused = _extended(arch, "reference", attn_impl), _extended(arch, "fused", attn_impl)
    ids = _ids(75)
    with torch.no_grad():
        full_ref, full = ref(ids).logits, fused(ids).logits
    assert (full - full_ref).abs().max() <= TOL
    a, _ = _chunked_then_decode(ref, ids, [11, 30, 55], 20)
    b, _ = _chunked_then_decode(fused, ids, [11, 30, 55], 20)
    assert (a - b).abs().max() <= TOL
    assert (b - full).abs().max() <= TOL  # incremental == one forward
    counts = _counts(fused)
    assert "reference" not in counts and counts["fused"] > 0
    assert counts.get("grouped_keys_reused", 0) > 0  # decode steps re-rotated only the new keys


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_fused_generate_left_padding_and_beams_match_reference(arch):
    ref, fused = _extended(arch, "reference"), _extended(arch, "fused")
    ids = _ids(60, batch=3, seed=1)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    mask[2, :37] = 0  # 23 real tokens: the grouped path starts while decoding
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        a = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        b = fused(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert (a - b)[mask.bool()].abs().max() <= TOL
    for kwargs in ({"max_new_tokens": 16}, {"max_new_tokens": 10, "num_beams": 3}):
        outs = [
            m.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0, **kwargs)
            for m in (ref, fused)
        ]
        assert torch.equal(outs[0], outs[1]), kwargs
    assert "reference" not in _counts(fused)


@torch.no_grad()
def test_grouped_key_cache_follows_cache_changes():
    """Reordering (beam search), cropping, a second cache, an in-place write, jumping positions: the
    grouped keys of the previous step are not reused then, and every step equals the reference."""
    ref, fused = _extended("mistral", "reference"), _extended("mistral", "fused")
    ids = _ids(70, batch=2, seed=2)

    def both(fn):
        return [fn(m) for m in (ref, fused)]

    caches = both(lambda m: m(input_ids=ids[:, :50], use_cache=True).past_key_values)
    others = both(lambda m: m(input_ids=ids.flip(0)[:, :52], use_cache=True).past_key_values)

    def step(t, cs, token=None, **kwargs):
        token = ids[:, t : t + 1] if token is None else token
        outs = [
            m(input_ids=token, past_key_values=c, use_cache=True, **kwargs).logits
            for m, c in zip((ref, fused), cs)
        ]
        assert (outs[0] - outs[1]).abs().max() <= TOL, t
        return outs[1]

    for t in range(50, 54):
        step(t, caches)
    reused = _counts(fused).get("grouped_keys_reused", 0)
    assert reused > 0
    for c in caches:
        c.reorder_cache(torch.tensor([1, 0]))  # rows swapped: keys no longer match the stored grouped keys
    step(54, caches)
    step(55, others)  # another cache on the same model
    step(56, caches)
    for c in caches:
        c.crop(50 - c.get_seq_length())  # back to 50 tokens, then continue with other tokens
    step(57, caches, token=ids[:, 3:4])
    for c in caches:
        c.layers[0].keys.mul_(1.5)  # an in-place change of the stored keys
    step(58, caches)
    step(59, caches)
    # positions that jump (every key's position, hence its grouped rotation, moves with the last query's)
    length = caches[0].get_seq_length()
    step(60, caches, position_ids=torch.full((2, 1), length + 7))
    assert _counts(fused).get("grouped_keys_reused", 0) > reused


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
def test_grouped_keys_reused_with_reserved_kv_room(grad_mode):
    """The evaluator's decode loop writes into reserved KV room (``_RoomyLayer``, append-only): the fused
    core still reuses the grouped keys, and every step equals the reference — also under
    ``torch.inference_mode``, the evaluator's, whose tensors carry no version counter."""
    with grad_mode():
        _reserved_room_steps()


def _reserved_room_steps():
    from seal_peft.evaluation.generation import reserve_kv_room

    ref, fused = _extended("mistral", "reference"), _extended("mistral", "fused")
    ids = _ids(70, batch=2, seed=4)
    caches = [m(input_ids=ids[:, :50], use_cache=True).past_key_values for m in (ref, fused)]
    assert all(reserve_kv_room(c, 30) == 2 for c in caches)
    before = _counts(fused).get("grouped_keys_reused", 0)
    for t in range(50, 70):
        a, b = (
            m(input_ids=ids[:, t : t + 1], past_key_values=c, use_cache=True).logits
            for m, c in zip((ref, fused), caches)
        )
        assert (a - b).abs().max() <= TOL, t
    assert _counts(fused)["grouped_keys_reused"] - before >= 2 * 18  # both layers, all but the first step
    assert caches[1].layers[0].keys.data_ptr() == caches[1].layers[0]._key_buffer.data_ptr()  # still in place


def test_grouped_key_capture_must_match_the_keys():
    """A capture is used only by the call whose keys the captured cache layer holds."""
    from transformers import DynamicCache

    from seal_peft.extension.self_extend import _GroupedKeyCache

    cache = DynamicCache()
    cache.update(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), 0)
    store = _GroupedKeyCache()
    store.capture(cache, 0)
    assert store.take(cache.layers[0].keys.clone()) == (None, None)  # equal values, another tensor
    assert store.current is None  # a capture is used at most once
    store.capture(cache, 0)
    layer, entry = store.take(cache.layers[0].keys)
    assert layer is cache.layers[0] and entry is None  # no grouped keys stored yet
    store.capture(None, 0)
    assert store.take(cache.layers[0].keys) == (None, None)
    store.capture(cache, 3)  # no such layer
    assert store.current is None


def test_remove_extension_removes_the_cache_hook():
    from seal_peft.extension import remove_extension

    model = _extended("llama", "fused")
    attention = [layer.self_attn for layer in model.model.layers]
    assert all(len(a._forward_pre_hooks) == 1 for a in attention)
    extend_context(model, "self_extend", factor=4, window=WINDOW)  # the same again: still one hook
    assert all(len(a._forward_pre_hooks) == 1 for a in attention)
    remove_extension(model)
    assert all(len(a._forward_pre_hooks) == 0 and not hasattr(a, "_seal_self_extend") for a in attention)
    extend_context(model, "self_extend", factor=4, window=WINDOW)
    assert all(len(a._forward_pre_hooks) == 1 for a in attention)


@pytest.mark.slow
def test_fused_greedy_identical_on_embedded_model():
    """The embedded SmolLM2 at 1.5K tokens, window 128 (far tokens grouped): greedy tokens equal, logits
    of every step close (the 10K check is in ``benchmarks/extension.py --speed``)."""
    from seal_peft.models import load_model

    model, tok = load_model()
    extend_context(model, "self_extend", factor=4, window=128)
    ids = torch.randint(100, 40000, (1, 1500), generator=torch.Generator().manual_seed(3))
    outs = {}
    for impl in ("reference", "fused"):
        for state in self_extend_states(model):
            state.impl, state.path_counts = impl, {}
        outs[impl] = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
            pad_token_id=tok.eos_token_id, output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
        assert impl in _counts(model) and set(_counts(model)) <= {
            impl,
            "fused_prefill",
            "grouped_keys_reused",
        }
    assert torch.equal(outs["fused"].sequences, outs["reference"].sequences)
    for a, b in zip(outs["fused"].logits, outs["reference"].logits):
        assert (a - b).abs().max() < 1e-3  # logits of size ~10-30 in fp32 over 30 layers


def test_speed_benchmark_runs_on_tiny_model(tmp_path, capsys):
    """``benchmarks/extension.py --speed`` end to end on the tiny random model (nothing timed is asserted)."""
    import json

    bench = load_benchmark("extension")
    out = tmp_path / "speed.json"
    report = bench.main(
        ["--speed", "--model", "tiny", "--dtype", "float32", "--lengths", "40,80", "--window", "16", "--group", "4",
         "--repeats", "2", "--decode-tokens", "2", "--check-length", "50", "--check-tokens", "4", "--in-process",
         "--out", str(out)]
    )  # fmt: skip
    assert json.loads(out.read_text())["summary"] == report["summary"]
    assert [r["length"] for r in report["summary"]] == [40, 80]
    for row in report["summary"]:
        for key in ("fused_prefill_ratio", "reference_prefill_ratio", "fused_decode_ratio", "fused_peak_mib"):
            assert row[key] == row[key], key  # a number, not NaN
    assert (
        len(report["runs"]) == 2 * 2 * 2 + 2 + 2
    )  # base + fused per repeat and length, reference once, check
    assert report["greedy_check"]["identical"] and len(report["greedy_check"]["fused_tokens"]) == 4
    fused = [r for r in report["runs"] if r["spec"]["variant"] == "fused" and not r["spec"].get("generate")]
    assert all("fused" in r["paths"] and "reference" not in r["paths"] for r in fused)
    printed = capsys.readouterr().out
    assert "fused/base" in printed and "fused == reference" in printed


@pytest.mark.parametrize("batch_size", [1, 2])
def test_evaluator_greedy_loop_runs_fused_and_matches_reference(batch_size):
    """The project's evaluator (``greedy_generate``: inference mode, reserved KV room, left padding) on a
    Self-Extended model: the fused core decodes (reusing grouped keys) the same tokens as the reference."""
    from seal_peft.evaluation.generation import greedy_generate

    prompts = [_ids(n, batch=1, seed=n)[0].tolist() for n in (60, 75, 90)]
    outs = {}
    for impl in ("reference", "fused"):
        model = _extended("llama", impl)
        outs[impl] = greedy_generate(model, prompts, max_new_tokens=6, eos_token_id=[], batch_size=batch_size,
                                     progress=False)  # fmt: skip
        assert impl in _counts(model)
    assert "reference" not in _counts(model) and _counts(model).get("grouped_keys_reused", 0) > 0
    assert outs["fused"] == outs["reference"] and all(len(t) == 6 for t in outs["fused"])


def test_speed_benchmark_decode_after_synthetic_cache(tmp_path):
    """``--decode-lengths``: decode alone after a random KV cache, base and fused interleaved in pairs."""
    bench = load_benchmark("extension")
    report = bench.main(
        ["--speed", "--model", "tiny", "--dtype", "float32", "--repeats", "0", "--check-length", "0",
         "--decode-lengths", "40,60", "--decode-repeats", "2", "--decode-steps", "2", "--window", "16",
         "--in-process", "--out", str(tmp_path / "decode.json")]
    )  # fmt: skip
    assert [r["length"] for r in report["decode_summary"]] == [40, 60]
    assert all(r["pairs"] == 2 and r["fused_decode_ratio"] > 0 for r in report["decode_summary"])
    fused = [r for r in report["runs"] if r["spec"]["variant"] == "fused"]
    assert len(fused) == 4 and all(len(r["decode_s"]) == 2 and "fused" in r["paths"] for r in fused)
