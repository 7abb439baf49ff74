"""Line retrieval (LongEval format) and key-value retrieval (JSON of UUIDs) generators."""

from __future__ import annotations

import json
import math
import random
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

from ._common import (
    PromptEncoder,
    check_depths,
    check_lengths,
    check_num_samples,
    excluded,
    fit_items,
    grid_value,
    make_record,
    progress_bar,
    sample_rng,
    to_dataset,
    tolerance,
    too_short_error,
)

__all__ = ["line_retrieval", "kv_retrieval", "load_words", "MAX_VALUE"]

MAX_VALUE = 50000  # line values are uniform in [1, MAX_VALUE] (as in the paper)

LINE_INSTRUCTION = (
    "Below is a record of lines I want you to remember. Each line begins with 'line <line index>' and "
    "contains a '<REGISTER_CONTENT>' at the end of the line as a numerical value. For each line index, "
    "memorize its corresponding <REGISTER_CONTENT>. At the end of the record, I will ask you to retrieve "
    "the <REGISTER_CONTENT> of one line index. Now the record starts:"
)
KV_INSTRUCTION = (
    "Below is a JSON object whose keys and values are random UUIDs. Read it carefully: after the object "
    "I will ask you for the value that belongs to one of the keys."
)


@lru_cache(maxsize=1)
def load_words() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(adjectives, nouns)`` used to build line keys such as ``righteous-ethernet``."""
    text = resources.files(__package__).joinpath("words.json").read_text(encoding="utf-8")
    words = json.loads(text)
    return tuple(words["adjectives"]), tuple(words["nouns"])


@dataclass
class _Task:
    """What differs between the retrieval tasks: how records look and how the question is asked."""

    name: str
    new_record: Callable[[random.Random], tuple[str, str]]  # -> (key, value)
    record_text: Callable[[tuple[str, str]], str]
    render: Callable[[list[tuple[str, str]]], str]  # all records (the asked one included) -> context
    question: Callable[[str], str]
    lead: Callable[[str], str]
    rest: Callable[[str], str]


# LongEval's own wording (LongChat's ``longeval`` line-retrieval test cases) and the paper's answer sentence
LONGEVAL_INSTRUCTION = (
    "Below is a record of lines I want you to remember. Each line begins with 'line <line index>' and "
    "contains a '<REGISTER_CONTENT>' at the end of the line as a numerical value. For each line index, "
    "memorize its corresponding <REGISTER_CONTENT>. At the end of the record, I will ask you to retrieve "
    "the corresponding <REGISTER_CONTENT> of a certain line index. Now the record start:"
)


def _line_task(prompt_format: str) -> _Task:
    """Line retrieval. ``prompt_format="longeval"`` uses LongEval's header and the paper's answer sentence
    ("The <REGISTER_CONTENT> in line x-y is 40779."); the other formats keep the project's earlier wording,
    whose reply copies the record's ``<value>`` form."""
    adjectives, nouns = load_words()
    longeval = prompt_format == "longeval"
    instruction = LONGEVAL_INSTRUCTION if longeval else LINE_INSTRUCTION

    def new_record(rng: random.Random) -> tuple[str, str]:
        return f"{adjectives[rng.randrange(len(adjectives))]}-{nouns[rng.randrange(len(nouns))]}", str(
            rng.randint(1, MAX_VALUE)
        )

    def record_text(rec: tuple[str, str]) -> str:
        return f"line {rec[0]}: REGISTER_CONTENT is <{rec[1]}>\n"

    return _Task(
        name="line_retrieval",
        new_record=new_record,
        record_text=record_text,
        render=lambda recs: f"{instruction}\n\n" + "".join(record_text(r) for r in recs),
        question=lambda key: (
            f"\nNow the record is over. Tell me what is the <REGISTER_CONTENT> in line {key}? I need the number."
        ),
        # With chat_prefill (lead in the prompt, ending in "is <") the model continues exactly as in the
        # record: "40779>." — the setting the project's first baseline numbers were measured in.
        lead=(lambda key: f"The <REGISTER_CONTENT> in line {key} is ")
        if longeval
        else (lambda key: f"The <REGISTER_CONTENT> in line {key} is <"),
        rest=(lambda value: f"{value}.") if longeval else (lambda value: f"{value}>."),
    )


def _random_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _kv_task() -> _Task:
    def record_text(rec: tuple[str, str]) -> str:
        return f'  "{rec[0]}": "{rec[1]}",\n'

    def render(recs: list[tuple[str, str]]) -> str:
        body = ",\n".join(f'  "{k}": "{v}"' for k, v in recs)
        return f"{KV_INSTRUCTION}\n\n{{\n{body}\n}}\n"

    return _Task(
        name="kv_retrieval",
        new_record=lambda rng: (_random_uuid(rng), _random_uuid(rng)),
        record_text=record_text,
        render=render,
        question=lambda key: f'\nWhat is the value of the key "{key}" in the JSON object above?',
        lead=lambda key: f'The value of the key "{key}" is',
        rest=lambda value: f' "{value}".',
    )


def _needle_index(depth: float | None, u: float, num_records: int) -> int:
    if depth is None:
        return min(num_records - 1, math.floor(u * num_records))
    return round(depth * (num_records - 1))


def _sample(
    task: _Task,
    encoder: PromptEncoder,
    item_tokens: Callable[[tuple[str, str]], int],
    i: int,
    seed: int,
    target: int,
    depth: float | None,
    bad_keys: set[str],
    bad_answers: set[str],
) -> dict[str, Any]:
    """One sample: the asked record among fillers, fitted to ``target`` tokens."""
    rng = sample_rng(task.name, seed, i)
    u = rng.random()
    for _ in range(100_000):
        asked = task.new_record(rng)
        if asked[0] not in bad_keys and asked[1] not in bad_answers:
            break
    else:  # pragma: no cover - needs an exclude set covering the whole key space
        raise ValueError(f"exclude= leaves no unused key/answer for {task.name}.")
    used = {asked[0]}

    def new_item() -> tuple[str, str]:
        while True:
            rec = task.new_record(rng)
            if rec[0] not in used:
                used.add(rec[0])
                return rec

    def redraw(_old: tuple[str, str]) -> tuple[str, str]:
        return new_item()

    def parts(fillers: list[tuple[str, str]]) -> tuple[str, str, str, int]:
        idx = _needle_index(depth, u, len(fillers) + 1)
        recs = fillers[:idx] + [asked] + fillers[idx:]
        user = task.render(recs) + task.question(asked[0])
        return user, task.lead(asked[0]), task.rest(asked[1]), idx

    def count(fillers: list[tuple[str, str]]) -> int:
        return encoder.count(*parts(fillers)[:3])

    tol = tolerance(target)
    minimum = count([])
    if minimum > target + tol:
        raise too_short_error(task.name, target, minimum)
    probe = [task.new_record(random.Random(j)) for j in range(16)]
    mean = sum(item_tokens(r) for r in probe) / len(probe)
    fillers = [new_item() for _ in range(max(0, round((target - minimum) / mean)))]
    fillers, _ = fit_items(count, fillers, redraw, item_tokens, target, tol, rng, new_item)
    user, lead, rest, idx = parts(fillers)
    enc = encoder.encode(user, lead, rest)
    if abs(len(enc.input_ids) - target) > tol:
        warnings.warn(
            f"{task.name} sample {i}: {len(enc.input_ids)} tokens instead of {target} (tolerance {tol}).",
            stacklevel=4,
        )
    n_records = len(fillers) + 1
    depth_out = idx / (n_records - 1) if n_records > 1 else 0.0
    return make_record(enc, task=task.name, depth=depth_out, key=asked[0], answer=asked[1])


def _generate(
    task: _Task,
    tokenizer: Any,
    num_samples: int,
    length: int | list[int],
    depths: float | list[float] | None,
    prompt_format: str,
    seed: int,
    system_prompt: str | None,
    progress: bool,
    exclude: Any,
):
    num_samples = check_num_samples(num_samples)
    lengths = check_lengths(tokenizer, length)
    depth_list = check_depths(depths)
    encoder = PromptEncoder(tokenizer, prompt_format, system_prompt)
    bad_keys, bad_answers = excluded(exclude)
    token_cache: dict[str, int] = {}

    def item_tokens(rec: tuple[str, str]) -> int:
        text = task.record_text(rec)
        if text not in token_cache:
            if len(token_cache) > 200_000:
                token_cache.clear()
            token_cache[text] = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        return token_cache[text]

    records = []
    for i in progress_bar(range(num_samples), num_samples, f"{task.name} data", progress):
        depth = grid_value(depth_list, i, stride=len(lengths)) if depth_list else None
        records.append(
            _sample(task, encoder, item_tokens, i, seed, grid_value(lengths, i), depth, bad_keys, bad_answers)
        )
    return to_dataset(records, tokenizer)


def line_retrieval(
    tokenizer: Any,
    num_samples: int = 50,
    length: int | list[int] = 1024,
    depths: float | list[float] | None = None,
    prompt_format: str = "longeval",
    seed: int = 0,
    system_prompt: str | None = None,
    *,
    progress: bool = True,
    exclude: Any = None,
):
    """LongEval-style line retrieval: remember ``line <adjective-noun>: REGISTER_CONTENT is <n>`` lines
    and return the number of one of them.

    Args:
        tokenizer: the tokenizer of the model to train / evaluate (lengths are counted with it).
        num_samples: number of samples.
        length: total tokens per sample (prompt + answer), or a list to cycle through. Hit within +-3 %.
        depths: relative position(s) of the asked line (0 = first line, 1 = last line), cycled with
            ``sample i -> depths[(i // len(lengths)) % len(depths)]``; ``None`` = uniformly random.
        prompt_format: ``"longeval"`` (default: LongEval's wording and protocol — a plain question, an
            empty assistant turn, the reply "The <REGISTER_CONTENT> in line x-y is 40779."),
            ``"chat"``, ``"chat_prefill"`` (reply pre-filled up to ``is <``) or ``"plain"``
            (see ``docs/data.md``).
        seed: random seed; the same seed gives the same dataset. Use different seeds for train and eval.
        system_prompt: system message (chat formats) or text put first (plain); ``None`` keeps the chat
            template's default.
        progress: show a tqdm progress bar.
        exclude: dataset(s) whose asked keys and answers must not be reused (e.g. the training set when
            generating the evaluation set).

    Returns a ``datasets.Dataset`` with ``input_ids, attention_mask, labels, prompt_length, task,
    length, depth, key, answer, target``; ``key`` is the asked line (``"righteous-ethernet"``),
    ``answer`` its number (``"40779"``), ``depth = index of the asked line / (number of lines - 1)``.
    """
    return _generate(
        _line_task(prompt_format),
        tokenizer,
        num_samples,
        length,
        depths,
        prompt_format,
        seed,
        system_prompt,
        progress,
        exclude,
    )


def kv_retrieval(
    tokenizer: Any,
    num_samples: int = 50,
    length: int | list[int] = 1024,
    depths: float | list[float] | None = None,
    prompt_format: str = "chat",
    seed: int = 0,
    system_prompt: str | None = None,
    *,
    progress: bool = True,
    exclude: Any = None,
):
    """Key-value retrieval: a JSON object of random UUID keys -> UUID values; return one key's value.

    Same arguments and columns as :func:`line_retrieval`; ``key`` is the asked UUID, ``answer`` its
    value UUID, ``depth`` the relative position of the asked entry. One entry costs ~70 tokens with
    byte-level BPE tokenizers, so short lengths (< ~400 tokens) hold only a few entries.
    """
    return _generate(
        _kv_task(),
        tokenizer,
        num_samples,
        length,
        depths,
        prompt_format,
        seed,
        system_prompt,
        progress,
        exclude,
    )
