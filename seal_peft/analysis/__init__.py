"""Head-retrieval attribution: which attention heads carry long-context retrieval, and what SEAL learned.

- :func:`head_attribution`: ``-dLoss/ds`` of every head's SEAL-H scale at 1.0 on generated retrieval
  data, one forward + backward per sample (a SEAL-H *probe* adapter; nothing is monkey-patched).
- :func:`perturb_heads` / :func:`top_vs_random`: exact perturbation (heads scaled to 0 or 1.5 in
  place) with the change in answer log-likelihood and teacher-forced accuracy;
  :func:`attribution_agreement`: Spearman between the two.
- :func:`learned_head_scales` / :func:`scale_correlation`: a saved SEAL-H or SEAL-C adapter as a
  layer x head grid, and its rank correlation with the attribution.
- :func:`plot_attribution`, :func:`plot_scales`, :func:`plot_scale_vs_attribution`: PNGs.
- :func:`select_heads`, :func:`selection_config`, :func:`restrict_to_heads`,
  :func:`init_from_attribution`: train only the top-k heads or start the scales from the attribution.

See ``docs/analysis.md``; ``seal-peft analyze`` runs it all from the command line.
"""

from __future__ import annotations

from .attribution import HeadAttribution, head_attribution, spearman
from .perturbation import (
    PerturbationResult,
    answer_scores,
    attribution_agreement,
    head_name,
    perturb_heads,
    random_heads,
    top_vs_random,
)
from .plots import plot_attribution, plot_head_map, plot_scale_vs_attribution, plot_scales
from .scales import HeadScales, learned_head_scales, scale_correlation
from .selection import HeadMask, init_from_attribution, restrict_to_heads, select_heads, selection_config

__all__ = [
    "HeadAttribution",
    "head_attribution",
    "spearman",
    "PerturbationResult",
    "perturb_heads",
    "answer_scores",
    "top_vs_random",
    "random_heads",
    "attribution_agreement",
    "head_name",
    "HeadScales",
    "learned_head_scales",
    "scale_correlation",
    "plot_head_map",
    "plot_attribution",
    "plot_scales",
    "plot_scale_vs_attribution",
    "select_heads",
    "selection_config",
    "restrict_to_heads",
    "HeadMask",
    "init_from_attribution",
]
