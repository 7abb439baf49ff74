"""Generation-based evaluation of long-context retrieval (and the checks around it).

- :func:`generate_answers` / :func:`greedy_generate`: greedy decoding with a logits-trimmed
  prefill, KV-cached decode and early stop once the answer is complete.
- Scorers: :func:`score_line_retrieval` (first-integer rule), :func:`contains_answer`,
  :func:`exact_match`, :func:`qa_f1` (LongBench).
- :func:`evaluate_retrieval` -> :class:`EvalResult` (rows, accuracy by length/depth, JSON/CSV/table).
- :func:`needle_grid`, :func:`plot_heatmap`, :func:`plot_accuracy_vs_length`: NIAH grids and PNGs.
- :func:`perplexity`: windowed held-out perplexity (collateral-damage check).
- :func:`read_longbench_jsonl`, :func:`evaluate_longbench`: LongBench-format QA with F1.
"""

from __future__ import annotations

from .generation import generate_answers, greedy_generate, is_numeric_answer, numeric_answer_complete
from .longbench import (
    DEFAULT_PROMPT_TEMPLATE,
    LongBenchResult,
    build_longbench_prompt,
    evaluate_longbench,
    read_longbench_jsonl,
)
from .perplexity import perplexity, token_nll
from .plots import NeedleGrid, needle_grid, plot_accuracy_vs_length, plot_heatmap
from .results import EvalResult, evaluate_retrieval, score_records
from .scoring import (
    SCORERS,
    contains_answer,
    exact_match,
    first_integer,
    first_integer_match,
    get_scorer,
    last_integer,
    last_integer_match,
    normalize_answer,
    qa_f1,
    score_line_retrieval,
)
from .summary import evaluate_model

__all__ = [
    "generate_answers",
    "greedy_generate",
    "is_numeric_answer",
    "numeric_answer_complete",
    "SCORERS",
    "get_scorer",
    "normalize_answer",
    "first_integer",
    "first_integer_match",
    "last_integer",
    "last_integer_match",
    "score_line_retrieval",
    "exact_match",
    "contains_answer",
    "qa_f1",
    "score_records",
    "EvalResult",
    "evaluate_model",
    "evaluate_retrieval",
    "NeedleGrid",
    "needle_grid",
    "plot_heatmap",
    "plot_accuracy_vs_length",
    "perplexity",
    "token_nll",
    "DEFAULT_PROMPT_TEMPLATE",
    "LongBenchResult",
    "read_longbench_jsonl",
    "build_longbench_prompt",
    "evaluate_longbench",
]
