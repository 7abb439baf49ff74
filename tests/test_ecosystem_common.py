"""A tiny saved checkpoint (model + byte-level tokenizer) for the ecosystem tests, which need a folder
that `from_pretrained`, `accelerate launch`, `seal-peft merge` and lm-eval can open like a Hub model."""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "line 12: REGISTER_CONTENT is <8841>",
    "What is the REGISTER_CONTENT in line 7? The REGISTER_CONTENT in line 7 is 31245.",
    "The quick brown fox jumps over the lazy dog. 0123456789 abcdefghijklmnopqrstuvwxyz",
    "Question: Answer: yes no true false A B C D",
] * 4


def tiny_tokenizer():
    """A byte-level BPE tokenizer (~300 tokens) trained in milliseconds; encodes any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|end|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """Save a 2-layer Llama (4 heads of 8) and its tokenizer to ``path``; return ``path``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


def test_tiny_checkpoint_roundtrip(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_checkpoint(tmp_path / "tiny")
    tok = AutoTokenizer.from_pretrained(path)
    text = "line 3: REGISTER_CONTENT is <42> ünïcode"
    assert tok.decode(tok(text)["input_ids"]) == text
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.vocab_size == len(tok) and model.config.num_hidden_layers == 2
