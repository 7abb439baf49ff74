"""evaluate_retrieval end to end, EvalResult aggregates and outputs."""

from __future__ import annotations

import csv
import json

import pytest

from seal_peft.evaluation import EvalResult, evaluate_retrieval


def test_evaluate_retrieval_scripted(scripted, make_record, char_tokenizer, tmp_path):
    recs = [
        make_record("A?", "The value is 11.", "11", length=100, depth=0.1),
        make_record("B?", "The value is 22.", "22", length=100, depth=0.9),
        make_record("C?", "The value is 33.", "<33>", length=200, depth=0.1),
        make_record("D?", "a red ball", "red ball", task="needle", length=200, depth=0.5),
    ]
    model = scripted({"A?": "The value is 11. Sure", "B?": "line 4 is 22.", "C?": "33", "D?": "A red ball!"})
    result = evaluate_retrieval(model, char_tokenizer, recs, progress=False, name="scripted")
    assert [r["output"] for r in result.rows] == ["The value is 11.", "line 4", "33", "A red ball!"]
    assert [r["correct"] for r in result.rows] == [True, False, True, True]
    assert result.accuracy == pytest.approx(0.75)
    assert result.num_correct == 3
    assert result.accuracy_by_length() == {100: 0.5, 200: 1.0}
    assert result.accuracy_by_length(bins=[150, 1000]) == {150: 0.75}
    assert result.accuracy_by_depth(bins=2) == {"0.00-0.50": 1.0, "0.50-1.00": 0.5}
    assert result.accuracy_by_task() == {"line_retrieval": pytest.approx(2 / 3), "needle": 1.0}
    row = result.rows[1]
    assert set(row) >= {"length", "depth", "key", "answer", "output", "correct"}

    table = result.table()
    assert "scripted: accuracy 0.750 (3/4)" in table and "length" in table and "depth" in table

    back = EvalResult.from_json(result.to_json(tmp_path / "out" / "r.json"))
    assert back.rows == result.rows and back.name == "scripted"
    data = json.loads((tmp_path / "out" / "r.json").read_text())
    assert data["summary"]["accuracy"] == pytest.approx(0.75)
    assert data["summary"]["accuracy_by_length"] == {"100": 0.5, "200": 1.0}

    with result.to_csv(tmp_path / "r.csv").open() as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 4 and lines[1]["output"] == "line 4" and lines[0]["correct"] == "True"


def test_evaluate_retrieval_with_a_real_tiny_model(tiny_llama, char_tokenizer, make_record):
    from datasets import Dataset

    recs = [
        make_record(f"line k{i}: value is <{i}>. What is k{i}?", f"{i}.", str(i), length=64 * (i % 2 + 1))
        for i in range(4)
    ]
    result = evaluate_retrieval(
        tiny_llama, char_tokenizer, Dataset.from_list(recs), max_new_tokens=6, progress=False
    )
    assert result.n == 4 and 0.0 <= result.accuracy <= 1.0
    assert set(result.accuracy_by_length()) == {64, 128}


def test_empty_and_malformed_eval_sets(tiny_llama, char_tokenizer, make_record):
    with pytest.raises(ValueError, match="empty"):
        evaluate_retrieval(tiny_llama, char_tokenizer, [], progress=False)
    with pytest.raises(ValueError, match="None"):
        evaluate_retrieval(tiny_llama, char_tokenizer, None, progress=False)
    rec = make_record("Q?", "1", "1")
    del rec["answer"]
    with pytest.raises(ValueError, match=r"record 0 is missing field\(s\) \['answer'\]"):
        evaluate_retrieval(tiny_llama, char_tokenizer, [rec], progress=False)
    with pytest.raises(ValueError, match="input_ids"):
        evaluate_retrieval(tiny_llama, char_tokenizer, [{"answer": "1", "prompt_length": 3}], progress=False)
    with pytest.raises(TypeError, match="single mapping"):
        evaluate_retrieval(tiny_llama, char_tokenizer, make_record("Q?", "1", "1"), progress=False)


def test_eval_result_without_depth_or_length():
    result = EvalResult(rows=[{"score": 1.0}, {"score": 0.0, "length": 10}])
    assert result.accuracy == 0.5
    assert result.accuracy_by_length() == {10: 0.0}
    assert result.accuracy_by_depth() == {}
    assert "result: accuracy 0.500 (1/2)" in result.table()


def test_measured_lengths_are_grouped():
    from seal_peft.evaluation.results import auto_depth_values, auto_length_bins

    assert auto_length_bins([4090, 4096, 4101, 8150, 8192, 8230]) == [4096, 8192]
    assert auto_length_bins([1024, 2048, 2048]) == [1024, 2048]
    assert auto_depth_values([0.0, 0.01, 0.49, 0.5, 0.52, 1.0]) == [0.005, 0.5, 1.0]
    assert auto_depth_values([i / 50 for i in range(51)]) is None  # random-like depths: no grid
    rows = [{"length": v, "score": s} for v, s in [(4090, 1.0), (4101, 0.0), (8150, 1.0), (8230, 1.0)]]
    assert EvalResult(rows=rows).accuracy_by_length() == {4096: 0.5, 8190: 1.0}
    assert EvalResult(rows=rows, length_bins=[4096, 8192]).accuracy_by_length() == {4096: 0.5, 8192: 1.0}


def test_records_from_the_data_generator(scripted, char_tokenizer):
    """seal_peft.data records evaluate end to end; a model that says the target is always right."""
    from seal_peft.data import line_retrieval

    ds = line_retrieval(
        char_tokenizer, num_samples=4, length=[600, 1200], prompt_format="plain", seed=0, progress=False
    )
    mapping = {
        char_tokenizer.decode(r["input_ids"][: r["prompt_length"]], skip_special_tokens=True): r["target"]
        for r in ds
    }
    result = evaluate_retrieval(
        scripted(mapping), char_tokenizer, ds, max_new_tokens=80, progress=False, length_bins=[600, 1200]
    )
    assert result.accuracy == 1.0, result.outputs()
    assert all(f"is <{r['answer']}" in r["output"] for r in result.rows)
    assert result.counts_by_length() == {600: 2, 1200: 2}
