"""LongBench-format QA evaluation (users bring the jsonl files).

A LongBench file holds one JSON object per line with ``context`` (the long document(s)), ``input``
(the question), ``answers`` (a list of acceptable answers) and optionally ``length``, ``_id``,
``dataset``, ``all_classes``, ``language``. The prompt is a template with ``{context}`` and
``{input}``; when it would exceed ``max_length`` tokens the *middle of the context* is cut (its
first and last halves are kept), the convention of LongBench, so the instruction and the
question are never truncated. The answer is greedy-decoded and scored with LongBench's QA F1.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .generation import eos_token_ids, greedy_generate
from .results import EvalResult, mean_or_nan
from .scoring import qa_f1

__all__ = [
    "DEFAULT_PROMPT_TEMPLATE",
    "LongBenchResult",
    "read_longbench_jsonl",
    "build_longbench_prompt",
    "evaluate_longbench",
]

DEFAULT_PROMPT_TEMPLATE = (
    "Read the document below and answer the question that follows it. Reply with only the answer, "
    "as short as possible (a word, a phrase or one sentence), with no explanation.\n\n"
    "Document:\n{context}\n\n"
    "Now answer the question using the document above. Reply with only the short answer.\n\n"
    "Question: {input}\nAnswer:"
)

LONGBENCH_REQUIRED = ("context", "input", "answers")


def read_longbench_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate a LongBench jsonl file; blank lines are skipped.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a line is not a JSON object, lacks ``context``/``input``/``answers``, has a
            field of the wrong type, or the file holds no record. The message names
            ``file:line`` and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"LongBench file {path} does not exist; download the LongBench data (one <dataset>.jsonl per "
            "task) and pass the path of one file"
        )
    records: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{where}: not valid JSON ({e.msg} at column {e.colno}); every line of a LongBench file "
                    "must be one JSON object"
                ) from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object per line, got {type(obj).__name__}")
            missing = [k for k in LONGBENCH_REQUIRED if k not in obj]
            if missing:
                raise ValueError(
                    f"{where}: missing field(s) {missing}; a LongBench record needs 'context' (str), "
                    "'input' (str, the question) and 'answers' (list of acceptable answer strings)"
                )
            for key in ("context", "input"):
                if not isinstance(obj[key], str):
                    raise ValueError(
                        f"{where}: field '{key}' must be a string, got {type(obj[key]).__name__}"
                    )
            answers = obj["answers"]
            if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
                raise ValueError(
                    f"{where}: field 'answers' must be a non-empty list of strings, got {answers!r}; "
                    'write e.g. "answers": ["Paris"]'
                )
            obj["_line"] = lineno
            records.append(obj)
    if not records:
        raise ValueError(f"{path} holds no LongBench record (the file is empty or blank)")
    return records


def _render(template: str, context: str, question: str) -> str:
    # str.replace, not str.format: contexts and templates may contain literal braces
    return template.replace("{context}", context).replace("{input}", question)


def _encode(tokenizer: Any, text: str, use_chat_template: bool) -> list[int]:
    if use_chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def build_longbench_prompt(
    tokenizer: Any,
    record: Mapping[str, Any],
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    max_length: int | None = None,
    use_chat_template: bool = False,
) -> tuple[list[int], bool]:
    """Token ids of the prompt for one record and whether the context was truncated.

    When the full prompt is longer than ``max_length`` tokens, the context keeps its first and
    last halves of the token budget that remains after the template and question.
    """
    context, question = record["context"], record["input"]
    ids = _encode(tokenizer, _render(prompt_template, context, question), use_chat_template)
    if max_length is None or len(ids) <= max_length:
        return ids, False
    overhead = len(_encode(tokenizer, _render(prompt_template, "", question), use_chat_template))
    budget = max_length - overhead
    if budget < 2:
        raise ValueError(
            f"max_length={max_length} leaves no room for the context: the template and question alone take "
            f"{overhead} tokens; raise max_length or shorten the prompt template"
        )
    context_ids = list(tokenizer(context, add_special_tokens=False)["input_ids"])
    for _ in range(8):  # decoding and re-encoding may shift token boundaries: shrink until it fits
        head = budget // 2
        tail = budget - head
        cut = tokenizer.decode(context_ids[:head], skip_special_tokens=True) + tokenizer.decode(
            context_ids[len(context_ids) - tail :], skip_special_tokens=True
        )
        ids = _encode(tokenizer, _render(prompt_template, cut, question), use_chat_template)
        if len(ids) <= max_length:
            return ids, True
        budget -= len(ids) - max_length
        if budget < 2:
            break
    raise ValueError(
        f"could not truncate the context of record {record.get('_id', '?')} to fit max_length={max_length}; "
        "raise max_length"
    )


@dataclass
class LongBenchResult(EvalResult):
    """Rows: ``index, _id, dataset, length, prompt_tokens, truncated, answers, output, score`` (F1)."""

    @property
    def mean_f1(self) -> float:
        """Mean QA F1 in [0, 1] (LongBench reports this x100)."""
        return self.accuracy

    def f1_by_dataset(self) -> dict[str, float]:
        groups: dict[str, list[float]] = {}
        for row in self.rows:
            groups.setdefault(str(row.get("dataset") or "unknown"), []).append(row["score"])
        return {k: mean_or_nan(v) for k, v in sorted(groups.items())}

    def table(self, *args: Any, **kwargs: Any) -> str:
        """Mean F1 overall and per LongBench dataset (F1 x100, as LongBench reports it)."""
        lines = [f"{self.name or 'LongBench'}: qa_f1 {100 * self.mean_f1:.2f} (n={self.n})"]
        by_dataset = self.f1_by_dataset()
        truncated = sum(1 for r in self.rows if r.get("truncated"))
        width = max(len("dataset"), *(len(k) for k in by_dataset))
        lines += ["", f"{'dataset':>{width}}  {'n':>5}  {'qa_f1':>7}"]
        for k, v in by_dataset.items():
            n = sum(1 for r in self.rows if str(r.get("dataset") or "unknown") == k)
            lines.append(f"{k:>{width}}  {n:>5}  {100 * v:>7.2f}")
        lines.append(f"\n{truncated} of {self.n} prompts had the middle of their context cut to fit")
        return "\n".join(lines)


def _default_max_length(model: torch.nn.Module, max_new_tokens: int) -> int | None:
    config = getattr(model, "config", None)
    window = getattr(config, "max_position_embeddings", None)
    return None if window is None else int(window) - max_new_tokens


def evaluate_longbench(
    model: torch.nn.Module,
    tokenizer: Any,
    path: str | Path | Sequence[Mapping[str, Any]],
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    max_new_tokens: int = 64,
    max_length: int | None = None,
    use_chat_template: bool | str = "auto",
    batch_size: int = 1,
    limit: int | None = None,
    progress: bool = True,
    name: str = "",
) -> LongBenchResult:
    """Generate answers for a LongBench jsonl file and score them with QA F1.

    Args:
        path: a LongBench jsonl file (or already-read records).
        prompt_template: text with ``{context}`` and ``{input}`` placeholders.
        max_new_tokens: answer budget (LongBench uses 32-128 for QA tasks).
        max_length: prompt budget in tokens; ``None`` = the model's ``max_position_embeddings``
            minus ``max_new_tokens``. Longer prompts lose the middle of their context.
        use_chat_template: wrap the prompt as one user turn of the tokenizer's chat template;
            ``"auto"`` does so when the tokenizer has a chat template.
        limit: evaluate only the first ``limit`` records (quick checks).

    Returns:
        :class:`LongBenchResult`; ``result.mean_f1`` is the mean F1 in [0, 1].
    """
    if "{context}" not in prompt_template or "{input}" not in prompt_template:
        raise ValueError(
            "prompt_template must contain the placeholders {context} and {input}, got "
            f"{prompt_template[:80]!r}..."
        )
    if isinstance(path, (str, Path)):
        records = read_longbench_jsonl(path)
        source = str(path)
    else:
        records = [dict(r) for r in path]
        source = "records"
        for i, r in enumerate(records):
            missing = [k for k in LONGBENCH_REQUIRED if k not in r]
            if missing:
                raise ValueError(
                    f"record {i} is missing field(s) {missing}; LongBench records need {LONGBENCH_REQUIRED}"
                )
    if limit is not None:
        records = records[:limit]
    if not records:
        raise ValueError(
            "the LongBench evaluation set is empty (no records, or limit=0); nothing to evaluate"
        )
    if use_chat_template == "auto":
        use_chat_template = bool(getattr(tokenizer, "chat_template", None))
    if max_length is None:
        max_length = _default_max_length(model, max_new_tokens)

    prompts, truncated = [], []
    for record in records:
        ids, cut = build_longbench_prompt(
            tokenizer, record, prompt_template, max_length, bool(use_chat_template)
        )
        prompts.append(ids)
        truncated.append(cut)

    eos = eos_token_ids(model, tokenizer)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = min(eos) if eos else 0
    new_tokens = greedy_generate(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        eos_token_id=sorted(eos),
        batch_size=batch_size,
        pad_token_id=pad,
        progress=progress,
        desc="LongBench",
    )
    rows = []
    for i, (record, ids, cut, toks) in enumerate(zip(records, prompts, truncated, new_tokens)):
        output = tokenizer.decode(toks, skip_special_tokens=True).strip()
        score = qa_f1(output, record["answers"])
        rows.append(
            {
                "index": i,
                "_id": record.get("_id"),
                "dataset": record.get("dataset"),
                "length": record.get("length", len(ids)),
                "prompt_tokens": len(ids),
                "truncated": cut,
                "answers": list(record["answers"]),
                "output": output,
                "score": score,
            }
        )
    meta = {
        "source": source,
        "max_new_tokens": max_new_tokens,
        "max_length": max_length,
        "use_chat_template": bool(use_chat_template),
        "prompt_template": prompt_template,
    }
    return LongBenchResult(rows=rows, name=name, metric="qa_f1", meta=meta)
