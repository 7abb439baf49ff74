"""The evaluator's fast paths change no token: the loop equals ``model.generate`` (per-record caps, EOS,
stop rules), decoding into reserved KV room is bit-identical to transformers' concatenating cache, and
the stop rule only decodes the records it can stop."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from seal_peft.evaluation import generate_answers
from seal_peft.evaluation.generation import (
    _RoomyLayer,
    generate_answer_tokens,
    greedy_generate,
    reserve_kv_room,
)
from seal_peft.evaluation.hf_generate import generate_answer_tokens_hf, generate_answers_hf


def _records(make_record):
    return [
        make_record("Where is line 3?", "The value is 40779.", "40779", prompt_format="longeval"),
        make_record("Q: what is the number?", "40779.", "40779", prompt_format="chat_prefill"),
        make_record("Find the needle, please.", "a red ball", "red ball", task="needle"),
        make_record("Short", "1", "1"),
    ]


def _with_eos_inside(model, tokenizer, records):
    """Make tokens the greedy loop emits early in two records extra EOS ids of ``model``; return the
    uncut continuations and the extra ids."""
    free = generate_answer_tokens(model, tokenizer, records, max_new_tokens=100, progress=False, stop_rule=None)
    keep = set(free[1][:24])  # record 1 must still run to its cap
    extra = {next(t for t in free[i][:12] if t not in keep) for i in (0, 2)}
    model.generation_config.eos_token_id = sorted({tokenizer.eos_token_id, *extra})
    return free, extra


@pytest.mark.parametrize("peft", [False, True], ids=["plain", "seal"])
def test_loop_matches_model_generate(tiny_llama_factory, char_tokenizer, make_record, peft):
    model = tiny_llama_factory(3)
    if peft:
        from peft import get_peft_model

        import seal_peft

        model = get_peft_model(model, seal_peft.SealConfig(granularity="head", init_weights=False)).eval()
    records = _records(make_record)
    free, extra = _with_eos_inside(model, char_tokenizer, records)

    def rule(record, text):  # a custom stop rule that fires for one record only
        return record["task"] == "needle" and len(text) >= 4

    for kwargs in ({}, {"max_new_tokens": 7}, {"stop_rule": None}, {"stop_rule": rule}):
        loop = generate_answer_tokens(model, char_tokenizer, records, progress=False, **kwargs)
        ref = generate_answer_tokens_hf(model, char_tokenizer, records, progress=False, **kwargs)
        assert loop == ref, kwargs
        assert not any(t in extra for toks in loop for t in toks)  # EOS ended them, and is not returned
        assert generate_answers(model, char_tokenizer, records, progress=False, **kwargs) == (
            generate_answers_hf(model, char_tokenizer, records, progress=False, **kwargs)
        )
    # the per-record caps (LongEval's 100, the others' 24) and the EOS really were exercised
    caps = [100, 24, 24, 24]
    cut = [next((j for j, t in enumerate(f) if t in extra), len(f)) for f in free]
    expected = [min(c, n) for c, n in zip(caps, cut)]
    got = generate_answer_tokens(model, char_tokenizer, records, progress=False, stop_rule=None)
    assert [len(t) for t in got] == expected
    assert got == [f[:n] for f, n in zip(free, expected)]
    assert expected[0] < 12 and expected[2] < 12 and expected[1] == 24  # EOS-ended and cap-ended records


def _decode_logits(model, prompts, steps, room):
    """Prefill ``prompts`` (left padded), then ``steps`` greedy single-token steps; every step's logits."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    if room:
        assert reserve_kv_room(cache, room) == model.config.num_hidden_layers
    logits = [out.logits[:, -1]]
    for _ in range(steps):
        nxt = logits[-1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=-1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits), cache


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("batched", [False, True], ids=["one", "padded-batch"])
def test_kv_room_decoding_is_bit_identical(tiny_llama_factory, attn, batched):
    model = tiny_llama_factory(1)
    model.config._attn_implementation = attn
    prompts = [[1, 5, 9, 14, 3, 22, 40, 41, 7]] + ([[1, 60, 61]] if batched else [])
    with torch.inference_mode():
        ref, ref_cache = _decode_logits(model, prompts, steps=6, room=0)
        got, cache = _decode_logits(model, prompts, steps=6, room=6)
        short, _ = _decode_logits(model, prompts, steps=6, room=2)  # out of room after 2 steps: concatenates
    assert torch.equal(got, ref) and torch.equal(short, ref)
    assert all(type(layer) is _RoomyLayer for layer in cache.layers)
    for a, b in zip(cache.layers, ref_cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_decode_steps_write_in_place(tiny_llama_factory):
    # before: DynamicCache concatenated, i.e. every decode step copied every layer's whole cache
    model = tiny_llama_factory(2)
    pointers = []

    def record(module, args, kwargs, output):
        cache = output.cache if getattr(output, "cache", None) is not None else output.past_key_values
        layer = cache.layers[0]
        pointers.append((type(layer), layer.keys.untyped_storage().data_ptr(), layer.keys.shape[-2]))

    handle = model.register_forward_hook(record, with_kwargs=True)
    try:
        greedy_generate(model, [[1, 5, 6, 7, 8]], max_new_tokens=5, eos_token_id=[], progress=False)
    finally:
        handle.remove()
    decode = pointers[1:]
    assert [n for _, _, n in decode] == [6, 7, 8, 9]
    assert {cls for cls, _, _ in decode} == {_RoomyLayer}
    assert len({ptr for _, ptr, _ in decode}) == 1  # one buffer, no per-step copy


def test_roomy_layer_crop_select_and_overflow_match_dynamic_layer():
    g = torch.Generator().manual_seed(0)

    def kv(n, batch=2):
        return torch.randn(batch, 3, n, 4, generator=g), torch.randn(batch, 3, n, 5, generator=g)

    k0, v0 = kv(5)
    ref = DynamicLayer()
    ref.update(k0, v0)
    roomy = _RoomyLayer(k0, v0, room=3)
    steps = [("update", kv(1)), ("update", kv(2)), ("crop", -2), ("update", kv(2))]
    steps += [("select", torch.tensor([1])), ("update", kv(1, batch=1)), ("update", kv(4, batch=1))]
    for op, arg in steps:
        for layer in (ref, roomy):
            if op == "update":
                got = layer.update(*arg)
            elif op == "crop":
                layer.crop(arg)
            else:
                layer.batch_select_indices(arg)
        if op == "update":
            assert torch.equal(got[0], ref.keys) and torch.equal(got[1], ref.values)
        assert torch.equal(roomy.keys, ref.keys) and torch.equal(roomy.values, ref.values), op
        assert roomy.get_seq_length() == ref.get_seq_length()


def test_reserve_kv_room_leaves_other_caches_alone():
    assert reserve_kv_room(None, 4) == 0
    assert reserve_kv_room(((torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)),), 4) == 0  # legacy tuples
    cache = DynamicCache()
    cache.update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), 0)
    assert reserve_kv_room(cache, 0) == 0 and type(cache.layers[0]) is DynamicLayer
    assert reserve_kv_room(cache, 4) == 1 and type(cache.layers[0]) is _RoomyLayer


class _CountingTokenizer:
    def __init__(self, tokenizer):
        self._tok, self.decodes = tokenizer, 0

    def decode(self, *args, **kwargs):
        self.decodes += 1
        return self._tok.decode(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_auto_rule_decodes_only_the_records_it_can_stop(scripted, make_record, char_tokenizer):
    # before: the text of every record was decoded at every step, also where "auto" can never stop
    # (LongEval records, text answers)
    longeval = make_record("Q1?", "The value is 40779.", "40779", prompt_format="longeval")
    needle = make_record("Q2?", "a red ball", "red ball", task="needle")
    numeric = make_record("Q3?", "40779.", "40779", prompt_format="chat_prefill")
    model = scripted({"Q1?": "The value is 40779. Done", "Q2?": "It is a red ball.", "Q3?": "40779. And"})
    tok = _CountingTokenizer(char_tokenizer)
    assert generate_answers(model, tok, [longeval, needle], progress=False) == [
        "The value is 40779. Done",
        "It is a red ball.",
    ]
    assert tok.decodes == 2  # the final decode of each record only
    tok.decodes = 0
    assert generate_answers(model, tok, [numeric], progress=False) == ["40779."]
    assert tok.decodes == len("40779.") + 1  # every step of the record the rule can stop, then the final one
