"""Perplexity on held-out text: the collateral-damage check for a tuned adapter.

The text is scored in windows of at most ``max_length`` tokens so memory stays bounded whatever
the text length. Every token except the first is predicted exactly once; each window predicts up
to ``stride`` new tokens and uses the tokens before them (up to the window size) as context. Only
the logits of the predicted positions are materialised (``logits_to_keep``), and the loss is
summed in float32, so the value equals exp(mean token NLL) of that scoring scheme exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models import accepts_logits_to_keep, input_device

__all__ = ["perplexity", "token_nll"]


def _to_ids(
    tokenizer: Any, text_or_ids: str | Sequence[int] | torch.Tensor, add_special_tokens: bool
) -> list[int]:
    if isinstance(text_or_ids, str):
        if tokenizer is None:
            raise ValueError("perplexity of a text needs a tokenizer; pass one or pass token ids instead")
        ids = tokenizer(text_or_ids, add_special_tokens=add_special_tokens)["input_ids"]
    elif isinstance(text_or_ids, torch.Tensor):
        if text_or_ids.dim() == 2 and text_or_ids.shape[0] == 1:
            text_or_ids = text_or_ids[0]
        if text_or_ids.dim() != 1:
            raise ValueError(f"token ids must be 1-D (or shape (1, n)), got shape {tuple(text_or_ids.shape)}")
        ids = text_or_ids.tolist()
    else:
        ids = list(text_or_ids)
        if ids and not isinstance(ids[0], int) and not hasattr(ids[0], "__index__"):
            raise TypeError(
                f"text_or_ids must be a string, a list of token ids or a 1-D tensor, got a list of "
                f"{type(ids[0]).__name__} (join several texts into one string first)"
            )
    return [int(t) for t in ids]


@torch.inference_mode()
def token_nll(
    model: torch.nn.Module,
    ids: Sequence[int],
    max_length: int = 2048,
    stride: int | None = None,
    progress: bool = False,
) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of ``ids[1:]`` and the number of predicted tokens.

    Windows: the first covers ``ids[:max_length]``; each later one predicts the next
    ``min(stride, max_length - 1)`` tokens with the preceding tokens as context, the whole window
    being at most ``max_length`` long. ``stride=None`` means non-overlapping windows (one token of
    overlap, so no token is skipped).
    """
    n = len(ids)
    if n < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {n}; pass a longer held-out text")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (one context token + one target), got {max_length}")
    step = max_length - 1 if stride is None else int(stride)
    if step < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    step = min(step, max_length - 1)

    device = input_device(model)
    use_ltk = accepts_logits_to_keep(model)
    ids_tensor = torch.tensor(list(ids), dtype=torch.long)
    total_nll, total_count = 0.0, 0

    spans = []
    t0, t1 = 1, min(max_length, n)  # first window: as much context as fits
    while t0 < n:
        spans.append((t0, t1))
        t0, t1 = t1, min(t1 + step, n)

    was_training = model.training
    model.eval()
    try:
        for t0, t1 in tqdm(spans, desc="perplexity", disable=not progress, unit="window"):
            w0 = max(0, t1 - max_length)
            window = ids_tensor[w0:t1][None].to(device)
            n_targets = t1 - t0
            kwargs: dict[str, Any] = {"use_cache": False}
            if use_ltk:
                kwargs["logits_to_keep"] = n_targets + 1
            logits = model(input_ids=window, **kwargs).logits[0]
            # the logits at absolute positions t0-1 .. t1-2 predict the targets t0 .. t1-1
            logits = logits[-(n_targets + 1) : -1].float()
            targets = ids_tensor[t0:t1].to(logits.device)
            total_nll += F.cross_entropy(logits, targets, reduction="sum").item()
            total_count += n_targets
    finally:
        model.train(was_training)
    return total_nll, total_count


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    text_or_ids: str | Sequence[int] | torch.Tensor,
    max_length: int = 2048,
    stride: int | None = None,
    add_special_tokens: bool = True,
    progress: bool = False,
) -> float:
    """exp(mean NLL) of a held-out text (or token ids) under ``model``.

    Args:
        model: causal LM or ``PeftModel`` (compare with ``with model.disable_adapter():`` to see
            the adapter's collateral damage).
        tokenizer: tokenizes ``text_or_ids`` when it is a string (may be None for ids).
        max_length: window size in tokens; memory is bounded by one window.
        stride: new tokens predicted per window after the first; smaller = more context per token
            and more compute. ``None``: non-overlapping windows.
        add_special_tokens: let the tokenizer add BOS etc. to a string.
    """
    ids = _to_ids(tokenizer, text_or_ids, add_special_tokens)
    nll, count = token_nll(model, ids, max_length=max_length, stride=stride, progress=progress)
    return math.exp(nll / count)
