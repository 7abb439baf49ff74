"""Greedy answer generation for long prompts, written for CPU-sized budgets.

Why a hand-written loop instead of ``model.generate``: the prompts are 512-16K tokens and the
answers are a few tokens, so the cost is the prefill. The loop here

- runs the prefill with ``logits_to_keep=1`` (full-vocabulary logits for a 16K prompt would cost
  GBs and are thrown away),
- decodes with the KV cache, one token per step, writing each new key/value into room reserved after
  the prefill (transformers' ``DynamicCache`` concatenates, i.e. copies the whole cache of every
  layer at every step: a fifth of a SmolLM2 decode step at 2K tokens on CPU),
- stops each sequence at EOS *or* as soon as its answer is complete (for numeric answers: once the
  first integer is followed by a non-digit, because the first-integer scorer cannot change after
  that point),
- batches prompts of similar length (sorted, left padded, explicit position ids) when
  ``batch_size > 1``.

It works on a plain transformers causal LM and on a ``peft.PeftModel`` (whose forward passes the
cache / position arguments through to the base model).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicLayer

from ..models import accepts_logits_to_keep, forward_parameters, input_device
from ..tuner.utils import get_base_model

__all__ = [
    "greedy_generate",
    "generate_answers",
    "generate_answer_tokens",
    "answer_plan",
    "AnswerPlan",
    "reserve_kv_room",
    "numeric_answer_complete",
    "is_numeric_answer",
    "prompt_ids",
    "as_records",
    "check_fields",
]

_NUMERIC_ANSWER = re.compile(r"^\s*<?\s*\d+\s*>?\s*$")
_COMPLETE_INTEGER = re.compile(r"\d+\D")


# ----------------------------------------------------------------------------------------------
# records
# ----------------------------------------------------------------------------------------------
def as_records(dataset: Any, what: str = "evaluation set", task: str = "evaluate") -> list[Mapping[str, Any]]:
    """Materialise a ``datasets.Dataset`` / list of dicts into a list of mappings (never empty); errors
    name the ``what`` and that there is nothing to ``task``. Evaluation and analysis both use it."""
    if dataset is None:
        raise ValueError(f"the {what} is None; pass a datasets.Dataset or a list of dict records")
    if isinstance(dataset, Mapping):
        raise TypeError(
            f"the {what} is a single mapping ({type(dataset).__name__}); pass a datasets.Dataset or a "
            "list of dict records (wrap one record as [record])"
        )
    try:
        n = len(dataset)
    except TypeError:
        dataset = list(dataset)
        n = len(dataset)
    if n == 0:
        raise ValueError(
            f"the {what} is empty: there is nothing to {task}. Generate records first (e.g. with "
            "seal_peft.data) or check the filter/split that produced it"
        )
    records = [dataset[i] for i in range(n)] if hasattr(dataset, "__getitem__") else list(dataset)
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise TypeError(
                f"record {i} of the {what} is a {type(record).__name__}, expected a dict-like record"
            )
    return records


def check_fields(records: Sequence[Mapping[str, Any]], required: Sequence[str], purpose: str) -> None:
    """Raise a ValueError naming the first record that lacks any of ``required`` and how to fix it."""
    for i, record in enumerate(records):
        missing = [f for f in required if f not in record or record[f] is None]
        if missing:
            have = ", ".join(sorted(record.keys())) or "none"
            raise ValueError(
                f"record {i} is missing field(s) {missing} needed for {purpose} (it has: {have}). "
                "Records from seal_peft.data generators carry them; for your own data add "
                + ", ".join(f"'{m}'" for m in missing)
                + _FIX_HINTS.get(missing[0], "")
            )


_FIX_HINTS = {
    "prompt_length": " (the number of leading input_ids that form the prompt; use len(input_ids) "
    "when input_ids holds only the prompt)",
    "answer": " (the expected answer text, e.g. '40779')",
    "input_ids": " (the tokenized prompt, a list of token ids)",
}


def prompt_ids(record: Mapping[str, Any], index: int = 0) -> list[int]:
    """``input_ids[:prompt_length]`` of a record, validated."""
    ids = record["input_ids"]
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    n = int(record["prompt_length"])
    if not 1 <= n <= len(ids):
        raise ValueError(
            f"record {index}: prompt_length={n} is outside 1..len(input_ids)={len(ids)}; it must count the "
            "leading input_ids that form the prompt"
        )
    return [int(t) for t in ids[:n]]


# ----------------------------------------------------------------------------------------------
# stop rules
# ----------------------------------------------------------------------------------------------
def is_numeric_answer(answer: Any) -> bool:
    """``"40779"``, ``"<40779>"`` and ints are numeric answers."""
    return answer is not None and bool(_NUMERIC_ANSWER.match(str(answer)))


def numeric_answer_complete(text: str) -> bool:
    """True once the first integer in ``text`` is followed by a non-digit (it cannot grow anymore)."""
    return _COMPLETE_INTEGER.search(text) is not None


StopRule = Callable[[Mapping[str, Any], str], bool]


def _auto_rule_applies(record: Mapping[str, Any]) -> bool:
    # LongEval scores the *last* integer of the whole output: a longeval record runs to EOS / its cap
    return record.get("prompt_format") != "longeval" and is_numeric_answer(record.get("answer"))


def _auto_stop_rule(record: Mapping[str, Any], text: str) -> bool:
    return _auto_rule_applies(record) and numeric_answer_complete(text)


def _resolve_stop_rule(stop_rule: str | StopRule | None) -> StopRule | None:
    if stop_rule is None:
        return None
    if callable(stop_rule):
        return stop_rule
    if stop_rule == "auto":
        return _auto_stop_rule
    raise ValueError(
        f"stop_rule must be 'auto', None or a callable (record, text) -> bool, got {stop_rule!r}"
    )


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------
def _cache_kwarg(model: torch.nn.Module) -> str:
    """transformers >= 5.24 names the KV-cache argument ``cache`` (``past_key_values`` is deprecated)."""
    params = forward_parameters(model)
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def _output_cache(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def eos_token_ids(model: torch.nn.Module, tokenizer: Any = None) -> set[int]:
    """EOS ids from the tokenizer and the model's generation config (chat models often add one)."""
    ids: set[int] = set()
    candidates = [getattr(tokenizer, "eos_token_id", None)]
    gen_config = getattr(get_base_model(model), "generation_config", None)
    candidates.append(getattr(gen_config, "eos_token_id", None))
    for c in candidates:
        if c is None:
            continue
        if isinstance(c, int):
            ids.add(c)
        else:
            ids.update(int(x) for x in c)
    return ids


def _last_logits(output: Any) -> torch.Tensor:
    return output.logits[:, -1, :]


class _RoomyLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values are views of a buffer with room for more tokens.

    The views cover the first ``n`` positions of a buffer of ``n + room``: attention gets exactly the
    tensors a ``DynamicLayer`` would return (same values and shape; only the strides of the batch and
    head dimensions differ), so decoding is bit-identical (tested), and a step writes one position
    instead of copying the whole cache. Out of room, or once the views stop being views of the buffer
    (``batch_select_indices``, ``reorder_cache``), it falls back to ``DynamicLayer``'s concatenation;
    ``crop`` keeps working (a shorter view, the next update overwrites the stale positions).
    """

    # an update never changes the positions already held (Self-Extend may keep per-position data)
    seal_append_only = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int) -> None:
        super().__init__()
        n = keys.shape[-2]
        self.device = keys.device
        self._key_buffer: torch.Tensor | None = keys.new_empty((*keys.shape[:-2], n + room, keys.shape[-1]))
        self._value_buffer: torch.Tensor | None = values.new_empty(
            (*values.shape[:-2], n + room, values.shape[-1])
        )
        self._key_buffer[..., :n, :].copy_(keys)
        self._value_buffer[..., :n, :].copy_(values)
        self.keys = self._key_buffer[..., :n, :]
        self.values = self._value_buffer[..., :n, :]
        self.is_initialized = True

    def _views_of_buffer(self) -> bool:
        kb, vb = self._key_buffer, self._value_buffer
        return (
            kb is not None
            and vb is not None
            and self.keys.data_ptr() == kb.data_ptr()
            and self.values.data_ptr() == vb.data_ptr()
            and self.keys.stride() == kb.stride()
            and self.values.stride() == vb.stride()
            and self.keys.shape[:-2] == kb.shape[:-2]
        )

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, m = self.keys.shape[-2], key_states.shape[-2]
        if not self._views_of_buffer() or n + m > self._key_buffer.shape[-2]:
            self._key_buffer = self._value_buffer = None  # concatenate from now on
            return super().update(key_states, value_states, *args, **kwargs)
        self._key_buffer[..., n : n + m, :].copy_(key_states)
        self._value_buffer[..., n : n + m, :].copy_(value_states)
        self.keys = self._key_buffer[..., : n + m, :]
        self.values = self._value_buffer[..., : n + m, :]
        return self.keys, self.values


def reserve_kv_room(cache: Any, room: int) -> int:
    """Give every plain ``DynamicLayer`` of a transformers cache room for ``room`` more tokens, in place.

    Returns the number of layers converted (0 for caches without per-layer ``DynamicLayer`` objects,
    e.g. legacy tuples, static or sliding-window caches, which are left as they are).
    """
    layers = getattr(cache, "layers", None)
    if room < 1 or not isinstance(layers, list):
        return 0
    converted = 0
    for i, layer in enumerate(layers):
        # only plain full-attention layers: sliding-window, quantized, offloaded ... layers keep their rule
        if type(layer) is not DynamicLayer or not layer.is_initialized:
            continue
        keys, values = layer.keys, layer.values
        if not (torch.is_tensor(keys) and torch.is_tensor(values)) or keys.dim() != 4 or keys.numel() == 0:
            continue
        layers[i] = _RoomyLayer(keys, values, room)
        converted += 1
    return converted


@torch.inference_mode()
def _greedy_batch(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_ids: set[int],
    should_stop: Callable[[int, list[int]], bool] | None,
    pad_token_id: int,
    use_logits_to_keep: bool,
    cache_kwarg: str = "past_key_values",
) -> list[list[int]]:
    device = input_device(model)
    batch, width = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left padding: every prompt ends at the last column
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    input_ids, attention_mask, position_ids = (
        t.to(device) for t in (input_ids, attention_mask, position_ids)
    )

    kwargs: dict[str, Any] = {"use_cache": True}
    if use_logits_to_keep:
        kwargs["logits_to_keep"] = 1
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
    logits, past = _last_logits(out), _output_cache(out)
    del out
    if max_new_tokens > 1:
        reserve_kv_room(past, max_new_tokens - 1)  # the decode steps write in place, no per-step copy
    next_position = position_ids[:, -1:] + 1

    generated: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    for step in range(max_new_tokens):
        next_tokens = logits.argmax(dim=-1)
        for row, token in enumerate(next_tokens.tolist()):
            if done[row]:
                continue
            if token in eos_ids:
                done[row] = True
                continue
            generated[row].append(token)
            if should_stop is not None and should_stop(row, generated[row]):
                done[row] = True
        if all(done) or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch, 1))], dim=-1)
        out = model(
            input_ids=next_tokens[:, None].to(device),  # the logits may sit on another device (device_map)
            attention_mask=attention_mask,
            position_ids=next_position,
            use_cache=True,
            **{cache_kwarg: past},
        )
        logits, past = _last_logits(out), _output_cache(out)
        del out
        next_position = next_position + 1
    return generated


def greedy_generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 24,
    eos_token_id: int | Sequence[int] | None = None,
    stop: Callable[[int, list[int]], bool] | None = None,
    batch_size: int = 1,
    pad_token_id: int = 0,
    progress: bool = True,
    desc: str = "generating",
) -> list[list[int]]:
    """Greedy-decode each prompt (a list of token ids); return the new token ids per prompt.

    Args:
        model: a causal LM (transformers model or ``peft.PeftModel``).
        prompts: token-id prompts, any lengths.
        max_new_tokens: upper bound on new tokens per prompt.
        eos_token_id: token id(s) that end a sequence (not included in the result). ``None``
            uses the model's ``generation_config.eos_token_id``.
        stop: ``stop(prompt_index, tokens_so_far) -> bool`` ends a sequence early (the token that
            triggered it is kept).
        batch_size: prompts per forward pass; prompts are sorted by length so a batch holds
            similar lengths, and the results come back in the input order.
        pad_token_id: id used for left padding (masked out, any valid id works).
        progress: show a tqdm bar over prompts.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(prompts) == 0:
        raise ValueError("no prompts to generate from; pass at least one list of token ids")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
    if eos_token_id is None:
        eos_ids = eos_token_ids(model)
    elif isinstance(eos_token_id, int):
        eos_ids = {eos_token_id}
    else:
        eos_ids = {int(t) for t in eos_token_id}

    use_ltk = accepts_logits_to_keep(model)
    cache_kwarg = _cache_kwarg(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    results: list[list[int] | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(prompts), desc=desc, disable=not progress, unit="prompt") as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                row_stop = None
                if stop is not None:
                    row_stop = (lambda ids_: lambda row, toks: stop(ids_[row], toks))(idx)
                batch_out = _greedy_batch(
                    model,
                    [prompts[i] for i in idx],
                    max_new_tokens,
                    eos_ids,
                    row_stop,
                    pad_token_id,
                    use_ltk,
                    cache_kwarg,
                )
                for i, toks in zip(idx, batch_out):
                    results[i] = toks
                bar.update(len(idx))
    finally:
        model.train(was_training)
    return [r if r is not None else [] for r in results]


#: new-token caps when the caller gives none: LongEval's 100 for its protocol, 24 otherwise (enough for
#: "The <REGISTER_CONTENT> in line x-y is N." and the shorter pre-filled replies)
LONGEVAL_MAX_NEW_TOKENS = 100
DEFAULT_MAX_NEW_TOKENS = 24


def default_max_new_tokens(record: Mapping[str, Any]) -> int:
    """The new-token cap of one record: 100 under ``prompt_format="longeval"`` (LongEval's), else 24."""
    return LONGEVAL_MAX_NEW_TOKENS if record.get("prompt_format") == "longeval" else DEFAULT_MAX_NEW_TOKENS


@dataclass
class AnswerPlan:
    """What :func:`generate_answers` decodes for each record: its prompt, new-token cap and stop test.

    Shared with :func:`seal_peft.evaluation.hf_generate.generate_answers_hf` (the same answers through
    ``model.generate``), so both apply the same per-record caps and stop rules.
    """

    records: list[Mapping[str, Any]]
    prompts: list[list[int]]
    caps: list[int]
    eos_ids: set[int]
    pad_token_id: int
    decode: Callable[[Sequence[int]], str]
    stop: Callable[[int, list[int]], bool]


def answer_plan(
    tokenizer: Any,
    dataset: Any,
    max_new_tokens: int | None,
    stop_rule: str | StopRule | None,
    eos_ids: set[int],
) -> AnswerPlan:
    """Validate the records and build their :class:`AnswerPlan` (see :func:`generate_answers`)."""
    records = as_records(dataset)
    check_fields(records, ("input_ids", "prompt_length"), "generation")
    prompts = [prompt_ids(r, i) for i, r in enumerate(records)]
    rule = _resolve_stop_rule(stop_rule)
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(
            f"max_new_tokens must be >= 1 (or None for each record's default), got {max_new_tokens}"
        )

    def decode(tokens: Sequence[int]) -> str:
        return tokenizer.decode(list(tokens), skip_special_tokens=True)

    caps = [default_max_new_tokens(r) if max_new_tokens is None else max_new_tokens for r in records]
    # records the rule can stop: the text is decoded at every step only for them ("auto" never stops a
    # LongEval or non-numeric record, so those are not decoded until the end)
    ruled = [rule is not None and (rule is not _auto_stop_rule or _auto_rule_applies(r)) for r in records]

    def stop(i: int, toks: list[int]) -> bool:
        return len(toks) >= caps[i] or (ruled[i] and rule(records[i], decode(toks)))

    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = next(iter(sorted(eos_ids)), 0)
    return AnswerPlan(records, prompts, caps, set(eos_ids), int(pad), decode, stop)


def generate_answer_tokens(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: Any,
    max_new_tokens: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    stop_rule: str | StopRule | None = "auto",
) -> list[list[int]]:
    """The new token ids of every record (EOS excluded): :func:`generate_answers` before decoding."""
    plan = answer_plan(tokenizer, dataset, max_new_tokens, stop_rule, eos_token_ids(model, tokenizer))
    return _generate_plan(model, plan, batch_size, progress)


def _generate_plan(
    model: torch.nn.Module, plan: AnswerPlan, batch_size: int, progress: bool
) -> list[list[int]]:
    return greedy_generate(
        model,
        plan.prompts,
        max_new_tokens=max(plan.caps),
        eos_token_id=sorted(plan.eos_ids),
        stop=plan.stop,
        batch_size=batch_size,
        pad_token_id=plan.pad_token_id,
        progress=progress,
    )


def generate_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: Any,
    max_new_tokens: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    stop_rule: str | StopRule | None = "auto",
) -> list[str]:
    """Greedy answers for every record of ``dataset`` (generated from ``input_ids[:prompt_length]``).

    Args:
        model: causal LM or ``peft.PeftModel``.
        tokenizer: used to decode the new tokens (special tokens skipped) and for its EOS id.
        dataset: ``datasets.Dataset`` or sequence of dicts with ``input_ids`` and ``prompt_length``.
        max_new_tokens: cap on new tokens for every record; ``None`` (default) uses each record's own
            :func:`default_max_new_tokens` (LongEval's 100 under its protocol, else 24).
        batch_size: >1 batches prompts of similar length (left padded).
        progress: tqdm bar.
        stop_rule: ``"auto"`` stops a record whose ``answer`` is a number as soon as the first
            integer of the output is complete; ``None`` only stops at EOS / ``max_new_tokens``;
            a callable ``(record, text_so_far) -> bool`` is a custom rule.

    Returns:
        One decoded, whitespace-stripped string per record, in order.
    """
    plan = answer_plan(tokenizer, dataset, max_new_tokens, stop_rule, eos_token_ids(model, tokenizer))
    return [plan.decode(t).strip() for t in _generate_plan(model, plan, batch_size, progress)]
