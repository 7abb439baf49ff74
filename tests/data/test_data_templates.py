"""User templates and the prompt encoder with other chat templates / tokenizers."""

from __future__ import annotations

import math
import random

import pytest

from seal_peft.data import DEFAULT_TEMPLATE, PromptEncoder, line_retrieval, user_template

from .test_data_retrieval import check_row, labelled

EXAMPLES = [
    {
        "context": "The vault code is 7731. The lobby is blue.",
        "question": "What is the vault code?",
        "answer": "7731",
    },
    {
        "context": "Mia owns a red kite.",
        "question": "What colour is Mia's kite?",
        "answer": "red",
        "key": "mia",
    },
]


@pytest.mark.parametrize("fmt", ["chat", "plain"])
def test_user_template_list(smol_tokenizer, fmt):
    ds = user_template(smol_tokenizer, EXAMPLES, prompt_format=fmt, progress=False)
    assert len(ds) == 2 and set(ds["task"]) == {"user_template"}
    for row, ex in zip(ds, EXAMPLES):
        check_row(smol_tokenizer, row)
        prompt = smol_tokenizer.decode(row["input_ids"][: row["prompt_length"]])
        assert ex["context"] in prompt and f"Question: {ex['question']}\nAnswer:" in prompt
        assert row["answer"] == ex["answer"]
    assert ds[1]["key"] == "mia" and ds[0]["key"] == "0"
    assert math.isclose(ds[0]["depth"], 18 / (len(EXAMPLES[0]["context"]) - 4))
    if fmt == "chat":
        assert ds["target"] == ["7731<|im_end|>", "red<|im_end|>"]
    else:
        assert ds["target"] == [" 7731<|im_end|>", " red<|im_end|>"]
        assert smol_tokenizer.decode(ds[0]["input_ids"]).startswith(EXAMPLES[0]["context"])


def test_user_template_callable_and_prefill(smol_tokenizer):
    def make(rng: random.Random) -> dict:
        code = rng.randint(1000, 9999)
        return {
            "context": f"noise noise. The code is {code}. more noise.",
            "question": "Code?",
            "answer": str(code),
            "target": f"The code is {code}.",
            "prefill": "The code is",
        }

    ds = user_template(
        smol_tokenizer,
        make,
        template="Read: {context}\n{question} {answer}",
        num_samples=3,
        prompt_format="chat_prefill",
        seed=4,
        progress=False,
    )
    for row in ds:
        check_row(smol_tokenizer, row)
        assert row["target"] == f" {row['answer']}.<|im_end|>"
        assert smol_tokenizer.decode(row["input_ids"][: row["prompt_length"]]).endswith(
            "assistant\nThe code is"
        )
    again = user_template(
        smol_tokenizer,
        make,
        template="Read: {context}\n{question} {answer}",
        num_samples=3,
        prompt_format="chat_prefill",
        seed=4,
        progress=False,
    )
    assert again.to_dict() == ds.to_dict()
    other = user_template(smol_tokenizer, make, num_samples=3, seed=5, progress=False)
    assert other["answer"] != ds["answer"]


def test_user_template_errors(smol_tokenizer, char_tokenizer):
    with pytest.raises(ValueError, match="empty"):
        user_template(smol_tokenizer, [], progress=False)
    with pytest.raises(ValueError, match="num_samples"):
        user_template(smol_tokenizer, lambda rng: EXAMPLES[0], progress=False)
    with pytest.raises(ValueError, match="unknown slot"):
        user_template(smol_tokenizer, EXAMPLES, template="{context} {foo} {answer}", progress=False)
    with pytest.raises(ValueError, match="last slot"):
        user_template(smol_tokenizer, EXAMPLES, template="{answer} {context}", progress=False)
    with pytest.raises(ValueError, match="exactly one"):
        user_template(smol_tokenizer, EXAMPLES, template="{context} {question}", progress=False)
    with pytest.raises(ValueError, match="prefill"):
        user_template(smol_tokenizer, EXAMPLES, prompt_format="chat_prefill", progress=False)
    with pytest.raises(ValueError, match="empty answer"):
        user_template(smol_tokenizer, [{"context": "c", "question": "q", "answer": " "}], progress=False)
    with pytest.raises(ValueError, match="lacks"):
        user_template(smol_tokenizer, [{"question": "q", "answer": "a"}], progress=False)
    with pytest.raises(ValueError, match="plain"):
        user_template(char_tokenizer, EXAMPLES, prompt_format="chat", progress=False)
    with pytest.raises(ValueError, match="limit"):
        user_template(smol_tokenizer, EXAMPLES, max_length=10, progress=False)
    assert "{answer}" in DEFAULT_TEMPLATE


def test_user_template_plain_with_bos(char_tokenizer):
    ds = user_template(char_tokenizer, EXAMPLES, prompt_format="plain", progress=False)
    row = ds[0]
    assert row["input_ids"][0] == char_tokenizer.bos_token_id
    assert row["target"] == " 7731</s>"
    check_row(char_tokenizer, row)


# a Llama-3-like template: header tokens, end-of-turn without a trailing newline, no default system
LLAMA3_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n\n{{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n\n{% endif %}"
)
# a template that inserts an (empty) reasoning block before the assistant content
THINKING = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}<think>\n</think>\n{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("template,end", [(LLAMA3_LIKE, "<|endoftext|>"), (THINKING, "<|im_end|>")])
@pytest.mark.parametrize("fmt", ["chat", "chat_prefill"])
def test_other_chat_templates(smol_copy, template, end, fmt):
    smol_copy.chat_template = template
    ds = line_retrieval(smol_copy, num_samples=2, length=500, prompt_format=fmt, seed=0, progress=False)
    for row in ds:
        check_row(smol_copy, row, 500)
        assert row["target"].endswith(f"{row['answer']}>.{end}")
        assert labelled(row)[-1] == row["input_ids"][len(labelled(row)) + row["prompt_length"] - 1]
    if template is THINKING:
        prompt = smol_copy.decode(ds[0]["input_ids"][: ds[0]["prompt_length"]])
        assert "<think>\n</think>\n" in prompt  # the template's prefix is part of the prompt, not the label


def test_chat_template_that_rewrites_the_reply(smol_copy):
    smol_copy.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(ValueError, match="plain"):
        PromptEncoder(smol_copy, "chat").encode("hello", "The answer is", " 42.")
