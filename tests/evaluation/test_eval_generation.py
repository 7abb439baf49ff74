"""The cached greedy loop equals a naive no-cache loop; stop rules; logits_to_keep; errors."""

from __future__ import annotations

import pytest

from seal_peft.evaluation import (
    generate_answers,
    greedy_generate,
    is_numeric_answer,
    numeric_answer_complete,
)

PROMPTS = [
    [1, 10, 20, 30, 40, 50, 60, 70, 80, 5, 6, 7],
    [1, 44, 45, 46],
    [1, 12, 13, 14, 15, 16, 17, 18, 19, 21, 22, 23, 24, 25, 26, 27, 28, 29, 31],
    [1, 90],
]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_cached_loop_matches_naive_greedy(tiny_llama, naive_greedy, batch_size):
    expected = [naive_greedy(tiny_llama, p, 8) for p in PROMPTS]
    got = greedy_generate(
        tiny_llama, PROMPTS, max_new_tokens=8, eos_token_id=[], batch_size=batch_size, progress=False
    )
    assert got == expected


def test_prefill_keeps_one_logit_and_decode_uses_cache(scripted, char_tokenizer):
    model = scripted(default="abc")
    greedy_generate(
        model, [[1, 40, 41]], max_new_tokens=5, eos_token_id=char_tokenizer.eos_token_id, progress=False
    )
    assert model.calls[0]["logits_to_keep"] == 1 and not model.calls[0]["cached"]
    assert model.calls[0]["shape"] == (1, 3)
    assert all(c["cached"] and c["shape"] == (1, 1) for c in model.calls[1:])
    # "abc" then EOS: 1 prefill + 3 decode steps, the EOS is not fed back
    assert len(model.calls) == 4


def test_real_model_prefill_gets_logits_to_keep(tiny_llama):
    seen = []
    handle = tiny_llama.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs.get("logits_to_keep")), with_kwargs=True
    )
    try:
        greedy_generate(tiny_llama, [[1, 5, 6, 7]], max_new_tokens=3, eos_token_id=[], progress=False)
    finally:
        handle.remove()
    assert seen[0] == 1


def test_numeric_answer_stops_after_first_integer(scripted, make_record, char_tokenizer):
    rec = make_record("Q1?", "The value is 40779.", "40779")
    model = scripted({"Q1?": "The value is 40779. And 12 more words follow here"})
    out = generate_answers(model, char_tokenizer, [rec], max_new_tokens=60, progress=False)
    assert out == ["The value is 40779."]
    # without a stop rule it runs on to EOS
    out = generate_answers(model, char_tokenizer, [rec], max_new_tokens=60, progress=False, stop_rule=None)
    assert out == ["The value is 40779. And 12 more words follow here"]


def test_longeval_records_run_to_eos_under_their_own_cap(scripted, make_record, char_tokenizer):
    # LongEval scores the last integer of the whole reply: no early stop after the first number, and
    # the default cap is LongEval's 100 new tokens (24 for other records)
    long_reply = "The value is 40779. " + "x" * 150
    longeval = make_record("Q1?", "The value is 40779.", "40779", prompt_format="longeval")
    prefill = make_record("Q2?", "40779.", "40779", prompt_format="chat_prefill")
    model = scripted({"Q1?": "The value is 40779. And 12 more", "Q2?": "40779. And 12 more"})
    assert generate_answers(model, char_tokenizer, [longeval, prefill], progress=False) == [
        "The value is 40779. And 12 more",
        "40779.",
    ]
    model = scripted({"Q1?": long_reply, "Q2?": long_reply})
    out = generate_answers(model, char_tokenizer, [longeval, prefill], progress=False, stop_rule=None)
    assert len(char_tokenizer(out[0], add_special_tokens=False)["input_ids"]) == 100
    assert len(char_tokenizer(out[1], add_special_tokens=False)["input_ids"]) == 24
    with pytest.raises(ValueError, match="max_new_tokens"):  # 0 is an error, not "use the default"
        generate_answers(model, char_tokenizer, [longeval], max_new_tokens=0, progress=False)


def test_text_answer_runs_to_eos_and_custom_rule(scripted, make_record, char_tokenizer):
    rec = make_record("Q2?", "a red ball", "red ball", task="needle")
    model = scripted({"Q2?": "It is a red ball. Yes"})
    assert generate_answers(model, char_tokenizer, [rec], max_new_tokens=60, progress=False) == [
        "It is a red ball. Yes"
    ]
    out = generate_answers(
        model,
        char_tokenizer,
        [rec],
        max_new_tokens=60,
        progress=False,
        stop_rule=lambda record, text: text.endswith("."),
    )
    assert out == ["It is a red ball."]
    assert generate_answers(model, char_tokenizer, [rec], max_new_tokens=4, progress=False) == ["It i"]


def test_batched_generation_keeps_order(scripted, make_record, char_tokenizer):
    recs = [make_record(f"Question number {i}" + "?" * i, f"{i}.", str(i)) for i in range(5)]
    model = scripted({f"Question number {i}" + "?" * i: f"it is {i}. ok" for i in range(5)})
    out = generate_answers(model, char_tokenizer, recs, batch_size=2, progress=False)
    assert out == [f"it is {i}." for i in range(5)]


def test_stop_rule_helpers():
    assert is_numeric_answer("40779") and is_numeric_answer("<40779>") and is_numeric_answer(7)
    assert not is_numeric_answer("red ball") and not is_numeric_answer(None)
    assert not numeric_answer_complete("The value is 4077")
    assert numeric_answer_complete("The value is 40779.")
    assert numeric_answer_complete("line 3 is")  # the first integer decides, it is complete


def test_generation_errors(tiny_llama, char_tokenizer, make_record):
    with pytest.raises(ValueError, match="empty"):
        generate_answers(tiny_llama, char_tokenizer, [], progress=False)
    rec = make_record("Q?", "1", "1")
    del rec["prompt_length"]
    with pytest.raises(ValueError, match=r"prompt_length.*len\(input_ids\)"):
        generate_answers(tiny_llama, char_tokenizer, [rec], progress=False)
    bad = make_record("Q?", "1", "1")
    bad["prompt_length"] = 0
    with pytest.raises(ValueError, match="outside 1..len"):
        generate_answers(tiny_llama, char_tokenizer, [bad], progress=False)
    with pytest.raises(ValueError, match="stop_rule"):
        generate_answers(
            tiny_llama, char_tokenizer, [make_record("Q?", "1", "1")], progress=False, stop_rule="sometimes"
        )


def test_generation_accepts_a_datasets_dataset(tiny_llama, char_tokenizer, make_record):
    from datasets import Dataset

    recs = [make_record("Where is it?", "1", "1"), make_record("What?", "2", "2")]
    ds = Dataset.from_list(recs)
    assert generate_answers(
        tiny_llama, char_tokenizer, ds, max_new_tokens=4, progress=False
    ) == generate_answers(tiny_llama, char_tokenizer, recs, max_new_tokens=4, progress=False)
    with pytest.raises(ValueError, match="empty"):
        generate_answers(tiny_llama, char_tokenizer, ds.select([]), progress=False)


def test_model_training_mode_is_restored(tiny_llama):
    tiny_llama.train()
    try:
        greedy_generate(tiny_llama, [[1, 2, 3]], max_new_tokens=2, eos_token_id=[], progress=False)
        assert tiny_llama.training
    finally:
        tiny_llama.eval()
