"""LongBench jsonl reader (validation messages), prompt truncation and F1 evaluation."""

from __future__ import annotations

import json

import pytest

from seal_peft.evaluation import (
    DEFAULT_PROMPT_TEMPLATE,
    build_longbench_prompt,
    evaluate_longbench,
    read_longbench_jsonl,
)

RECORDS = [
    {
        "context": "Paris is the capital of France.",
        "input": "Capital of France?",
        "answers": ["Paris"],
        "length": 6,
        "_id": "a",
        "dataset": "toyqa",
    },
    {
        "context": "The cat sat on the mat.",
        "input": "Where did the cat sit?",
        "answers": ["on the mat"],
        "_id": "b",
        "dataset": "toyqa",
    },
    {
        "context": "Bob has 3 apples.",
        "input": "How many apples?",
        "answers": ["3", "three"],
        "_id": "c",
        "dataset": "other",
    },
]


def write_jsonl(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_reader_reads_valid_files(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [RECORDS[0], "", RECORDS[1]])
    records = read_longbench_jsonl(path)
    assert [r["_id"] for r in records] == ["a", "b"]
    assert records[1]["_line"] == 3  # the blank line is skipped but counted


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"context": "x", "input": "q", "answers": ["a"]', r"bad\.jsonl:2: not valid JSON"),
        (json.dumps({"context": "x", "input": "q"}), r"bad\.jsonl:2: missing field\(s\) \['answers'\]"),
        (json.dumps({"answers": ["a"]}), r"missing field\(s\) \['context', 'input'\]"),
        (
            json.dumps({"context": "x", "input": "q", "answers": "a"}),
            r"bad\.jsonl:2: field 'answers' must be",
        ),
        (json.dumps({"context": "x", "input": "q", "answers": []}), "non-empty list"),
        (json.dumps({"context": 5, "input": "q", "answers": ["a"]}), "'context' must be a string"),
        (json.dumps(["a", "b"]), "expected a JSON object"),
    ],
)
def test_reader_rejects_malformed_lines(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], bad_line])
    with pytest.raises(ValueError, match=message):
        read_longbench_jsonl(path)


def test_reader_empty_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="holds no LongBench record"):
        read_longbench_jsonl(write_jsonl(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_longbench_jsonl(tmp_path / "nope.jsonl")


def test_prompt_truncates_the_middle_of_the_context(char_tokenizer):
    context = "BEGIN " + "x" * 300 + " END"
    record = {"context": context, "input": "What?", "answers": ["x"]}
    full, cut = build_longbench_prompt(char_tokenizer, record, "C: {context}\nQ: {input}\nA:")
    assert not cut and len(full) == len("C: " + context + "\nQ: What?\nA:") + 1  # +BOS
    ids, cut = build_longbench_prompt(char_tokenizer, record, "C: {context}\nQ: {input}\nA:", max_length=60)
    text = char_tokenizer.decode(ids, skip_special_tokens=True)
    assert cut and len(ids) == 60
    assert text.startswith("C: BEGIN") and text.endswith(" END\nQ: What?\nA:")
    with pytest.raises(ValueError, match="no room for the context"):
        build_longbench_prompt(char_tokenizer, record, "C: {context}\nQ: {input}\nA:", max_length=10)


def test_evaluate_longbench_scores_f1(tmp_path, scripted, char_tokenizer):
    path = write_jsonl(tmp_path / "toy.jsonl", RECORDS)
    template = "{context}\n{input}\n"

    def prompt(r):
        return f"{r['context']}\n{r['input']}\n"

    model = scripted(
        {prompt(RECORDS[0]): "Paris.", prompt(RECORDS[1]): "It sat on a mat", prompt(RECORDS[2]): "Four"}
    )
    result = evaluate_longbench(
        model, char_tokenizer, path, prompt_template=template, progress=False, name="toy"
    )
    assert [r["score"] for r in result.rows] == pytest.approx([1.0, 2 * 0.5 * 1.0 / 1.5, 0.0])
    assert result.mean_f1 == pytest.approx((1.0 + 2 / 3) / 3)
    assert result.f1_by_dataset() == {"other": 0.0, "toyqa": pytest.approx((1 + 2 / 3) / 2)}
    assert result.rows[0]["answers"] == ["Paris"] and result.rows[0]["output"] == "Paris."
    assert not any(r["truncated"] for r in result.rows)
    assert "toy: qa_f1" in result.table() and "toyqa" in result.table()
    result.to_json(tmp_path / "lb.json")
    assert json.loads((tmp_path / "lb.json").read_text())["summary"]["metric"] == "qa_f1"
    assert (
        evaluate_longbench(
            model, char_tokenizer, RECORDS, prompt_template=template, limit=1, progress=False
        ).mean_f1
        == 1.0
    )


def test_evaluate_longbench_real_tiny_model(tmp_path, tiny_llama, char_tokenizer):
    path = write_jsonl(tmp_path / "toy.jsonl", [dict(RECORDS[0], context="filler " * 200)])
    result = evaluate_longbench(tiny_llama, char_tokenizer, path, max_new_tokens=4, progress=False)
    # max_length defaults to max_position_embeddings (512) - max_new_tokens
    assert result.rows[0]["truncated"] and result.rows[0]["prompt_tokens"] <= 508
    assert result.meta["max_length"] == 508 and 0.0 <= result.mean_f1 <= 1.0


def test_evaluate_longbench_errors(tmp_path, scripted, char_tokenizer):
    model = scripted()
    with pytest.raises(ValueError, match=r"\{context\} and \{input\}"):
        evaluate_longbench(model, char_tokenizer, RECORDS, prompt_template="no placeholders", progress=False)
    with pytest.raises(ValueError, match="empty"):
        evaluate_longbench(model, char_tokenizer, RECORDS, limit=0, progress=False)
    with pytest.raises(ValueError, match=r"missing field\(s\) \['answers'\]"):
        evaluate_longbench(model, char_tokenizer, [{"context": "c", "input": "i"}], progress=False)
    assert "{context}" in DEFAULT_PROMPT_TEMPLATE
