"""``seal-peft analyze``: per-head retrieval attribution, perturbation check, learned scales (:mod:`seal_peft.analysis`)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from ..errors import SealUsageError
from ..models import resolve_dtype
from ._common import (
    _data_args,
    _dataset_from_args,
    _device_args,
    _int_at_least,
    _load_model,
    _log,
    _model_args,
    _number,
    _user_input,
)


def cmd_analyze(args) -> int:
    """Head attribution (+ perturbation check, + learned scales of an adapter): records and plots."""
    import torch

    from .. import analysis as an

    progress = not args.quiet
    if args.perturb_with_adapter and not args.adapter:
        raise SealUsageError(
            "--perturb-with-adapter needs --adapter ADAPTER_DIR (the adapter to perturb on top of)."
        )
    os.makedirs(args.out, exist_ok=True)
    # gradients and small log-likelihood differences: full precision unless asked otherwise
    model, tok = _load_model(args, torch.float32 if args.dtype == "auto" else resolve_dtype(args.dtype))
    ds = None
    if args.attribution:
        with _user_input(f"--attribution {args.attribution}", ValueError, OSError):
            attr = an.HeadAttribution.from_json(args.attribution)
        _log(f"[analyze] attribution read from {args.attribution}", args.quiet)
    else:
        ds = _dataset_from_args(args, tok, essays="eval")
        meta = {
            "model": args.model or "SmolLM2-135M-Instruct (embedded)",
            "data": args.data or f"{args.task}, {len(ds)} samples, lengths {args.lengths}, seed {args.seed}",
            "prompt_format": args.prompt_format,
        }
        attr = an.head_attribution(model, ds, tok, progress=progress, meta=meta)
        _log(f"[analyze] attribution of {len(ds)} samples took {attr.seconds:.1f} s", args.quiet)
    scales = None
    if args.adapter:
        with _user_input(f"--adapter {args.adapter}", ValueError, OSError):
            scales = an.learned_head_scales(model, args.adapter)
    summary: dict[str, Any] = {
        "attribution_seconds": round(attr.seconds, 1),
        "num_samples": attr.num_samples,
        "base_accuracy_teacher_forced": attr.accuracy,
        "base_answer_nll": float(attr.loss.mean()),
        "top_positive": [
            {"layer": layer, "head": h, "attribution": v}
            for layer, h, v in attr.ranked("positive")[: args.top]
        ],
        "top_negative": [
            {"layer": layer, "head": h, "attribution": v}
            for layer, h, v in attr.ranked("negative")[: args.top]
        ],
    }
    attr.to_json(os.path.join(args.out, "attribution.json"), scales)
    attr.to_csv(os.path.join(args.out, "heads.csv"), scales)
    an.plot_attribution(attr, os.path.join(args.out, "attribution.png"))
    if scales is not None:
        an.plot_scales(scales, os.path.join(args.out, "scales.png"))
        an.plot_scale_vs_attribution(attr, scales, os.path.join(args.out, "scale_vs_attribution.png"))
        summary["adapter"] = args.adapter
        summary["scale_correlation"] = an.scale_correlation(attr, scales)
    if args.perturb_top > 0 or args.check_heads > 0:
        if ds is None:
            ds = _dataset_from_args(args, tok, essays="eval")
        target = model
        if args.perturb_with_adapter:
            from ..loading import from_pretrained

            with _user_input(f"--adapter {args.adapter}", ValueError, OSError):
                target = from_pretrained(model, args.adapter)  # the probe multiplies on top of its scales
            summary["perturbed_model"] = f"base + adapter {args.adapter}"
        with _user_input("--perturb-top / --random-draws / --check-heads / --perturb-value", ValueError):
            res = an.top_vs_random(
                target,
                ds,
                attr,
                k=args.perturb_top,
                draws=args.random_draws,
                value=args.perturb_value,
                tokenizer=tok,
                seed=args.seed,
                single_heads=args.check_heads,
                progress=progress,
            )
        res.to_json(os.path.join(args.out, "perturbation.json"))
        res.to_csv(os.path.join(args.out, "perturbation.csv"))
        summary["perturbation"] = {"seconds": round(res.seconds, 1), "conditions": res.rows()}
        if args.check_heads:
            summary["agreement"] = an.attribution_agreement(attr, res)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)

    def heads(rows):
        return ", ".join(f"L{r['layer']}.H{r['head']} {r['attribution']:+.3f}" for r in rows)

    print(
        f"head attribution: {attr.num_samples} samples, {attr.seconds:.0f} s; teacher-forced accuracy "
        f"{attr.accuracy:.2f}"
    )
    print(f"top positive: {heads(summary['top_positive'])}")
    print(f"top negative: {heads(summary['top_negative'])}")
    if "scale_correlation" in summary:
        c = summary["scale_correlation"]
        print(
            f"learned {c['granularity']} scales vs attribution: Spearman {c['spearman']:+.2f}, "
            f"sign agreement {c['sign_agreement']:.2f} ({c['heads_moved']} heads moved)"
        )
    if "perturbation" in summary:
        print(res.table())
    if "agreement" in summary:
        print(f"attribution vs exact single-head effect: Spearman {summary['agreement']['spearman']:+.2f}")
    print(f"records and plots: {args.out}")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    a = sub.add_parser(
        "analyze", help="per-head retrieval attribution, perturbation check, learned scales: records + plots"
    )
    _model_args(a)
    _device_args(a)
    _data_args(a, samples=20, lengths="1024", seed=2000)
    a.add_argument("--adapter", default=None, help="a SEAL adapter folder whose learned scales to compare")
    a.add_argument(
        "--attribution",
        default=None,
        help="reuse an attribution.json of an earlier run instead of computing it",
    )
    a.add_argument("--top", type=_int_at_least(1), default=10, help="heads listed per direction (default 10)")
    a.add_argument(
        "--perturb-top",
        type=_int_at_least(0),
        default=5,
        help="perturb the top-k positive/negative heads as groups (0 = skip)",
    )
    a.add_argument(
        "--random-draws", type=_int_at_least(0), default=3, help="groups of k random heads to compare (default 3)"
    )
    a.add_argument("--perturb-value", type=_number, default=0.0, help="scale of perturbed heads (default 0)")
    a.add_argument(
        "--check-heads",
        type=_int_at_least(0),
        default=0,
        help="also perturb this many single heads; Spearman vs attribution",
    )
    a.add_argument(
        "--perturb-with-adapter",
        action="store_true",
        help="run the perturbation check on the model with --adapter loaded (a model that retrieves "
        "well, so the accuracy change is visible); the attribution stays that of the base model",
    )
    a.add_argument("--out", required=True, help="output folder")
    # attribution scores the NLL of the answer: pre-filled replies make that the number's tokens alone
    # (under longeval the reply also restates the key); docs/analysis.md was measured this way
    a.set_defaults(func=cmd_analyze, prompt_format="chat_prefill")
    return a
