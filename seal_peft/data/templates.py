"""User-defined tasks: adapt SEAL to your own retrieval format with a template and your own triples."""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable, Sequence
from typing import Any

from ._common import (
    PromptEncoder,
    check_num_samples,
    make_record,
    model_max_length,
    progress_bar,
    sample_rng,
    to_dataset,
)

__all__ = ["user_template", "DEFAULT_TEMPLATE"]

DEFAULT_TEMPLATE = "{context}\n\nQuestion: {question}\nAnswer: {answer}"
_SLOTS = {"context", "question", "answer"}


def _split_template(template: str) -> tuple[str, str]:
    """``template`` -> (prompt part with {context}/{question}, reply part starting with {answer})."""
    if not isinstance(template, str):
        raise TypeError(f"template must be a str, got {type(template).__name__}.")
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    unknown = sorted(set(fields) - _SLOTS)
    if unknown:
        raise ValueError(
            f"template has unknown slot(s) {unknown}; use only {{context}}, {{question}} and {{answer}} "
            "(double braces {{ }} for literal braces)."
        )
    if fields.count("answer") != 1 or "context" not in fields:
        raise ValueError("template needs exactly one {answer} slot and a {context} slot.")
    if fields[-1] != "answer":
        raise ValueError("{answer} must be the last slot of the template (after {context} and {question}).")
    cut = template.index("{answer}")
    return template[:cut], template[cut:]


def _as_example(item: Any, index: int) -> dict[str, str]:
    if not isinstance(item, dict):
        raise TypeError(
            f"example {index} must be a dict with context/question/answer, got {type(item).__name__}."
        )
    missing = [k for k in ("context", "answer") if k not in item]
    if missing:
        raise ValueError(f"example {index} lacks {missing}; each example needs context, question and answer.")
    out = {k: "" if item.get(k) is None else str(item[k]) for k in ("context", "question", "answer")}
    if not out["answer"].strip():
        raise ValueError(f"example {index} has an empty answer.")
    for opt in ("key", "prefill", "target"):
        if item.get(opt) is not None:
            out[opt] = str(item[opt])
    if "depth" in item and item["depth"] is not None:
        out["depth"] = float(item["depth"])
    return out


def user_template(
    tokenizer: Any,
    examples: Sequence[dict[str, Any]] | Callable[[random.Random], dict[str, Any]],
    template: str = DEFAULT_TEMPLATE,
    num_samples: int | None = None,
    prompt_format: str = "chat",
    seed: int = 0,
    system_prompt: str | None = None,
    *,
    task: str = "user_template",
    max_length: int | None = None,
    progress: bool = True,
):
    """Build training / evaluation data for your own task in the same schema as the built-in generators.

    Args:
        tokenizer: the model's tokenizer.
        examples: a list of dicts, or a callable ``fn(rng: random.Random) -> dict`` called once per sample
            (use ``rng`` for all randomness to stay deterministic). Each dict has ``context``, ``question``
            (may be empty) and ``answer``, and optionally ``key`` (stored in the ``key`` column), ``depth``
            (stored in ``depth``; otherwise the position of ``answer`` inside ``context``, or NaN when it
            does not occur), ``target`` (the reply text; default ``answer`` plus the template text after
            ``{answer}``) and ``prefill`` (the start of the reply given to the model in
            ``"chat_prefill"`` format; it must be a prefix of the reply).
        template: text with ``{context}``, ``{question}`` and ``{answer}`` slots, ``{answer}`` last. The
            text before ``{answer}`` is the prompt (the user message in chat formats); ``{answer}`` and
            what follows it is the reply. In ``"plain"`` format the text is used verbatim (trailing spaces
            before ``{answer}`` move into the reply) and the EOS token is appended.
        num_samples: number of samples; default ``len(examples)`` (required for a callable). A list
            shorter than ``num_samples`` is cycled.
        prompt_format, seed, system_prompt, progress: as in :func:`~seal_peft.data.line_retrieval`.
        task: value of the ``task`` column.
        max_length: raise ``ValueError`` if a sample is longer (also checked against a real
            ``tokenizer.model_max_length``).
    """
    prompt_part, reply_part = _split_template(template)
    if callable(examples):
        if num_samples is None:
            raise ValueError("num_samples is required when examples is a callable.")
        num_samples = check_num_samples(num_samples)
        pool: list | None = None
    else:
        pool = list(examples)
        if not pool:
            raise ValueError("examples is empty: pass at least one dict with context, question and answer.")
        num_samples = check_num_samples(len(pool) if num_samples is None else num_samples)
    encoder = PromptEncoder(tokenizer, prompt_format, system_prompt)
    limit = max_length if max_length is not None else model_max_length(tokenizer)
    stripped = prompt_part.rstrip(" ")
    gap = prompt_part[len(stripped) :]  # "Answer: {answer}" -> prompt "...Answer:", reply " <answer>"

    records = []
    for i in progress_bar(range(num_samples), num_samples, f"{task} data", progress):
        rng = sample_rng(task, seed, i)
        ex = _as_example(examples(rng) if pool is None else pool[i % len(pool)], i)
        prompt = stripped.format(context=ex["context"], question=ex["question"])
        reply = ex.get("target") or reply_part.format(answer=ex["answer"])
        prefill = ex.get("prefill", "")
        if prompt_format == "chat_prefill":
            if not prefill:
                raise ValueError(
                    f"example {i}: prompt_format='chat_prefill' needs a 'prefill' (the start of the reply, e.g. "
                    "'The answer is') in every example; use prompt_format='chat' otherwise."
                )
            if not reply.startswith(prefill) or len(prefill) >= len(reply):
                raise ValueError(
                    f"example {i}: prefill {prefill!r} must be a proper prefix of the reply {reply!r}."
                )
        if prompt_format == "plain":
            enc = _encode_plain(encoder, prompt, gap + reply)
        else:
            lead = prefill if prefill and reply.startswith(prefill) else ""
            enc = encoder.encode(prompt.strip(), lead, reply[len(lead) :])
        if limit is not None and len(enc.input_ids) > limit:
            raise ValueError(
                f"example {i} has {len(enc.input_ids)} tokens, more than the limit of {limit} "
                "(max_length / tokenizer.model_max_length); shorten its context."
            )
        if "depth" in ex:
            depth = ex["depth"]
        else:
            pos = ex["context"].find(ex["answer"]) if ex["context"] else -1
            depth = pos / max(1, len(ex["context"]) - len(ex["answer"])) if pos >= 0 else math.nan
        records.append(
            make_record(enc, task=task, depth=depth, key=ex.get("key", str(i)), answer=ex["answer"])
        )
    return to_dataset(records, tokenizer)


def _encode_plain(encoder: PromptEncoder, prompt: str, reply: str):
    """Plain format for user templates: [system + blank line] + the template text verbatim, the reply, EOS."""
    from ._common import Encoded

    if encoder.system_prompt:
        prompt = f"{encoder.system_prompt}\n\n{prompt}"
    prompt_ids = encoder._ids(prompt)
    answer_ids = encoder._continuation(prompt, prompt_ids, reply)
    if not answer_ids:
        raise ValueError("The answer is empty after tokenisation; every sample needs a non-empty answer.")
    labelled = answer_ids + ([encoder.eos_id] if encoder.eos_id is not None else [])
    prompt_ids = encoder.bos_prefix + prompt_ids
    target = encoder.tokenizer.decode(labelled, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return Encoded(
        prompt_ids + labelled, [-100] * len(prompt_ids) + labelled, len(prompt_ids), target, "plain"
    )
