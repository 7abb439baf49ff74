"""Fixtures for the evaluation tests: a tiny random Llama, a scripted LM (the character tokenizer
``char_tokenizer`` is shared, in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch


def make_tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    # sharpen the random logits so greedy choices are far from ties (cache vs no-cache stays exact)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_llama(char_tokenizer):
    return make_tiny_llama(len(char_tokenizer))


@pytest.fixture
def tiny_llama_factory(char_tokenizer):
    """``tiny_llama_factory(seed)``: a fresh tiny Llama (for tests that wrap or modify it)."""
    return lambda seed=0: make_tiny_llama(len(char_tokenizer), seed)


def _naive_greedy(model, prompt, max_new_tokens):
    """Reference decoding: recompute the whole sequence every step, no cache, full logits."""
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits
            token = int(logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
    return out


@pytest.fixture(scope="session")
def naive_greedy():
    return _naive_greedy


class ScriptedLM(torch.nn.Module):
    """A fake causal LM that emits a fixed token script per prompt (deterministic outputs).

    ``script_for(prompt_ids) -> list[int]``; after the script it emits ``eos_id``. The "KV cache" is
    the per-row position in the script. Records every call's keyword arguments in ``calls``.
    """

    def __init__(self, script_for: Callable[[list[int]], list[int]], vocab_size: int, eos_id: int):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.script_for = script_for
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.calls: list[dict] = []

    def forward(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ):
        self.calls.append(
            {
                "shape": tuple(input_ids.shape),
                "logits_to_keep": logits_to_keep,
                "cached": past_key_values is not None,
            }
        )
        batch = input_ids.shape[0]
        if past_key_values is None:
            state = []
            for row in range(batch):
                ids = input_ids[row]
                if attention_mask is not None:
                    ids = ids[attention_mask[row].bool()]
                state.append({"script": list(self.script_for(ids.tolist())), "step": 0})
        else:
            state = past_key_values
        logits = torch.full((batch, 1, self.vocab_size), -1e4)
        for row, st in enumerate(state):
            token = st["script"][st["step"]] if st["step"] < len(st["script"]) else self.eos_id
            logits[row, 0, token] = 0.0
            st["step"] += 1
        return SimpleNamespace(logits=logits, past_key_values=state)


@pytest.fixture
def scripted(char_tokenizer):
    """``scripted({prompt_text: output_text}, default="")`` -> ScriptedLM keyed by prompt text."""

    def build(mapping: dict[str, str] | None = None, default: str = "") -> ScriptedLM:
        mapping = mapping or {}

        def script_for(ids: list[int]) -> list[int]:
            text = char_tokenizer.decode(ids, skip_special_tokens=True)
            out = mapping.get(text, default)
            return char_tokenizer(out, add_special_tokens=False)["input_ids"]

        return ScriptedLM(script_for, len(char_tokenizer), char_tokenizer.eos_token_id)

    return build


def _make_record(tokenizer, prompt: str, target: str, answer: str, **meta) -> dict:
    p = tokenizer(prompt)["input_ids"]
    t = tokenizer(target, add_special_tokens=False)["input_ids"]
    ids = p + t
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "labels": [-100] * len(p) + t,
        "prompt_length": len(p),
        "answer": answer,
        "target": target,
        "task": meta.pop("task", "line_retrieval"),
        "length": meta.pop("length", len(ids)),
        "depth": meta.pop("depth", 0.5),
        "key": meta.pop("key", "k"),
        **meta,
    }


@pytest.fixture
def make_record(char_tokenizer):
    """``make_record(prompt, target, answer, **meta)``: a record shaped like seal_peft.data's output."""

    def build(prompt: str, target: str, answer: str, **meta) -> dict:
        return _make_record(char_tokenizer, prompt, target, answer, **meta)

    return build
