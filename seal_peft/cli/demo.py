"""``seal-peft demo``: the whole loop on the embedded model (base eval, train SEAL-H/C, eval, merge)."""

from __future__ import annotations

import argparse
import json
import os
import time

from ..evaluation.summary import evaluate_model
from ..models import resolve_dtype
from ..training import train_variant
from ._common import (
    _device_args,
    _generate,
    _granularities,
    _int_at_least,
    _ints_at_least,
    _load_model,
    _log,
    _model_args,
    _recipe_arg,
    _recipe_name,
    _table,
)


def cmd_demo(args) -> int:
    """Base eval -> train SEAL-H and SEAL-C -> eval -> merged == unmerged -> save, with a table."""
    import torch

    from ..evaluation import plot_accuracy_vs_length
    from ..loading import from_pretrained
    from ..models import input_device
    from ..training import get_recipe

    t_start = time.time()
    progress = not args.quiet
    dtype = resolve_dtype(args.dtype)
    os.makedirs(args.out, exist_ok=True)
    model, tok = _load_model(args, dtype)
    where = f"device map {args.device_map}" if args.device_map else str(input_device(model))
    _log(
        f"[demo] model: {args.model or 'embedded SmolLM2-135M-Instruct'} ({str(dtype).replace('torch.', '')}, "
        f"{where}); "
        f"output: {args.out}",
        args.quiet,
    )
    train_ds = _generate(
        tok,
        "line",
        args.train_samples,
        [args.train_length],
        None,
        args.prompt_format,
        args.seed,
        essays="train",
        progress=progress,
    )
    eval_ds = _generate(
        tok,
        "line",
        args.eval_samples * len(args.lengths),
        args.lengths,
        None,
        args.prompt_format,
        args.seed + 1000,
        essays="eval",
        exclude=train_ds,
        progress=progress,
    )
    _log(
        f"[demo] data: {len(train_ds)} training samples at {args.train_length} tokens (seed {args.seed}); "
        f"{len(eval_ds)} evaluation samples at {args.lengths} (seed {args.seed + 1000}, no shared keys/values)",
        args.quiet,
    )
    summaries = []
    _log("[demo] evaluating the base model ...", args.quiet)
    summaries.append(
        evaluate_model(
            model,
            tok,
            eval_ds,
            args.lengths,
            "base",
            os.path.join(args.out, "eval"),
            args.ppl_tokens,
            progress,
        )
    )
    del model
    checks = {}
    for granularity in args.granularities:
        label = f"SEAL-{granularity[0].upper()}"
        base, _ = _load_model(args, dtype)
        t0 = time.time()
        recipe = _recipe_name(args)
        _log(f"[demo] training {label} (recipe {recipe}: {get_recipe(recipe, granularity)}) ...", args.quiet)
        peft_model = train_variant(
            base,
            tok,
            train_ds,
            granularity,
            os.path.join(args.out, "trainer"),
            seed=args.seed,
            progress=progress,
            recipe=recipe,
        )
        train_s = time.time() - t0
        adapter_dir = os.path.join(args.out, f"adapter-{granularity}")
        peft_model.save_pretrained(adapter_dir)
        _log(
            f"[demo] {label}: trained in {train_s:.0f} s, adapter saved to {adapter_dir}; evaluating ...",
            args.quiet,
        )
        s = evaluate_model(
            peft_model,
            tok,
            eval_ds,
            args.lengths,
            label,
            os.path.join(args.out, "eval"),
            args.ppl_tokens,
            progress,
        )
        s["train_seconds"] = train_s
        summaries.append(s)
        del peft_model, base
        # merged == unmerged, checked in fp32 on a real evaluation prompt with the saved adapter
        fp32, _ = _load_model(args, torch.float32)
        reloaded = from_pretrained(fp32, adapter_dir)
        prompt = eval_ds[0]["input_ids"][: eval_ds[0]["prompt_length"]]
        ids = torch.tensor([prompt], device=input_device(fp32))
        with torch.no_grad():
            unmerged = reloaded(input_ids=ids, logits_to_keep=16).logits
            merged_model = reloaded.merge_and_unload(safe_merge=True)
            merged = merged_model(input_ids=ids, logits_to_keep=16).logits
        diff = (merged - unmerged).abs().max().item()
        checks[label] = diff
        _log(f"[demo] {label}: merged vs unmerged (fp32) max |logit diff| = {diff:.2e}", args.quiet)
        if granularity == args.granularities[-1]:
            merged_dir = os.path.join(args.out, f"merged-{granularity}")
            merged_model.save_pretrained(merged_dir)
            tok.save_pretrained(merged_dir)
            _log(f"[demo] merged {label} model saved to {merged_dir}", args.quiet)
        del merged_model, reloaded, fp32
    plot = os.path.join(args.out, "accuracy_vs_length.png")
    plot_accuracy_vs_length({s["name"]: s["result"] for s in summaries}, plot, title="Line retrieval")
    table = _table(summaries, args.lengths)
    report = {
        "lengths": args.lengths,
        "prompt_format": args.prompt_format,
        "dtype": str(dtype),
        "variants": [{k: v for k, v in s.items() if k != "result"} for s in summaries],
        "merged_vs_unmerged_max_abs_logit_diff": checks,
        "seconds": round(time.time() - t_start, 1),
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(
        f"\nLine retrieval accuracy ({args.eval_samples} samples per length, prompt format {args.prompt_format}, "
        f"{str(dtype).replace('torch.', '')} weights):"
    )
    print(table)
    print(f"\nmerged == unmerged: {', '.join(f'{k} max|diff| {v:.1e}' for k, v in checks.items())}")
    print(f"plot: {plot}   records: {os.path.join(args.out, 'eval')}   total: {report['seconds']:.0f} s")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    d = sub.add_parser(
        "demo", help="the whole loop on the embedded model: base eval, train SEAL-H/C, eval, merge"
    )
    _model_args(d)
    _device_args(d)
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument(
        "--lengths",
        type=_ints_at_least(1),
        default=[512, 1024, 2048],
        help="evaluation lengths (default 512,1024,2048)",
    )
    d.add_argument(
        "--eval-samples", type=_int_at_least(1), default=20, help="evaluation samples per length (default 20)"
    )
    d.add_argument(
        "--train-samples", type=_int_at_least(1), default=50, help="training samples (default 50, as the paper)"
    )
    d.add_argument(
        "--train-length",
        type=_int_at_least(1),
        default=2048,
        help="training sample length in tokens (default 2048)",
    )
    d.add_argument(
        "--granularities",
        type=_granularities,
        default=["head", "channel"],
        help="which SEAL variants to train (default head,channel)",
    )
    d.add_argument(
        "--prompt-format",
        choices=("longeval", "chat", "chat_prefill", "plain"),
        default="longeval",
        help="see `seal-peft eval --help` (default: LongEval's protocol)",
    )
    d.add_argument(
        "--ppl-tokens",
        type=_int_at_least(0),
        default=2048,
        help="held-out essay tokens for perplexity (0 = skip)",
    )
    _recipe_arg(d)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)

    return d
