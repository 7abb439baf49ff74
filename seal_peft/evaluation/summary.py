"""One evaluation run as the CLI reports it: retrieval accuracy by length plus held-out perplexity."""

from __future__ import annotations

import os

from .perplexity import perplexity
from .results import evaluate_retrieval


def evaluate_model(model, tok, eval_ds, lengths, name, out_dir=None, ppl_tokens=2048, progress=True) -> dict:
    """Retrieval accuracy by length + held-out perplexity; writes records when ``out_dir`` is given."""
    from ..data import heldout_text

    result = evaluate_retrieval(
        model, tok, eval_ds, progress=progress, name=name, length_bins=lengths
    )
    summary = {"name": name, "accuracy": result.accuracy, "by_length": result.accuracy_by_length(lengths)}
    if ppl_tokens:
        summary["ppl"] = perplexity(model, tok, heldout_text(tok, ppl_tokens, seed=0), max_length=ppl_tokens)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        result.to_json(os.path.join(out_dir, f"{name}.json"))
        result.to_csv(os.path.join(out_dir, f"{name}.csv"))
    summary["result"] = result
    return summary
