"""How much of a SEAL-C adapter is per-head emphasis? Decompose its scales, write the two projections.

SEAL-H can only express one scale per head; SEAL-C one per channel. Writing each channel scale as
``s[l, h, c] = m[l, h] + r[l, h, c]`` with ``m`` the head's mean channel scale, the squared change
``sum (s - 1)^2`` splits exactly into a *between-heads* part ``head_dim * sum (m - 1)^2`` (what SEAL-H
could represent) and a *within-head* part ``sum r^2`` (what it cannot). The script prints both shares
and, with ``--write DIR``, saves two SEAL-C adapters that can be evaluated like any other:

- ``DIR/head-mean``: every channel set to its head's mean, i.e. the adapter's best SEAL-H projection;
- ``DIR/within``: the head means removed (``s - m + 1``): the within-head part alone.

Both keep the adapter's config; evaluate them with ``benchmarks/line_retrieval.py --adapter``::

    python benchmarks/scale_structure.py runs/le_c --write runs/le_c_proj \\
        --out results/line_retrieval/scale_structure_le_c.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

KINDS = ("head-mean", "within")


def _per_head(peft_model, adapter_name: str) -> list[tuple[torch.nn.Parameter, int]]:
    """Each SEAL-C scale parameter with its number of heads (the channels are head-major)."""
    from seal_peft.analysis import learned_head_scales
    from seal_peft.analysis._probe import layout_of

    grid = learned_head_scales(peft_model, adapter_name=adapter_name)
    if grid.granularity != "channel":
        raise ValueError(f"adapter {adapter_name!r} is SEAL-H already: only SEAL-C scales can be decomposed")
    _, modules = layout_of(peft_model, adapter_name)  # in the grid's row order
    return [(m.seal_scale[adapter_name], int(np.isfinite(row).sum())) for m, row in zip(modules, grid.mean)]


def decompose(peft_model, adapter_name: str = "default") -> dict:
    """Between-heads / within-head shares of a SEAL-C adapter's squared change from 1 (they sum to 1)."""
    between = within = 0.0
    mixed = heads_total = 0
    mean_lo, mean_hi = np.inf, -np.inf
    for param, n in _per_head(peft_model, adapter_name):
        s = param.detach().double().reshape(n, -1)
        m = s.mean(dim=1, keepdim=True)
        between += float(((m - 1) ** 2).sum() * s.shape[1])
        within += float(((s - m) ** 2).sum())
        mixed += int(((s > 1.1).any(dim=1) & (s < 0.9).any(dim=1)).sum())
        heads_total += n
        mean_lo, mean_hi = min(mean_lo, float(m.min())), max(mean_hi, float(m.max()))
    total = between + within
    return {
        "squared_change": total,
        "between_heads_share": between / total if total else 0.0,
        "within_head_share": within / total if total else 0.0,
        "heads": heads_total,
        "heads_with_channels_above_1.1_and_below_0.9": mixed,
        "head_mean_range": [mean_lo, mean_hi],
    }


@torch.no_grad()
def project(peft_model, kind: str, adapter_name: str = "default") -> None:
    """Replace the adapter's scales in place by their ``"head-mean"`` or ``"within"`` projection."""
    if kind not in KINDS:
        raise ValueError(f"unknown projection {kind!r}: choose one of {', '.join(KINDS)}")
    for param, n in _per_head(peft_model, adapter_name):
        s = param.detach().reshape(n, -1)
        m = s.mean(dim=1, keepdim=True)
        new = m.expand_as(s) if kind == "head-mean" else s - m + 1
        param.copy_(new.reshape(param.shape))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter", help="a saved SEAL-C adapter folder")
    p.add_argument("--model", default=None, help="its base model (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--write", default=None, help="save the two projections as DIR/head-mean and DIR/within")
    p.add_argument("--out", default=None, help="JSON file for the decomposition")
    args = p.parse_args(argv)

    import seal_peft
    from seal_peft.models import load_model

    model, _ = load_model(args.model)
    peft_model = seal_peft.from_pretrained(model, args.adapter)
    record = {"adapter": args.adapter, **decompose(peft_model)}
    if args.write:
        params = [param for param, _ in _per_head(peft_model, "default")]
        original = [param.detach().clone() for param in params]
        record["projections"] = {}
        for kind in KINDS:
            project(peft_model, kind)
            path = os.path.join(args.write, kind)
            peft_model.save_pretrained(path)
            record["projections"][kind] = {"path": path, **decompose(peft_model)}
            with torch.no_grad():
                for param, value in zip(params, original):
                    param.copy_(value)
    text = json.dumps(record, indent=1)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
