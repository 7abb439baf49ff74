"""Shared fixtures of the fast test tier: tiny randomly initialised models (seconds each) and a
character-level tokenizer."""

from __future__ import annotations

import os
import string

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import seal_peft  # noqa: E402,F401  (registers SEAL with PEFT)

VOCAB = 96
L = 2  # layers of every tiny model


def tiny_config(arch: str):
    """A tiny config of ``arch`` with 4 query heads per layer; returns (config, num_heads, head_dim)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, num_hidden_layers=L, num_attention_heads=4, max_position_embeddings=128)
    llama_like = dict(common, hidden_size=32, intermediate_size=64, tie_word_embeddings=False)
    if arch == "llama":
        return tf.LlamaConfig(**llama_like, num_key_value_heads=4), 4, 8
    if arch == "mistral":  # grouped-query attention: 4 query heads, 2 kv heads
        return tf.MistralConfig(**llama_like, num_key_value_heads=2, sliding_window=None), 4, 8
    if arch == "mixtral":
        return (
            tf.MixtralConfig(**llama_like, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1),
            4,
            8,
        )
    if arch == "qwen2":
        return tf.Qwen2Config(**llama_like, num_key_value_heads=2), 4, 8
    if arch == "qwen3":
        return tf.Qwen3Config(**llama_like, num_key_value_heads=2, head_dim=8), 4, 8
    if arch == "gemma":
        return tf.GemmaConfig(**llama_like, num_key_value_heads=1, head_dim=8), 4, 8
    if arch == "gemma2":
        return tf.Gemma2Config(**llama_like, num_key_value_heads=2, head_dim=8), 4, 8
    if arch == "gemma3":  # head_dim (16) != hidden / heads (8)
        return tf.Gemma3TextConfig(**llama_like, num_key_value_heads=2, head_dim=16, sliding_window=16), 4, 16
    if arch == "phi3":
        return tf.Phi3Config(**llama_like, num_key_value_heads=4, pad_token_id=0), 4, 8
    if arch == "starcoder2":
        return tf.Starcoder2Config(**llama_like, num_key_value_heads=2), 4, 8
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(**llama_like, hidden_act="gelu"), 4, 8
    if arch == "falcon":
        cfg = tf.FalconConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=L,
            num_attention_heads=4,
            new_decoder_architecture=False,
        )
        return cfg, 4, 8
    if arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=L, n_head=4, n_positions=128)
        return cfg, 4, 8
    raise KeyError(arch)


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a fresh module (the scripts are not a package)."""
    import importlib.util

    path = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", f"{name}.py"
    )
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    config, _, _ = tiny_config(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


CORE_ARCHS = ["llama", "mistral", "qwen2", "gemma3", "gpt_neox", "gpt2"]
ALL_ARCHS = CORE_ARCHS + ["mixtral", "qwen3", "gemma", "gemma2", "phi3", "starcoder2", "falcon"]


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, VOCAB, (2, 12), generator=g)


def make_char_tokenizer(bos: bool = True):
    """A fast tokenizer with one token per printable character (BPE without merges), no chat template;
    ``bos=True`` adds BOS with the post-processor, as Llama tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(string.printable[:95]) + ["\n"])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    if bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="session")
def char_tokenizer():
    """One token per character, BOS added by the post-processor, no chat template."""
    return make_char_tokenizer()
