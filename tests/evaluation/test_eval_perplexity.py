"""Windowed perplexity equals a manual cross-entropy computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seal_peft.evaluation import perplexity, token_nll

IDS = [1] + [(7 * i + 3) % 90 + 4 for i in range(39)]  # 40 tokens


def manual_nll(model, ids, windows):
    """Sum of CE over explicit (window_start, first_target, end) triples, full logits, no tricks."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w0, t0, t1 in windows:
            logits = model(input_ids=torch.tensor([ids[w0:t1]]), use_cache=False).logits[0].double()
            # logits at window position p - w0 - 1 predict token p
            pred = logits[t0 - w0 - 1 : t1 - w0 - 1]
            total += F.cross_entropy(pred, torch.tensor(ids[t0:t1]), reduction="sum").item()
            count += t1 - t0
    return total, count


def test_single_window_equals_full_cross_entropy(tiny_llama):
    with torch.no_grad():
        logits = tiny_llama(input_ids=torch.tensor([IDS])).logits[0].double()
    expected = math.exp(F.cross_entropy(logits[:-1], torch.tensor(IDS[1:])).item())
    assert perplexity(tiny_llama, None, IDS) == pytest.approx(expected, rel=1e-5)
    assert perplexity(tiny_llama, None, torch.tensor([IDS])) == pytest.approx(expected, rel=1e-5)


def test_non_overlapping_windows(tiny_llama):
    # max_length 16: targets 1..15 in [0,16), 16..30 in [15,31), 31..39 in [24,40) (a full window)
    nll, count = token_nll(tiny_llama, IDS, max_length=16)
    exp_nll, exp_count = manual_nll(tiny_llama, IDS, [(0, 1, 16), (15, 16, 31), (24, 31, 40)])
    assert count == exp_count == 39
    assert nll == pytest.approx(exp_nll, rel=1e-5)


def test_strided_windows(tiny_llama):
    # max_length 16, stride 10: first [0,16); then targets 16..25 with window [10,26); 26..35 in [20,36); 36..39
    nll, count = token_nll(tiny_llama, IDS, max_length=16, stride=10)
    exp_nll, exp_count = manual_nll(tiny_llama, IDS, [(0, 1, 16), (10, 16, 26), (20, 26, 36), (24, 36, 40)])
    assert count == exp_count == 39
    assert nll == pytest.approx(exp_nll, rel=1e-5)
    assert perplexity(tiny_llama, None, IDS, max_length=16, stride=10) == pytest.approx(
        math.exp(exp_nll / 39), rel=1e-5
    )


def test_text_input_uses_the_tokenizer(tiny_llama, char_tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    ids = char_tokenizer(text)["input_ids"]
    assert ids[0] == char_tokenizer.bos_token_id
    assert perplexity(tiny_llama, char_tokenizer, text) == pytest.approx(perplexity(tiny_llama, None, ids))


def test_perplexity_errors(tiny_llama):
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(tiny_llama, None, [1])
    with pytest.raises(ValueError, match="needs a tokenizer"):
        perplexity(tiny_llama, None, "text")
    with pytest.raises(ValueError, match="max_length"):
        perplexity(tiny_llama, None, IDS, max_length=1)
    with pytest.raises(TypeError, match="join several texts"):
        perplexity(tiny_llama, None, ["a", "b"])
