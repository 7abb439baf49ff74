"""Scorers: how a generated answer is judged correct.

Every scorer is a pure function of strings, so it can be tested on hand-written cases and reused
on outputs produced elsewhere (another inference engine, a saved JSON file).

- :func:`last_integer_match`: LongEval's line-retrieval rule (``prompt_format="longeval"``): the
  answer is right iff the *last* integer of the output equals the expected number.
- :func:`first_integer_match` / :func:`score_line_retrieval`: the rule for pre-filled answers
  (``chat_prefill`` and the project's other formats, whose reply starts with the number): right iff
  the *first* integer equals the expected number, so "line 3 is 4077" never counts as 4077.
- :func:`contains_answer`: the normalised expected answer occurs in the normalised output, on word
  boundaries (needle and key-value retrieval, where models wrap the value in a sentence).
- :func:`exact_match`: normalised output equals a normalised expected answer.
- :func:`qa_f1`: LongBench's token-level QA F1 (lowercase, drop punctuation, drop the articles
  a/an/the, collapse whitespace; F1 over the bag of tokens; max over the gold answers).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "normalize_answer",
    "first_integer",
    "first_integer_match",
    "last_integer",
    "last_integer_match",
    "score_line_retrieval",
    "exact_match",
    "contains_answer",
    "qa_f1",
    "SCORERS",
    "get_scorer",
    "default_scorer_name",
]

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_INTEGER = re.compile(r"\d+")


def _as_answer_list(answers: str | int | Sequence[str | int]) -> list[str]:
    """Accept one answer or a list of acceptable answers; always return a non-empty list of str."""
    if isinstance(answers, (str, int)):
        return [str(answers)]
    out = [str(a) for a in answers]
    if not out:
        raise ValueError("the list of gold answers is empty; give at least one acceptable answer")
    return out


def normalize_answer(text: str) -> str:
    """LongBench / SQuAD answer normalisation.

    Lowercase, remove every ASCII punctuation character (deleted, not replaced by a space), remove
    the English articles ``a``, ``an``, ``the`` as whole words, and collapse runs of whitespace.
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _normalize_spaced(text: str) -> str:
    """Like :func:`normalize_answer` but punctuation becomes a space.

    Used for substring matching, so ``"is<40779>."`` still exposes ``40779`` as a word and a
    hyphenated value ``a1-b2`` normalises the same way on both sides.
    """
    text = text.lower()
    text = "".join(" " if ch in _PUNCTUATION else ch for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def first_integer(text: str) -> int | None:
    """The first run of ASCII digits in ``text`` as an int (``None`` if there is none)."""
    match = _INTEGER.search(text)
    return int(match.group()) if match else None


def last_integer(text: str) -> int | None:
    """The last run of ASCII digits in ``text`` as an int (``None`` if there is none)."""
    found = _INTEGER.findall(text)
    return int(found[-1]) if found else None


def _expected_integer(answer: str | int) -> int:
    expected = first_integer(str(answer))
    if expected is None:
        raise ValueError(
            f"line-retrieval answer {answer!r} contains no integer; the integer rules need a numeric "
            "answer (use scorer='contains' or 'exact_match' for text answers)"
        )
    return expected


def last_integer_match(output: str, answer: str | int) -> bool:
    """LongEval's rule: the last integer of ``output`` equals the integer in ``answer``.

    ``"The <REGISTER_CONTENT> in line righteous-ethernet is 40779."`` is right for ``40779``; an output
    that names the right number and then another one is wrong.
    """
    got = last_integer(output)
    return got is not None and got == _expected_integer(answer)


def first_integer_match(output: str, answer: str | int) -> bool:
    """Line-retrieval rule: the first integer of ``output`` equals the integer in ``answer``.

    ``answer`` may be a bare number (``"40779"``), a number wrapped the way the haystack writes
    it (``"<40779>"``) or a full target sentence whose first integer is the value.
    """
    got = first_integer(output)
    return got is not None and got == _expected_integer(answer)


def score_line_retrieval(records: Sequence[Mapping[str, Any]], outputs: Sequence[str]) -> list[bool]:
    """Score line-retrieval outputs with the first-integer rule (one bool per record).

    Each record needs an ``answer`` field (``"40779"`` or ``"<40779>"``).
    """
    if len(records) != len(outputs):
        raise ValueError(f"got {len(records)} records but {len(outputs)} outputs; pass one output per record")
    scores = []
    for i, (record, output) in enumerate(zip(records, outputs)):
        if "answer" not in record:
            raise ValueError(f"record {i} has no 'answer' field; line retrieval needs the expected number")
        scores.append(first_integer_match(output, record["answer"]))
    return scores


def exact_match(prediction: str, answers: str | int | Sequence[str | int]) -> bool:
    """True iff the normalised prediction equals one normalised gold answer."""
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in _as_answer_list(answers))


def contains_answer(prediction: str, answers: str | int | Sequence[str | int]) -> bool:
    """True iff a normalised gold answer occurs in the normalised prediction on word boundaries.

    ``"The value is 123."`` contains ``123`` but ``"1234"`` does not. An answer that normalises to
    the empty string never matches.
    """
    pred = f" {_normalize_spaced(prediction)} "
    for answer in _as_answer_list(answers):
        gold = _normalize_spaced(answer)
        if gold and f" {gold} " in pred:
            return True
    return False


def _f1_tokens(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    common = Counter(pred_tokens) & Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, answers: str | Sequence[str]) -> float:
    """LongBench QA F1 in [0, 1]: token-level F1 after :func:`normalize_answer`, max over answers.

    As in LongBench, a prediction with no token in common with a gold answer scores 0 (this
    includes an empty prediction and an answer that normalises to nothing).
    """
    pred_tokens = normalize_answer(prediction).split()
    return max(_f1_tokens(pred_tokens, normalize_answer(a).split()) for a in _as_answer_list(answers))


# name -> scorer(record, output) -> float in [0, 1]
Scorer = Callable[[Mapping[str, Any], str], float]


def _record_answers(record: Mapping[str, Any]) -> Any:
    if "answers" in record and record["answers"] is not None:
        return record["answers"]
    return record["answer"]


SCORERS: dict[str, Scorer] = {
    "first_integer": lambda record, output: float(first_integer_match(output, record["answer"])),
    "last_integer": lambda record, output: float(last_integer_match(output, record["answer"])),
    "contains": lambda record, output: float(contains_answer(output, _record_answers(record))),
    "exact_match": lambda record, output: float(exact_match(output, _record_answers(record))),
    "qa_f1": lambda record, output: qa_f1(output, _record_answers(record)),
}


def default_scorer_name(task: str | None, prompt_format: str | None = None) -> str:
    """The scorer used for a record when the caller does not choose one.

    ``line_retrieval`` uses LongEval's last-integer rule under ``prompt_format="longeval"`` and the
    first-integer rule otherwise (pre-filled replies start with the number); every other task
    (``needle``, ``kv_retrieval``, ``user``, unknown) uses :func:`contains_answer`.
    """
    if task != "line_retrieval":
        return "contains"
    return "last_integer" if prompt_format == "longeval" else "first_integer"


def get_scorer(scorer: str | Callable[[Mapping[str, Any], str], float | bool]) -> Scorer:
    """Resolve a scorer name (see :data:`SCORERS`) or wrap a callable ``(record, output) -> score``."""
    if callable(scorer):
        return lambda record, output: float(scorer(record, output))
    if scorer not in SCORERS:
        raise ValueError(
            f"unknown scorer {scorer!r}; use one of {sorted(SCORERS)}, 'auto' (chosen per task) or a "
            "callable (record, output) -> bool | float"
        )
    return SCORERS[scorer]
