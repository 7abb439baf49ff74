"""Zero-shot synthetic retrieval data for training and evaluating SEAL (the paper's recipe).

Every generator returns a ``datasets.Dataset`` with the columns

``input_ids, attention_mask, labels, prompt_length, task, length, depth, key, answer, target``

where ``labels`` is -100 everywhere except the supervised answer tokens, ``input_ids[:prompt_length]``
is the prompt a model is given at evaluation time and ``target`` is the decoded supervised text.
Lengths are counted in tokens of the given tokenizer. See ``docs/data.md``.
"""

from __future__ import annotations

from ._common import COLUMNS, LENGTH_TOLERANCE, PROMPT_FORMATS, PromptEncoder, check_disjoint
from .haystack import NEEDLES, essay_dir, heldout_text, load_essays, needle_haystack
from .retrieval import MAX_VALUE, kv_retrieval, line_retrieval, load_words
from .templates import DEFAULT_TEMPLATE, user_template

__all__ = [
    "COLUMNS",
    "DEFAULT_TEMPLATE",
    "LENGTH_TOLERANCE",
    "MAX_VALUE",
    "NEEDLES",
    "PROMPT_FORMATS",
    "PromptEncoder",
    "check_disjoint",
    "essay_dir",
    "heldout_text",
    "kv_retrieval",
    "line_retrieval",
    "load_essays",
    "load_words",
    "needle_haystack",
    "user_template",
]
