"""Training SEAL with TRL's ``SFTTrainer``.

``SFTTrainer`` needs no adaptation for SEAL: ``SFTTrainer(model, peft_config=SealConfig(...), ...)`` wraps the
model with ``get_peft_model`` like any PEFT method, and trains and saves only the scales. What is SEAL-specific
is the configuration — TRL's ``SFTConfig`` defaults are made for fine-tuning weights, and three of them work
against SEAL (the first one silently):

- ``max_length=1024`` truncates every sample to its first 1024 tokens; SEAL samples are long-context prompts
  whose answer is at the *end*, so a longer sample loses its answer and TRL then drops it (no error, the
  dataset just shrinks);
- ``learning_rate=2e-5`` hardly moves scales that start at 1 (the paper uses 1e-2 / 2e-2);
- ``bf16=True`` (mixed precision; on a CPU without native bf16 instructions several times slower than fp32) and
  gradient checkpointing on (an extra forward per step).

:func:`sft_config` is ``SFTConfig`` with the recipe of :func:`seal_peft.training.seal_training_arguments`
(AdamW, constant learning rate, no weight decay, fp32, no checkpointing) and ``max_length=None``.

The data: the generators' records (``seal_peft.data``) carry ``input_ids`` and ``labels`` with the prompt masked
to -100; ``SFTTrainer`` uses such a pre-tokenized dataset as it is (its collator pads ``labels`` with -100), so
the loss is on the answer only. :func:`prompt_completion` turns the same records into TRL's text
``prompt`` / ``completion`` format, for TRL's own completion-only masking.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..training import seal_training_arguments


def sft_config(output_dir: str, granularity: str = "head", *, max_length: int | None = None, **overrides: Any):
    """``trl.SFTConfig`` for SEAL: :func:`~seal_peft.training.seal_training_arguments`'s recipe (the paper's
    learning rate for ``granularity`` unless ``learning_rate=`` is given) with ``max_length=None`` (no
    truncation). ``overrides`` may be any ``TrainingArguments`` or ``SFTConfig`` field."""
    from transformers import TrainingArguments
    from trl import SFTConfig

    sft_names = {f.name for f in dataclasses.fields(SFTConfig) if f.init}
    ta_names = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    unknown = sorted(set(overrides) - sft_names)
    if unknown:
        raise TypeError(
            f"sft_config: {', '.join(map(repr, unknown))} is not a field of trl.SFTConfig "
            f"(TrainingArguments + TRL's SFT options); check the spelling."
        )
    sft_only = {k: overrides.pop(k) for k in list(overrides) if k not in ta_names}
    args = seal_training_arguments(output_dir, granularity, **overrides)
    fields = args.to_dict()
    fields["hub_token"] = args.hub_token  # to_dict hides it
    return SFTConfig(**fields, max_length=max_length, **sft_only)


def prompt_completion(dataset: Any, tokenizer: Any):
    """The records of a ``seal_peft.data`` generator as TRL's text ``prompt`` / ``completion`` dataset.

    ``prompt`` is the decoded prompt (``input_ids[:prompt_length]``, special tokens and chat template
    included), ``completion`` the decoded supervised text (``target``: the answer and the end-of-turn
    token). ``SFTTrainer`` tokenizes both and masks the prompt itself (``completion_only_loss``, on by
    default for this format). Tokens the chat template puts after the end-of-turn token (SmolLM2: a
    newline, label -100 in the records) are not part of either. Other columns are dropped.
    """
    missing = [c for c in ("input_ids", "prompt_length", "target") if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"prompt_completion: the dataset has no {', '.join(missing)} column; pass the records of a "
            f"seal_peft.data generator (line_retrieval, kv_retrieval, needle_haystack, user_template)."
        )

    def convert(record: dict) -> dict:
        prompt = tokenizer.decode(record["input_ids"][: record["prompt_length"]], skip_special_tokens=False)
        return {"prompt": prompt, "completion": record["target"]}

    return dataset.map(convert, remove_columns=dataset.column_names)
