"""Scorers on hand-written cases with known answers."""

from __future__ import annotations

import pytest

from seal_peft.evaluation import (
    contains_answer,
    exact_match,
    first_integer,
    first_integer_match,
    get_scorer,
    last_integer,
    last_integer_match,
    normalize_answer,
    qa_f1,
    score_line_retrieval,
    score_records,
)


def test_first_integer_rule():
    assert first_integer("The <REGISTER_CONTENT> in line righteous-ethernet is 40779.") == 40779
    assert first_integer("no digits here") is None
    assert first_integer_match("The value is 40779.", "40779")
    assert first_integer_match("40779", "<40779>")  # answers written like the haystack
    assert first_integer_match("is <40779>", "40779")  # outputs that copy the angle brackets
    assert first_integer_match("40779", 40779)
    assert not first_integer_match("line 3 is 40779", "40779")  # only the FIRST integer counts
    assert not first_integer_match("407790", "40779")
    assert not first_integer_match("4077 9", "40779")
    assert not first_integer_match("I do not know", "40779")
    assert first_integer_match("040779", "40779")  # same integer value
    with pytest.raises(ValueError, match="no integer"):
        first_integer_match("1", "red ball")


def test_score_line_retrieval():
    records = [{"answer": "40779"}, {"answer": "<123>"}, {"answer": "5"}]
    outputs = ["The value is 40779.", "It is 124.", "5, or maybe 6"]
    assert score_line_retrieval(records, outputs) == [True, False, True]
    with pytest.raises(ValueError, match="one output per record"):
        score_line_retrieval(records, outputs[:2])
    with pytest.raises(ValueError, match="'answer'"):
        score_line_retrieval([{}], ["1"])


def test_normalize_answer():
    assert normalize_answer("The  Cat, sat on a mat!") == "cat sat on mat"
    assert normalize_answer("An apple -- THE END.") == "apple end"
    assert normalize_answer("theory anatomy") == "theory anatomy"  # articles only as whole words


def test_exact_match_and_contains():
    assert exact_match("The Eiffel Tower.", "eiffel tower")
    assert exact_match("paris", ["London", "Paris"])
    assert not exact_match("It is Paris", "Paris")
    assert contains_answer("It is Paris, of course.", ["London", "Paris"])
    assert contains_answer("The value is <40779>.", "40779")
    assert not contains_answer("The value is 407790.", "40779")  # word boundaries
    assert contains_answer("key a1b2-c3d4 is here", "a1b2-c3d4")
    assert contains_answer("The red ball is in the kitchen.", "a red ball")
    assert not contains_answer("anything", "!!!")  # answer normalises to nothing


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("The cat sat.", ["a cat sat on the mat"], 2 * 1.0 * 0.5 / 1.5),  # P=1 (2/2), R=2/4
        ("the Cat sat on a mat!", ["cat sat on mat"], 1.0),  # articles and punctuation ignored
        ("Paris", ["London", "Paris, France"], 2 * 1.0 * 0.5 / 1.5),  # max over answers
        ("dog", ["cat"], 0.0),
        ("", ["cat"], 0.0),
        ("the", ["the"], 0.0),  # both normalise to nothing: LongBench scores 0
        ("cat cat dog", ["cat dog dog"], 2 * (2 / 3) * (2 / 3) / (4 / 3)),  # bag-of-tokens overlap
        ("1,000 people", ["1000 people"], 1.0),  # punctuation is deleted, not a separator
    ],
)
def test_qa_f1_known_values(prediction, answers, expected):
    assert qa_f1(prediction, answers) == pytest.approx(expected)


def test_last_integer_rule_is_longevals():
    sentence = "The <REGISTER_CONTENT> in line righteous-ethernet is 40779."
    assert last_integer(sentence) == 40779 and last_integer("none") is None
    assert last_integer_match(sentence, "40779")
    assert last_integer_match("line 3 is 40779", "40779")  # the LAST integer counts (first: 3)
    assert not last_integer_match("40779, or maybe 12", "40779")
    assert not last_integer_match("The record is over.", "40779")
    assert not last_integer_match("407790", "40779")
    with pytest.raises(ValueError, match="no integer"):
        last_integer_match("1", "red ball")


def test_score_records_auto_follows_the_prompt_format():
    record = {"task": "line_retrieval", "answer": "40779"}
    outputs = ["line 2 is 40779"]
    assert score_records([{**record, "prompt_format": "longeval"}], outputs) == [1.0]
    assert score_records([{**record, "prompt_format": "chat_prefill"}], outputs) == [0.0]
    assert score_records([{**record, "prompt_format": "longeval"}], ["40779 then 5"]) == [0.0]


def test_score_records_auto_picks_per_task():
    records = [
        {"task": "line_retrieval", "answer": "40779"},
        {"task": "needle", "answer": "red ball"},
        {"task": "kv_retrieval", "answer": "a1b2"},
        {"task": "user", "answers": ["yes", "indeed"], "answer": "yes"},
    ]
    outputs = ["line 2 is 40779", "a Red Ball.", "value: a1b2.", "Indeed"]
    assert score_records(records, outputs) == [0.0, 1.0, 1.0, 1.0]
    assert score_records(records[:1], ["40779 yes"], scorer="exact_match") == [0.0]
    assert score_records(records[:1], ["40779"], scorer=lambda r, o: o == r["answer"]) == [1.0]
    with pytest.raises(ValueError, match="unknown scorer"):
        get_scorer("bleu")
    with pytest.raises(ValueError, match="'answer'"):
        score_records([{"task": "needle"}], ["x"])
