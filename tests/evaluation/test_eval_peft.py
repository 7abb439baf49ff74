"""Evaluation through peft.PeftModel (LoRA and SEAL adapters)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from seal_peft.evaluation import evaluate_retrieval, generate_answers, greedy_generate, perplexity

PROMPTS = [[1, 10, 20, 30, 40, 50, 60, 70], [1, 44, 45], [1, 12, 13, 14, 15, 16, 17, 18, 19, 21, 22]]
IDS = [1] + [(5 * i + 7) % 90 + 4 for i in range(30)]


def lora(model):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(model, config)


def seal(model, granularity="head"):
    import seal_peft

    peft_model = get_peft_model(model, seal_peft.SealConfig(granularity=granularity))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "seal_" in name:
                p.copy_(torch.rand_like(p) * 2)  # scales far from identity
    return peft_model


@pytest.mark.parametrize("wrap", [lora, seal])
def test_cached_loop_matches_naive_through_peft(tiny_llama_factory, naive_greedy, wrap):
    model = wrap(tiny_llama_factory(seed=2)).eval()
    expected = [naive_greedy(model, p, 6) for p in PROMPTS]
    for batch_size in (1, 2):
        got = greedy_generate(
            model, PROMPTS, max_new_tokens=6, eos_token_id=[], batch_size=batch_size, progress=False
        )
        assert got == expected
    with model.disable_adapter():
        base = greedy_generate(model, PROMPTS, max_new_tokens=6, eos_token_id=[], progress=False)
    assert base != expected  # the adapter really changed the model under test


def test_seal_identity_adapter_gives_base_answers(tiny_llama_factory, char_tokenizer, make_record):
    import seal_peft

    recs = [
        make_record("line a: <12>. a?", "12.", "12"),
        make_record("line b: <7>. b?", "7.", "7", depth=0.2),
    ]
    base = tiny_llama_factory(seed=4)
    base_result = evaluate_retrieval(base, char_tokenizer, recs, max_new_tokens=5, progress=False)
    peft_model = get_peft_model(base, seal_peft.SealConfig(granularity="channel"))
    seal_result = evaluate_retrieval(peft_model, char_tokenizer, recs, max_new_tokens=5, progress=False)
    assert seal_result.outputs() == base_result.outputs()
    assert generate_answers(peft_model, char_tokenizer, recs, max_new_tokens=5, progress=False) == (
        base_result.outputs()
    )


def test_perplexity_through_peft_and_disabled_adapter(tiny_llama_factory):
    base = tiny_llama_factory(seed=5)
    base_ppl = perplexity(base, None, IDS, max_length=12)
    model = seal(base)
    tuned_ppl = perplexity(model, None, IDS, max_length=12)
    with model.disable_adapter():
        assert perplexity(model, None, IDS, max_length=12) == pytest.approx(base_ppl, rel=1e-6)
    assert tuned_ppl != pytest.approx(base_ppl, rel=1e-3)
