"""Does head attribution help SEAL training? Ones-init vs top-k heads only vs attribution-init.

Same training data, recipe and evaluation for every variant:

- ``ones``: SEAL-H on all heads, scales start at 1 (the paper's setting).
- ``topk``: SEAL-H on the ``--k`` heads of largest |attribution| only (``selection_config`` +
  ``restrict_to_heads``); every other head stays at 1.
- ``init``: SEAL-H on all heads, scales start at ``1 + max_change * a / max|a|``
  (``init_from_attribution``).
- ``ones_more``: control for ``init``/``topk``, which also use the attribution samples: ones-init
  trained on the attribution samples followed by the training samples.
- ``base``: the model without SEAL, for reference.

Evaluation: answer NLL and teacher-forced accuracy (``answer_scores``, one forward per sample; with
``--generate`` also greedy-generation accuracy with ``evaluate_retrieval``) on held-out line
retrieval data that shares no key or value with the training or attribution data. Prints and writes
one JSON record; docs/analysis.md quotes it:

    python benchmarks/attribution.py --attribution runs/analysis/smollm2/attribution.json \\
        --out runs/analysis/selection.json --save-adapters runs/analysis/adapters

The attribution file comes from ``seal-peft analyze`` (its data seed, 2000 by default, is the one
``--attr-seed`` must name so that the evaluation set excludes it); without ``--attribution`` it is
computed here on ``--attr-samples`` samples.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch


def _loss_curve(trainer) -> list[float]:
    return [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF id/path; default: embedded SmolLM2-135M-Instruct")
    p.add_argument("--attribution", default=None, help="attribution.json from `seal-peft analyze`")
    p.add_argument("--attr-samples", type=int, default=20)
    p.add_argument("--attr-length", type=int, default=1024)
    p.add_argument("--attr-seed", type=int, default=2000)
    p.add_argument(
        "--variants", default="ones,topk,init", help="comma-separated: ones, ones_more, topk, init"
    )
    p.add_argument("--k", type=int, default=27, help="heads trained by the topk variant (default 27 = 10%%)")
    p.add_argument("--by", default="abs", choices=["abs", "positive", "negative"])
    p.add_argument("--max-change", type=float, default=0.1, help="init variant: largest |s - 1| at start")
    from seal_peft.training import RECIPES

    p.add_argument("--lr", type=float, default=RECIPES["paper"]["head"].learning_rate, help="default: the paper's")
    p.add_argument("--train-samples", type=int, default=20)
    p.add_argument("--train-length", type=int, default=512)
    p.add_argument("--eval-samples", type=int, default=20)
    p.add_argument("--eval-length", type=int, default=1024)
    p.add_argument("--eval-seed", type=int, default=1000)
    p.add_argument("--generate", action="store_true", help="also greedy-generation accuracy (slower)")
    p.add_argument("--no-base", action="store_true", help="skip evaluating the base model")
    p.add_argument("--seed", type=int, default=0, help="training data and trainer seed")
    p.add_argument("--out", default=None)
    p.add_argument("--save-adapters", default=None, help="folder to save each variant's adapter in")
    args = p.parse_args(argv)

    from peft import get_peft_model

    from seal_peft import SealConfig
    from seal_peft.analysis import (
        HeadAttribution,
        answer_scores,
        head_attribution,
        init_from_attribution,
        learned_head_scales,
        restrict_to_heads,
        scale_correlation,
        select_heads,
        selection_config,
    )
    from seal_peft.data import line_retrieval
    from seal_peft.models import load_model
    from seal_peft.training import train_seal

    torch.manual_seed(args.seed)
    model, tok = load_model(args.model)
    fmt = "chat_prefill"
    attr_ds = line_retrieval(
        tok, args.attr_samples, args.attr_length, prompt_format=fmt, seed=args.attr_seed, progress=False
    )
    if args.attribution:
        attr = HeadAttribution.from_json(args.attribution)
    else:
        attr = head_attribution(model, attr_ds, tok)
    train_ds = line_retrieval(
        tok, args.train_samples, args.train_length, prompt_format=fmt, seed=args.seed, progress=False
    )
    eval_ds = line_retrieval(
        tok,
        args.eval_samples,
        args.eval_length,
        prompt_format=fmt,
        seed=args.eval_seed,
        exclude=[train_ds, attr_ds],
        progress=False,
    )
    record: dict = {"args": vars(args), "attribution_seconds": round(attr.seconds, 1), "variants": {}}

    def evaluate(m, name: str) -> dict:
        t0 = time.time()
        s = answer_scores(m, eval_ds, tok, progress=False)
        out = {"answer_nll": round(s["answer_nll"], 4), "accuracy_teacher_forced": s["accuracy"]}
        if args.generate:
            from seal_peft.evaluation import evaluate_retrieval

            out["accuracy_generated"] = evaluate_retrieval(
                m, tok, eval_ds, max_new_tokens=16, progress=False
            ).accuracy
        out["eval_seconds"] = round(time.time() - t0, 1)
        print(f"[{name}] {out}", file=sys.stderr, flush=True)
        return out

    if not args.no_base:
        record["variants"]["base"] = evaluate(model, "base")
    for variant in args.variants.split(","):
        base, _ = load_model(args.model)
        mask = None
        data = train_ds
        if variant in ("ones", "ones_more"):
            peft_model = get_peft_model(base, SealConfig(granularity="head"))
            if variant == "ones_more":  # control: the attribution samples used as training data instead
                from datasets import concatenate_datasets

                data = concatenate_datasets([attr_ds, train_ds])
        elif variant == "topk":
            heads = select_heads(attr, args.k, by=args.by)
            peft_model = get_peft_model(base, selection_config(heads))
            mask = restrict_to_heads(peft_model, heads)
        elif variant == "init":
            peft_model = get_peft_model(base, SealConfig(granularity="head"))
            init_from_attribution(peft_model, attr, max_change=args.max_change)
        else:
            raise SystemExit(f"unknown variant {variant!r}; use ones, ones_more, topk, init")
        start = {"init": evaluate(peft_model, f"{variant}@start")} if variant == "init" else {}
        t0 = time.time()
        trainer = train_seal(
            peft_model,
            tok,
            data,
            f"/tmp/seal_attr_bench_{variant}",
            granularity="head",
            learning_rate=args.lr,
            seed=args.seed,
            progress=False,
            logging_strategy="steps",  # progress=False turns logging off; the loss curve needs it
            logging_steps=1,
        )
        train_seconds = round(time.time() - t0, 1)
        if mask is not None:
            mask.remove()
        curve = _loss_curve(trainer)
        if not curve:
            raise RuntimeError("no training loss was logged; the loss-curve summary would be empty")
        half = max(1, len(curve) // 2)
        result = {
            "train_seconds": train_seconds,
            "trainable_scales": sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
            "train_loss_first_half": round(float(np.mean(curve[:half])), 4),
            "train_loss_second_half": round(float(np.mean(curve[half:])), 4),
            "train_loss_curve": curve,
            **({"at_start": start["init"]} if start else {}),
            **evaluate(peft_model, variant),
        }
        scales = learned_head_scales(peft_model)
        result["scale_correlation"] = scale_correlation(attr, scales)
        moved = np.abs(scales.mean - 1.0)
        result["scales"] = {
            "max_abs_change": float(np.nanmax(moved)),
            "mean_abs_change": float(np.nanmean(moved)),
        }
        if args.save_adapters:
            peft_model.save_pretrained(os.path.join(args.save_adapters, f"seal-h-{variant}"))
        record["variants"][variant] = result
        del peft_model, base, trainer
    print(json.dumps({k: v for k, v in record.items() if k != "args"}, indent=1), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
