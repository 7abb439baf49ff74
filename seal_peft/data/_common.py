"""Shared machinery of the data generators: prompt formats, exact label masking, length checks.

A sample is described by three strings:

- ``user``: the user message (instruction + context + question);
- ``lead``: the start of the reply that restates the question ("The <REGISTER_CONTENT> in line x is");
- ``rest``: the rest of the reply, holding the answer (" 40779.").

The reply is ``lead + rest``. :class:`PromptEncoder` turns them into ``input_ids`` / ``labels`` for one
of the prompt formats and guarantees that ``input_ids[:prompt_length]`` is exactly what a model is
given at generation time and that the label tokens decode to ``target``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

PROMPT_FORMATS = ("longeval", "chat", "chat_prefill", "plain")
PLAIN_ANSWER_CUE = "Answer:"
REAL_LENGTH_LIMIT = int(1e8)  # tokenizers without a limit report model_max_length ~1e30
LENGTH_TOLERANCE = 0.03  # generators hit the requested length within +-3 %

COLUMNS = (
    "input_ids",
    "attention_mask",
    "labels",
    "prompt_length",
    "task",
    "length",
    "depth",
    "key",
    "answer",
    "target",
    "prompt_format",
)
RETRIEVAL_TASKS = ("line_retrieval", "kv_retrieval")


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    target: str
    prompt_format: str


def validate_prompt_format(tokenizer: Any, prompt_format: str) -> None:
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}.")
    if prompt_format != "plain" and not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"prompt_format={prompt_format!r} needs a chat template, but the tokenizer {name!r} has none "
            "(a base model?). Use prompt_format='plain', or set tokenizer.chat_template."
        )


class PromptEncoder:
    """Tokenises (user, lead, rest) samples in one prompt format.

    - ``"longeval"``: LongEval's protocol. Encoded exactly like ``"chat"`` (a plain question, an empty
      assistant turn, the whole reply supervised); the line-retrieval generator also switches to
      LongEval's own wording and answer sentence, and evaluation to its last-integer scorer.
    - ``"chat"``: the chat template renders ``[system?, user, assistant=lead+rest]``; the prompt is the
      template with the generation prompt; labels cover the whole reply and the end-of-turn token.
    - ``"chat_prefill"``: same token sequence, but ``lead`` is part of the prompt (the assistant turn is
      pre-filled), so labels cover only ``rest`` and the end-of-turn token.
    - ``"plain"``: ``[system + "\\n\\n"] + user + "\\nAnswer:"`` then ``" " + lead + rest`` and the EOS
      token (BOS first if the tokenizer adds one).

    Token ids are produced by tokenising the prompt and appending the continuation's tokens (taken from
    the tokenisation of the whole text when that keeps the prompt tokens unchanged), which is what the
    model sees when it generates from ``input_ids[:prompt_length]``.
    """

    def __init__(self, tokenizer: Any, prompt_format: str = "chat", system_prompt: str | None = None):
        validate_prompt_format(tokenizer, prompt_format)
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        self.system_prompt = system_prompt
        self.special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        for idx, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
            if getattr(tok, "special", False):
                self.special_ids.add(int(idx))
        eos = getattr(tokenizer, "eos_token_id", None)
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        self.eos_id = eos
        self.bos_prefix: list[int] = []
        if prompt_format == "plain":
            with_special = self._ids("a", add_special_tokens=True)
            without = self._ids("a")
            if len(with_special) > len(without) and with_special[-len(without) :] == without:
                self.bos_prefix = with_special[: len(with_special) - len(without)]

    # -- tokenisation helpers ------------------------------------------------------------------------

    def _ids(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def _continuation(self, prev_text: str, prev_ids: list[int], more: str) -> list[int]:
        """Tokens of ``more`` appended to ``prev_text`` (in-context tokens if the prefix is stable)."""
        if not more:
            return []
        both = self._ids(prev_text + more)
        if both[: len(prev_ids)] == prev_ids:
            return both[len(prev_ids) :]
        return self._ids(more)

    # -- rendering -------------------------------------------------------------------------------------

    def _messages(self, user: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return msgs + [{"role": "user", "content": user}]

    def _render(self, messages, **kw) -> str:
        out = self.tokenizer.apply_chat_template(messages, tokenize=False, **kw)
        if not isinstance(out, str):  # some versions return a list for a single conversation
            out = out[0]
        return out

    def texts(self, user: str, lead: str, rest: str) -> tuple[str, str, str]:
        """``(prompt_text, answer_text, suffix_text)``: the full text is their concatenation."""
        reply = lead + rest
        if self.prompt_format == "plain":
            system = f"{self.system_prompt}\n\n" if self.system_prompt else ""
            return f"{system}{user}\n{PLAIN_ANSWER_CUE}", " " + reply, ""
        msgs = self._messages(user)
        prompt = self._render(msgs, add_generation_prompt=True)
        full = self._render(msgs + [{"role": "assistant", "content": reply}])
        if not full.startswith(prompt):
            raise ValueError(
                "The tokenizer's chat template does not render the assistant turn as a continuation of its "
                "generation prompt, so the answer cannot be separated exactly; use prompt_format='plain'."
            )
        turn = full[len(prompt) :]
        pos = turn.find(reply)
        if pos < 0:
            raise ValueError(
                "The tokenizer's chat template changes the assistant message (e.g. strips or rewrites it), so "
                "labels cannot be aligned with the answer; use prompt_format='plain'."
            )
        prompt += turn[:pos]  # e.g. an empty reasoning block some templates insert before the content
        suffix = turn[pos + len(reply) :]
        if self.prompt_format == "chat_prefill":
            return prompt + lead, rest, suffix
        return prompt, reply, suffix

    def count(self, user: str, lead: str, rest: str) -> int:
        """Number of tokens of the encoded sample (one tokenisation of the whole text)."""
        prompt, answer, suffix = self.texts(user, lead, rest)
        n = len(self.bos_prefix) + len(self._ids(prompt + answer + suffix))
        if self.prompt_format == "plain" and self.eos_id is not None:
            n += 1
        return n

    def encode(self, user: str, lead: str, rest: str) -> Encoded:
        prompt, answer, suffix = self.texts(user, lead, rest)
        prompt_ids = self._ids(prompt)
        answer_ids = self._continuation(prompt, prompt_ids, answer)
        if not answer_ids:
            raise ValueError("The answer is empty after tokenisation; every sample needs a non-empty answer.")
        if self.prompt_format == "plain":
            labelled = answer_ids + ([self.eos_id] if self.eos_id is not None else [])
            tail: list[int] = []
        else:
            suffix_ids = self._continuation(prompt + answer, prompt_ids + answer_ids, suffix)
            # label the reply up to and including the template's end-of-turn token; what the template
            # emits after it (a newline...) stays in the input but is not supervised
            end = next((i for i, t in enumerate(suffix_ids) if t in self.special_ids), None)
            cut = 0 if end is None else end + 1
            labelled, tail = answer_ids + suffix_ids[:cut], suffix_ids[cut:]
        prompt_ids = self.bos_prefix + prompt_ids
        input_ids = prompt_ids + labelled + tail
        labels = [-100] * len(prompt_ids) + labelled + [-100] * len(tail)
        target = self.tokenizer.decode(
            labelled, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        return Encoded(
            input_ids=input_ids,
            labels=labels,
            prompt_length=len(prompt_ids),
            target=target,
            prompt_format=self.prompt_format,
        )


# --------------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------------


def as_cycle(value: Any, name: str, kind: type | tuple[type, ...]) -> list:
    """An int/float or a non-empty list of them, as a list (generators cycle through it)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise ValueError(f"{name} must not be an empty list.")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, kind):
            raise TypeError(f"{name} must be a number or a list of numbers, got {value!r}.")
    return values


def check_num_samples(num_samples: Any) -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}.")
    return num_samples


def model_max_length(tokenizer: Any) -> int | None:
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, (int, float)) and 0 < limit < REAL_LENGTH_LIMIT:
        return int(limit)
    return None


POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def model_position_limit(tokenizer: Any) -> tuple[int, str] | None:
    """``(context window, source)`` of the model when the tokenizer was loaded from a local model folder
    whose ``config.json`` declares a fixed window; ``None`` when unknown.

    A config with RoPE scaling is treated as unknown: such a model is meant to run past its nominal
    ``max_position_embeddings`` (and context extension applied at load time is not in the file anyway).
    """
    folder = getattr(tokenizer, "name_or_path", None)
    if not isinstance(folder, str) or not folder or not os.path.isdir(folder):
        return None
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    if isinstance(config.get("text_config"), dict):  # multimodal checkpoints
        config = config["text_config"]
    for key in ("rope_scaling", "rope_parameters"):
        rope = config.get(key)
        if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) != "default":
            return None
    for key in POSITION_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, f"{key}={value} in {path}"
    return None


def check_lengths(tokenizer: Any, length: Any) -> list[int]:
    lengths = as_cycle(length, "length", int)
    limit = model_max_length(tokenizer)
    position = model_position_limit(tokenizer)
    for n in lengths:
        if n < 1:
            raise ValueError(f"length must be a positive number of tokens, got {n}.")
        if limit is not None and n > limit:
            raise ValueError(
                f"length={n} tokens is longer than tokenizer.model_max_length={limit}. Use a shorter length, "
                "or raise tokenizer.model_max_length if the model's context was extended (e.g. RoPE scaling)."
            )
        # The model's own window, unless the tokenizer was explicitly given a larger limit (the user's
        # statement that the context was extended).
        if position is not None and n > position[0] and (limit is None or limit <= position[0]):
            raise ValueError(
                f"length={n} tokens is longer than the model's context window ({position[1]}). Use a shorter "
                f"length, or, if you extend the context (RoPE scaling, Self-Extend), set "
                f"tokenizer.model_max_length = {n} (or more) to confirm."
            )
    return lengths


def check_depths(depths: Any) -> list[float] | None:
    if depths is None:
        return None
    values = [float(d) for d in as_cycle(depths, "depths", (int, float))]
    for d in values:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"depths must lie in [0, 1] (0 = start of the context, 1 = end), got {d}.")
    return values


def grid_value(values: list, index: int, stride: int = 1):
    """``values[(index // stride) % len(values)]``: with ``stride = len(lengths)``, samples
    ``0 .. len(lengths) * len(depths) - 1`` cover every (length, depth) pair once."""
    return values[(index // stride) % len(values)]


def tolerance(length: int) -> int:
    return max(2, math.floor(LENGTH_TOLERANCE * length))


def sample_rng(task: str, seed: int, index: int) -> random.Random:
    """Per-sample stream: sample i depends only on (task, seed, i), so a dataset with more samples
    extends a smaller one with the same seed."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}.")
    return random.Random(f"seal_peft.data/{task}/{seed}/{index}")


def too_short_error(task: str, length: int, minimum: int) -> ValueError:
    return ValueError(
        f"length={length} tokens is too short for {task}: the instruction, question, answer and one record "
        f"already take {minimum} tokens with this tokenizer and prompt format. Use length >= {minimum}."
    )


# --------------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------------


def make_record(enc: Encoded, *, task: str, depth: float, key: str, answer: str) -> dict[str, Any]:
    return {
        "input_ids": enc.input_ids,
        "attention_mask": [1] * len(enc.input_ids),
        "labels": enc.labels,
        "prompt_length": enc.prompt_length,
        "task": task,
        "length": len(enc.input_ids),
        "depth": float(depth),
        "key": key,
        "answer": answer,
        "target": enc.target,
        "prompt_format": enc.prompt_format,
    }


#: key of the generation record that ``to_dataset`` stores in ``Dataset.info.description`` (JSON)
METADATA_KEY = "seal_peft_data"
METADATA_FORMAT = 1
_UNSET: Any = object()


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """``{"name", "vocab_size", "sha256"}`` of a tokenizer: its ``name_or_path`` and the sha256 of its
    vocabulary (every ``(id, token)`` pair, added tokens included). Token ids mean the same tokens exactly
    when the fingerprints are equal, whatever the name (a Hub id and a local copy match). ``sha256`` is
    ``None`` for a tokenizer without ``get_vocab()``.
    """
    name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if not callable(get_vocab):
        return {"name": str(name), "vocab_size": None, "sha256": None}
    try:  # hashing a vocabulary takes ~0.25 s: remembered per tokenizer object and size (added tokens)
        size = len(tokenizer)
        cached = _FINGERPRINTS.get(tokenizer)
    except TypeError:  # no len() or not weak-referenceable
        size, cached = None, None
    if cached is not None and size is not None and cached[0] == size:
        return {"name": str(name), "vocab_size": cached[1], "sha256": cached[2]}
    pairs = sorted((int(i), str(t)) for t, i in get_vocab().items())
    digest = hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode("utf-8", "surrogatepass")).hexdigest()
    if size is not None:
        try:
            _FINGERPRINTS[tokenizer] = (size, len(pairs), digest)
        except TypeError:
            pass
    return {"name": str(name), "vocab_size": len(pairs), "sha256": digest}


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def to_dataset(records: list[dict[str, Any]], tokenizer: Any = None, *, essays: str | None = _UNSET):
    """The records as a ``datasets.Dataset`` with a generation record (see :func:`dataset_metadata`).

    ``tokenizer``: the tokenizer the records were built with; its :func:`tokenizer_fingerprint` is
    recorded, so ``seal-peft train --data`` can refuse data made for another model's tokenizer.
    ``essays``: which half of the essays the haystacks come from (``"train"``, ``"eval"``, ``None`` =
    all); only for generators that use the essays.
    """
    from datasets import Dataset, DatasetInfo, Features, Sequence, Value

    features = Features(
        {
            "input_ids": Sequence(Value("int64")),
            "attention_mask": Sequence(Value("int64")),
            "labels": Sequence(Value("int64")),
            "prompt_length": Value("int64"),
            "task": Value("string"),
            "length": Value("int64"),
            "depth": Value("float64"),
            "key": Value("string"),
            "answer": Value("string"),
            "target": Value("string"),
            "prompt_format": Value("string"),
        }
    )
    meta: dict[str, Any] = {"format": METADATA_FORMAT}
    if tokenizer is not None:
        meta["tokenizer"] = tokenizer_fingerprint(tokenizer)
    if essays is not _UNSET:
        meta["essays"] = essays or "all"
    info = DatasetInfo(description=json.dumps({METADATA_KEY: meta}, sort_keys=True), features=features)
    return Dataset.from_dict({c: [r[c] for r in records] for c in COLUMNS}, info=info)


def dataset_metadata(dataset: Any) -> list[dict[str, Any]]:
    """The generation records of a dataset made by ``seal_peft.data``: ``[{"format": 1, "tokenizer":
    {"name", "vocab_size", "sha256"}, "essays": "eval"}]`` (``essays`` only for needle data) — one per
    generated dataset it holds (``concatenate_datasets`` of datasets with
    different records keeps each), ``[]`` for a dataset without one (written by an older seal-peft,
    rebuilt from a list, or not generated here).

    The record lives in ``dataset.info.description`` and survives ``save_to_disk`` /
    ``load_from_disk``, ``select``, ``shuffle``, ``filter`` and ``map``.
    """
    description = getattr(getattr(dataset, "info", None), "description", None)
    if not isinstance(description, str) or METADATA_KEY not in description:
        return []
    found = []
    for block in description.split("\n\n"):  # concatenate_datasets joins distinct ones with a blank line
        try:
            value = json.loads(block)
        except ValueError:
            continue
        if isinstance(value, dict) and isinstance(value.get(METADATA_KEY), dict):
            found.append(value[METADATA_KEY])
    return found


def progress_bar(iterable: Iterable, total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False)


def _retrieval_rows(ds: Any) -> tuple[set[str], set[str]]:
    if ds is None:
        return set(), set()
    if isinstance(ds, dict):  # {"key": [...], "answer": [...]} or a single record
        rows = [ds] if isinstance(ds.get("key"), str) else [dict(zip(ds, v)) for v in zip(*ds.values())]
    elif hasattr(ds, "select_columns") and {"key", "answer"} <= set(getattr(ds, "column_names", [])):
        wanted = [c for c in ("task", "key", "answer") if c in ds.column_names]
        rows = list(ds.select_columns(wanted))  # skip the (long) token columns
    else:
        rows = list(ds)
    keys, answers = set(), set()
    for row in rows:
        if "key" not in row or "answer" not in row:
            raise ValueError(
                "exclude= got records without 'key'/'answer' columns (e.g. a dataset mixed with "
                "add_lm_samples / mix_lm_samples, which keep only the token columns), so nothing could be "
                "excluded; pass the retrieval dataset from before the mixing."
            )
        if row.get("task", "line_retrieval") in RETRIEVAL_TASKS:
            keys.add(str(row["key"]))
            answers.add(str(row["answer"]))
    return keys, answers


def excluded(exclude: Any) -> tuple[set[str], set[str]]:
    """Keys and answers of retrieval rows in ``exclude`` (a dataset, a list of records, or a list of
    datasets) that a new dataset must not reuse."""
    if exclude is None:
        return set(), set()
    if isinstance(exclude, (list, tuple)) and exclude and not isinstance(exclude[0], dict):
        keys, answers = set(), set()
        for ds in exclude:
            k, a = _retrieval_rows(ds)
            keys |= k
            answers |= a
        return keys, answers
    return _retrieval_rows(exclude)


def check_disjoint(train_ds: Any, eval_ds: Any) -> None:
    """Raise ``ValueError`` if a line/kv-retrieval key or answer of ``eval_ds`` also occurs in ``train_ds``.

    Only rows whose ``task`` is ``line_retrieval`` or ``kv_retrieval`` are compared (needle answers come
    from small word lists and repeat by design). Generate train and eval data with different seeds, or
    pass ``exclude=train_ds`` when generating the eval set to make this hold by construction.
    """
    train_keys, train_answers = _retrieval_rows(train_ds)
    eval_keys, eval_answers = _retrieval_rows(eval_ds)
    shared_keys = sorted(train_keys & eval_keys)
    shared_answers = sorted(train_answers & eval_answers)
    if shared_keys or shared_answers:
        parts = []
        if shared_keys:
            parts.append(f"{len(shared_keys)} shared key(s), e.g. {shared_keys[:3]}")
        if shared_answers:
            parts.append(f"{len(shared_answers)} shared answer(s), e.g. {shared_answers[:3]}")
        raise ValueError(
            "Train and eval data overlap: " + "; ".join(parts) + ". Generate them with different seeds and "
            "pass exclude=train_ds when generating the eval set."
        )


def fit_items(
    count_fn,
    items: list,
    redraw,
    item_tokens,
    target: int,
    tol: int,
    rng: random.Random,
    new_item,
    max_rounds: int = 12,
) -> tuple[list, int]:
    """Adjust a list of filler ``items`` until ``count_fn(items)`` is within ``tol`` of ``target``.

    Coarse steps add/remove items (estimated from the mean item size); fine steps redraw single items
    (``redraw(item) -> item``) whose token size (``item_tokens``) moves the total towards the target.
    Returns the best ``(items, total)`` found.
    """
    best_items, best_total = list(items), None
    for _ in range(max_rounds):
        total = count_fn(items)
        if best_total is None or abs(target - total) < abs(target - best_total):
            best_items, best_total = list(items), total
        diff = target - total
        if abs(diff) <= tol // 2 or (abs(diff) <= tol and not items):
            break
        sizes = [item_tokens(it) for it in items[:64]] or [item_tokens(new_item())]
        mean = sum(sizes) / len(sizes)
        steps = int(round(diff / mean))
        if steps > 0:
            items = items + [new_item() for _ in range(steps)]
            continue
        if steps < 0 and len(items) + steps >= 0:
            drop = set(rng.sample(range(len(items)), -steps))
            items = [it for i, it in enumerate(items) if i not in drop]
            continue
        if not items:
            break
        # fine: swap single items for same-kind items of a better token size
        need = diff
        items = list(items)
        order = list(range(len(items)))
        rng.shuffle(order)
        for idx in order[:256]:
            if need == 0:
                break
            old = item_tokens(items[idx])
            best_cand, best_gain = None, 0
            for _ in range(12):
                cand = redraw(items[idx])
                gain = abs(need) - abs(need - (item_tokens(cand) - old))
                if gain > best_gain:
                    best_cand, best_gain = cand, gain
                    if item_tokens(cand) - old == need:
                        break
            if best_cand is not None:
                need -= item_tokens(best_cand) - old
                items[idx] = best_cand
    return best_items, (best_total if best_total is not None else count_fn(items))


def pick(rng: random.Random, values: Sequence):
    return values[rng.randrange(len(values))]
