"""Line retrieval and key-value retrieval: schema, lengths, label masking, determinism, disjointness."""

from __future__ import annotations

import warnings

import pytest

from seal_peft.data import (
    COLUMNS,
    MAX_VALUE,
    check_disjoint,
    kv_retrieval,
    line_retrieval,
    load_words,
)

FORMATS = ["longeval", "chat", "chat_prefill", "plain"]


def labelled(row) -> list[int]:
    return [t for t in row["labels"] if t != -100]


def check_row(tok, row, length=None, tol=0.03):
    assert set(COLUMNS) <= set(row)
    ids, labels, p = row["input_ids"], row["labels"], row["prompt_length"]
    assert len(ids) == len(labels) == len(row["attention_mask"]) == row["length"]
    assert all(m == 1 for m in row["attention_mask"])
    assert all(t == -100 for t in labels[:p])  # the prompt is masked ...
    assert labels[p] == ids[p]  # ... and supervision starts right after it
    sup = [i for i, t in enumerate(labels) if t != -100]
    assert sup == list(range(p, p + len(sup)))  # one contiguous answer span
    assert all(labels[i] == ids[i] for i in sup)
    assert (
        tok.decode(labelled(row), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        == row["target"]
    )
    assert row["answer"] in row["target"]
    assert 0.0 <= row["depth"] <= 1.0
    if length is not None:
        assert abs(row["length"] - length) <= max(2, tol * length), (row["length"], length)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("length", [256, 1024, 4096])
def test_line_retrieval_lengths_and_labels(smol_tokenizer, fmt, length):
    ds = line_retrieval(
        smol_tokenizer, num_samples=3, length=length, prompt_format=fmt, seed=11, progress=False
    )
    assert len(ds) == 3 and set(ds["task"]) == {"line_retrieval"}
    for row in ds:
        check_row(smol_tokenizer, row, length)
        key, value = row["key"], row["answer"]
        assert 1 <= int(value) <= MAX_VALUE
        assert f"line {key}: REGISTER_CONTENT is <{value}>\n" in smol_tokenizer.decode(row["input_ids"])
        prompt = smol_tokenizer.decode(row["input_ids"][: row["prompt_length"]])
        assert prompt.count(f"line {key}:") == 1  # keys are unique within a sample
        assert f"Tell me what is the <REGISTER_CONTENT> in line {key}? I need the number." in prompt
        assert row["prompt_format"] == fmt
        if fmt == "longeval":  # LongEval's header, an empty assistant turn, the paper's answer sentence
            assert "retrieve the corresponding <REGISTER_CONTENT> of a certain line index. Now the record start:" in prompt
            assert row["target"] == f"The <REGISTER_CONTENT> in line {key} is {value}.<|im_end|>"
            assert prompt.endswith("<|im_start|>assistant\n")
        elif fmt == "chat":
            assert row["target"] == f"The <REGISTER_CONTENT> in line {key} is <{value}>.<|im_end|>"
            assert prompt.endswith("<|im_start|>assistant\n")
        elif fmt == "chat_prefill":
            assert row["target"] == f"{value}>.<|im_end|>"
            assert prompt.endswith(f"<|im_start|>assistant\nThe <REGISTER_CONTENT> in line {key} is <")
        else:
            assert row["target"] == f" The <REGISTER_CONTENT> in line {key} is <{value}>.<|im_end|>"
            assert prompt.endswith("I need the number.\nAnswer:") and "<|im_start|>" not in prompt


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("length", [1024, 4096])
def test_kv_retrieval_lengths_and_labels(smol_tokenizer, fmt, length):
    ds = kv_retrieval(smol_tokenizer, num_samples=2, length=length, prompt_format=fmt, seed=3, progress=False)
    for row in ds:
        check_row(smol_tokenizer, row, length)
        text = smol_tokenizer.decode(row["input_ids"][: row["prompt_length"]])
        assert f'"{row["key"]}": "{row["answer"]}"' in text
        assert len(row["key"]) == len(row["answer"]) == 36  # UUIDs
        if fmt == "chat_prefill":
            assert row["target"] == f' "{row["answer"]}".<|im_end|>'


def test_kv_retrieval_json_is_valid(smol_tokenizer):
    import json
    import re

    row = kv_retrieval(smol_tokenizer, num_samples=1, length=800, seed=0, progress=False)[0]
    text = smol_tokenizer.decode(row["input_ids"])
    obj = json.loads(re.search(r"\{\n.*?\n\}", text, re.S).group(0))
    assert obj[row["key"]] == row["answer"]
    assert len(obj) >= 5


def test_chat_and_prefill_share_input_ids(smol_tokenizer):
    a = line_retrieval(
        smol_tokenizer, num_samples=2, length=512, prompt_format="chat", seed=4, progress=False
    )
    b = line_retrieval(
        smol_tokenizer, num_samples=2, length=512, prompt_format="chat_prefill", seed=4, progress=False
    )
    assert a["input_ids"] == b["input_ids"]
    assert all(pb > pa for pa, pb in zip(a["prompt_length"], b["prompt_length"]))


def test_length_list_and_depth_grid(smol_tokenizer):
    lengths, depths = [300, 600], [0.0, 0.5, 1.0]
    ds = line_retrieval(smol_tokenizer, num_samples=6, length=lengths, depths=depths, seed=2, progress=False)
    for i, row in enumerate(ds):
        want_len, want_depth = lengths[i % 2], depths[(i // 2) % 3]
        assert abs(row["length"] - want_len) <= 0.03 * want_len
        assert abs(row["depth"] - want_depth) <= 0.05
    first = ds[0]  # depth 0: the asked line is the first record line
    text = smol_tokenizer.decode(first["input_ids"])
    assert text.split("Now the record start:\n\n")[1].startswith(f"line {first['key']}:")
    last = ds[5]  # depth 1: the asked line is the last record line
    text = smol_tokenizer.decode(last["input_ids"])
    assert text.split("\n\nNow the record is over.")[0].endswith(
        f"line {last['key']}: REGISTER_CONTENT is <{last['answer']}>"
    )


def test_random_depths_cover_the_context(smol_tokenizer):
    ds = line_retrieval(smol_tokenizer, num_samples=30, length=1024, seed=8, progress=False)
    d = ds["depth"]
    assert min(d) < 0.2 and max(d) > 0.8


def test_determinism_and_prefix_property(smol_tokenizer):
    a = line_retrieval(smol_tokenizer, num_samples=3, length=400, seed=21, progress=False)
    b = line_retrieval(smol_tokenizer, num_samples=3, length=400, seed=21, progress=False)
    assert a.to_dict() == b.to_dict()
    c = line_retrieval(smol_tokenizer, num_samples=5, length=400, seed=21, progress=False)
    assert c.select(range(3)).to_dict() == a.to_dict()  # sample i depends only on (seed, i)
    k1 = kv_retrieval(smol_tokenizer, num_samples=2, length=700, seed=1, progress=False)
    k2 = kv_retrieval(smol_tokenizer, num_samples=2, length=700, seed=1, progress=False)
    assert k1.to_dict() == k2.to_dict()


def test_different_seeds_are_disjoint(smol_tokenizer):
    train = line_retrieval(smol_tokenizer, num_samples=20, length=300, seed=0, progress=False)
    evals = line_retrieval(smol_tokenizer, num_samples=20, length=300, seed=1, progress=False)
    assert not set(train["key"]) & set(evals["key"])
    assert not set(train["answer"]) & set(evals["answer"])
    check_disjoint(train, evals)
    kv_a = kv_retrieval(smol_tokenizer, num_samples=3, length=700, seed=0, progress=False)
    kv_b = kv_retrieval(smol_tokenizer, num_samples=3, length=700, seed=1, progress=False)
    check_disjoint(kv_a, kv_b)


def test_check_disjoint_raises_on_overlap(smol_tokenizer):
    ds = line_retrieval(smol_tokenizer, num_samples=4, length=300, seed=0, progress=False)
    with pytest.raises(ValueError, match="overlap"):
        check_disjoint(ds, ds.select([2]))
    other = line_retrieval(smol_tokenizer, num_samples=4, length=300, seed=99, progress=False)
    with pytest.raises(ValueError, match="shared answer"):
        check_disjoint(
            [{"task": "line_retrieval", "key": "x-y", "answer": ds[0]["answer"]}],
            other.to_list() + ds.to_list(),
        )
    # needle answers repeat by design and are not compared
    check_disjoint(
        [{"task": "needle_haystack", "key": "k", "answer": "red"}],
        [{"task": "needle_haystack", "key": "k", "answer": "red"}],
    )


def test_exclude_makes_sets_disjoint(smol_tokenizer):
    train = line_retrieval(smol_tokenizer, num_samples=10, length=300, seed=5, progress=False)
    same_seed = line_retrieval(
        smol_tokenizer, num_samples=10, length=300, seed=5, progress=False, exclude=train
    )
    check_disjoint(train, same_seed)


def test_exclude_refuses_a_mixed_dataset_without_keys(smol_tokenizer):
    # a dataset mixed with LM windows keeps only token columns: excluding it would silently exclude nothing
    from seal_peft.training import mix_lm_samples

    train = line_retrieval(smol_tokenizer, num_samples=2, length=300, seed=5, progress=False)
    lm = [{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [1, 2, 3]}]
    mixed = mix_lm_samples(train, lm, every=1)
    with pytest.raises(ValueError, match="before the mixing"):
        line_retrieval(smol_tokenizer, num_samples=2, length=300, seed=5, progress=False, exclude=mixed)


def test_word_lists():
    adjectives, nouns = load_words()
    assert len(set(adjectives)) == len(adjectives) >= 100
    assert len(set(nouns)) == len(nouns) >= 100
    assert all(w.isalpha() and w.islower() for w in adjectives + nouns)


def test_bad_inputs(smol_tokenizer, smol_copy, char_tokenizer):
    with pytest.raises(ValueError, match="prompt_format"):
        line_retrieval(smol_tokenizer, num_samples=1, length=300, prompt_format="alpaca", progress=False)
    with pytest.raises(ValueError, match="too short"):
        line_retrieval(smol_tokenizer, num_samples=1, length=50, progress=False)
    with pytest.raises(ValueError, match="too short"):
        kv_retrieval(smol_tokenizer, num_samples=1, length=150, progress=False)
    smol_copy.model_max_length = 2048
    with pytest.raises(ValueError, match="model_max_length"):
        line_retrieval(smol_copy, num_samples=1, length=4096, progress=False)
    with pytest.raises(ValueError, match="plain"):
        line_retrieval(char_tokenizer, num_samples=1, length=600, prompt_format="chat", progress=False)
    with pytest.raises(ValueError, match="plain"):
        kv_retrieval(char_tokenizer, num_samples=1, length=600, prompt_format="chat_prefill", progress=False)
    with pytest.raises(ValueError, match="num_samples"):
        line_retrieval(smol_tokenizer, num_samples=0, length=300, progress=False)
    with pytest.raises(ValueError, match="depths"):
        line_retrieval(smol_tokenizer, num_samples=1, length=300, depths=[1.5], progress=False)
    with pytest.raises(ValueError, match="empty"):
        line_retrieval(smol_tokenizer, num_samples=1, length=[], progress=False)
    with pytest.raises(TypeError, match="length"):
        line_retrieval(smol_tokenizer, num_samples=1, length="1024", progress=False)


def test_plain_format_with_bos_tokenizer(char_tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = line_retrieval(
            char_tokenizer, num_samples=2, length=1500, prompt_format="plain", seed=0, progress=False
        )
    bos, eos = char_tokenizer.bos_token_id, char_tokenizer.eos_token_id
    for row in ds:
        assert row["input_ids"][0] == bos and row["input_ids"].count(bos) == 1
        assert row["input_ids"][-1] == eos and row["labels"][-1] == eos
        check_row(char_tokenizer, row, 1500)
        assert row["target"] == f" The <REGISTER_CONTENT> in line {row['key']} is <{row['answer']}>.</s>"


def test_system_prompt(smol_tokenizer):
    row = line_retrieval(
        smol_tokenizer, num_samples=1, length=400, system_prompt="Be exact.", progress=False
    )[0]
    text = smol_tokenizer.decode(row["input_ids"])
    assert text.startswith("<|im_start|>system\nBe exact.<|im_end|>") and "SmolLM" not in text
    row = line_retrieval(
        smol_tokenizer,
        num_samples=1,
        length=400,
        system_prompt="Be exact.",
        prompt_format="plain",
        progress=False,
    )[0]
    assert smol_tokenizer.decode(row["input_ids"]).startswith("Be exact.\n\nBelow is a record")


def test_kv_overlap_and_exclude_list(smol_tokenizer):
    a = kv_retrieval(smol_tokenizer, num_samples=2, length=700, seed=0, progress=False)
    b = line_retrieval(smol_tokenizer, num_samples=2, length=300, seed=0, progress=False)
    with pytest.raises(ValueError, match="shared key"):
        check_disjoint(a, a.select([1]))
    c = kv_retrieval(smol_tokenizer, num_samples=2, length=700, seed=0, progress=False, exclude=[a, b])
    check_disjoint(a, c)
    assert c["key"] != a["key"]
