"""The evaluator's answers through transformers' ``model.generate``: the reference of the custom loop.

:func:`generate_answers_hf` decodes the same records as :func:`~seal_peft.evaluation.generate_answers`
with ``model.generate`` (greedy, one record at a time, no logits processors), applying the same
per-record new-token caps and stop rules through a ``StoppingCriteria``. The tests require both to
give identical tokens; ``benchmarks/eval_throughput.py`` times both (the custom loop is kept because
it is the faster of the two there, see docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from ..models import input_device
from .generation import AnswerPlan, StopRule, answer_plan, eos_token_ids

__all__ = ["generate_answers_hf", "generate_answer_tokens_hf"]


class _PlanStop(StoppingCriteria):
    """Stop record ``index`` when the plan says so (cap or stop rule); EOS is left to ``generate``."""

    def __init__(self, stop, index: int, prompt_length: int, eos_ids: set[int]) -> None:
        self.stop, self.index, self.prompt_length, self.eos_ids = stop, index, prompt_length, eos_ids

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.BoolTensor:
        tokens = input_ids[0, self.prompt_length :].tolist()
        done = bool(tokens) and tokens[-1] not in self.eos_ids and self.stop(self.index, tokens)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def generate_answer_tokens_hf(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: Any,
    max_new_tokens: int | None = None,
    stop_rule: str | StopRule | None = "auto",
    progress: bool = True,
) -> list[list[int]]:
    """The new token ids per record (EOS dropped), decoded by ``model.generate``; see the module doc."""
    plan = answer_plan(tokenizer, dataset, max_new_tokens, stop_rule, eos_token_ids(model, tokenizer))
    return _generate_hf(model, plan, progress)


def generate_answers_hf(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: Any,
    max_new_tokens: int | None = None,
    stop_rule: str | StopRule | None = "auto",
    progress: bool = True,
) -> list[str]:
    """:func:`~seal_peft.evaluation.generate_answers`'s answers computed with ``model.generate``."""
    plan = answer_plan(tokenizer, dataset, max_new_tokens, stop_rule, eos_token_ids(model, tokenizer))
    return [plan.decode(t).strip() for t in _generate_hf(model, plan, progress)]


@torch.inference_mode()
def _generate_hf(model: torch.nn.Module, plan: AnswerPlan, progress: bool) -> list[list[int]]:
    device = input_device(model)
    eos = sorted(plan.eos_ids)
    results: list[list[int]] = []
    was_training = model.training
    model.eval()
    try:
        for i, prompt in enumerate(
            tqdm(plan.prompts, desc="generating", disable=not progress, unit="prompt")
        ):
            ids = torch.tensor([prompt], dtype=torch.long, device=device)
            config = GenerationConfig(
                do_sample=False,
                max_new_tokens=plan.caps[i],
                eos_token_id=eos or None,
                pad_token_id=plan.pad_token_id,
                use_cache=True,
            )
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                generation_config=config,
                stopping_criteria=StoppingCriteriaList([_PlanStop(plan.stop, i, len(prompt), plan.eos_ids)]),
            )
            tokens = out[0, len(prompt) :].tolist()
            if tokens and tokens[-1] in plan.eos_ids:
                tokens = tokens[:-1]
            results.append(tokens)
    finally:
        model.train(was_training)
    return results
