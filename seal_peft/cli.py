"""``seal-peft``: generate data, train, evaluate, merge — and the end-to-end demo.

Run ``seal-peft COMMAND --help`` for each command's options. Every command works on the embedded
SmolLM2-135M-Instruct by default (``--model`` takes any HF causal LM id or path).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

TASKS = ("line", "kv", "needle")

# Recommended SEAL settings for the embedded model, chosen on the dev split (docs/results.md).
RECIPES: dict[str, dict[str, Any]] = {
    "head": {"learning_rate": 1e-2, "num_train_epochs": 1.0, "scale_pull": 0.0},
    "channel": {"learning_rate": 2e-2, "num_train_epochs": 1.0, "scale_pull": 0.0},
}


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- shared pieces
def _generate(
    tokenizer,
    task: str,
    num_samples: int,
    lengths: list[int],
    depths,
    prompt_format: str,
    seed: int,
    exclude=None,
    progress: bool = True,
):
    from . import data

    kwargs = dict(
        num_samples=num_samples,
        length=lengths,
        depths=depths,
        prompt_format=prompt_format,
        seed=seed,
        progress=progress,
    )
    if task == "line":
        return data.line_retrieval(tokenizer, exclude=exclude, **kwargs)
    if task == "kv":
        return data.kv_retrieval(tokenizer, exclude=exclude, **kwargs)
    if task == "needle":
        return data.needle_haystack(tokenizer, essays="eval" if exclude is not None else "train", **kwargs)
    raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")


def _load_dataset(path: str):
    from datasets import load_from_disk

    if not os.path.isdir(path):
        raise SystemExit(f"error: --data {path!r} is not a folder written by `seal-peft generate --out`.")
    return load_from_disk(path)


def _data_args(p: argparse.ArgumentParser, *, samples: int, lengths: str, seed: int) -> None:
    g = p.add_argument_group("data (generated on the fly unless --data is given)")
    g.add_argument("--data", help="a dataset folder written by `seal-peft generate --out`")
    g.add_argument("--task", choices=TASKS, default="line", help="synthetic task (default: line retrieval)")
    g.add_argument("--num-samples", type=int, default=samples, help=f"samples per length (default {samples})")
    g.add_argument(
        "--lengths",
        type=_ints,
        default=_ints(lengths),
        help=f"token lengths, comma-separated (default {lengths})",
    )
    g.add_argument(
        "--depths",
        type=_floats,
        default=None,
        help="needle/line depths in [0,1], comma-separated (default random)",
    )
    g.add_argument(
        "--prompt-format",
        choices=("chat", "chat_prefill", "plain"),
        default="chat_prefill",
        help="chat template, chat template with the answer's start pre-filled (default), or plain text",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=seed,
        help=f"data seed (default {seed}); use different seeds for train and eval",
    )


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="HF model id or path (default: embedded SmolLM2-135M-Instruct)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _dataset_from_args(args, tokenizer, exclude=None):
    if args.data:
        return _load_dataset(args.data)
    return _generate(
        tokenizer,
        args.task,
        args.num_samples * len(args.lengths),
        args.lengths,
        args.depths,
        args.prompt_format,
        args.seed,
        exclude=exclude,
        progress=not args.quiet,
    )


# ----------------------------------------------------------------------------- commands
def cmd_generate(args) -> int:
    from .models import load_tokenizer

    tok = load_tokenizer(args.model)
    ds = _dataset_from_args(args, tok)
    ds.save_to_disk(args.out)
    _log(f"wrote {len(ds)} samples ({args.task}, lengths {args.lengths}) to {args.out}", args.quiet)
    return 0


def train_variant(
    model,
    tokenizer,
    train_ds,
    granularity: str,
    out_dir: str,
    *,
    learning_rate=None,
    epochs=None,
    scale_pull=None,
    layers=None,
    gradient_checkpointing=False,
    seed=0,
    progress=True,
):
    """Wrap ``model`` with SEAL and train it with the recipe for ``granularity``; returns the PeftModel."""
    from peft import get_peft_model

    from .config import SealConfig
    from .training import train_seal

    recipe = dict(RECIPES[granularity])
    if learning_rate is not None:
        recipe["learning_rate"] = learning_rate
    if epochs is not None:
        recipe["num_train_epochs"] = epochs
    if scale_pull is not None:
        recipe["scale_pull"] = scale_pull
    peft_model = get_peft_model(model, SealConfig(granularity=granularity, layers_to_transform=layers))
    train_seal(
        peft_model,
        tokenizer,
        train_ds,
        out_dir,
        granularity=granularity,
        seed=seed,
        progress=progress,
        gradient_checkpointing=gradient_checkpointing,
        **recipe,
    )
    return peft_model


def cmd_train(args) -> int:
    from .models import load_model

    model, tok = load_model(args.model)
    ds = _dataset_from_args(args, tok)
    t0 = time.time()
    peft_model = train_variant(
        model,
        tok,
        ds,
        args.granularity,
        os.path.join(args.out, "trainer"),
        learning_rate=args.lr,
        epochs=args.epochs,
        scale_pull=args.scale_pull,
        layers=args.layers,
        gradient_checkpointing=args.gradient_checkpointing,
        seed=args.seed,
        progress=not args.quiet,
    )
    peft_model.save_pretrained(args.out)
    _log(
        f"trained SEAL-{args.granularity[0].upper()} on {len(ds)} samples in {time.time() - t0:.0f} s; "
        f"adapter saved to {args.out}",
        args.quiet,
    )
    return 0


def _load_with_adapter(model_name, adapter, merge):
    from .loading import from_pretrained
    from .models import load_model

    model, tok = load_model(model_name)
    if adapter:
        model = from_pretrained(model, adapter)
        if merge:
            model = model.merge_and_unload(safe_merge=True)
    return model.eval(), tok


def evaluate_model(model, tok, eval_ds, lengths, name, out_dir=None, ppl_tokens=2048, progress=True) -> dict:
    """Retrieval accuracy by length + held-out perplexity; writes records when ``out_dir`` is given."""
    from .data import heldout_text
    from .evaluation import evaluate_retrieval, perplexity

    result = evaluate_retrieval(
        model, tok, eval_ds, max_new_tokens=32, progress=progress, name=name, length_bins=lengths
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


def cmd_eval(args) -> int:
    from .evaluation import plot_accuracy_vs_length

    model, tok = _load_with_adapter(args.model, args.adapter, args.merge)
    ds = _dataset_from_args(args, tok)
    name = args.name or ("base" if not args.adapter else os.path.basename(os.path.normpath(args.adapter)))
    s = evaluate_model(model, tok, ds, args.lengths, name, args.out, args.ppl_tokens, progress=not args.quiet)
    print(_table([s], args.lengths))
    if args.out:
        plot_accuracy_vs_length({name: s["result"]}, os.path.join(args.out, f"{name}_accuracy.png"))
        with open(os.path.join(args.out, f"{name}_summary.json"), "w") as f:
            json.dump({k: v for k, v in s.items() if k != "result"}, f, indent=1)
    return 0


def cmd_merge(args) -> int:
    from .loading import from_pretrained
    from .models import load_model

    model, tok = load_model(args.model)
    merged = from_pretrained(model, args.adapter).merge_and_unload(safe_merge=True)
    merged.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    _log(
        f"merged model written to {args.out} (a plain transformers checkpoint; no seal_peft needed to load it)",
        args.quiet,
    )
    return 0


def _table(summaries: list[dict], lengths: list[int]) -> str:
    head = "| variant | " + " | ".join(_fmt_len(n) for n in lengths) + " | essay ppl |"
    lines = [head, "|" + "---|" * (len(lengths) + 2)]
    for s in summaries:
        cells = [f"{s['by_length'].get(n, float('nan')):.2f}" for n in lengths]
        ppl = f"{s['ppl']:.2f}" if s.get("ppl") else "-"
        lines.append(f"| {s['name']} | " + " | ".join(cells) + f" | {ppl} |")
    return "\n".join(lines)


def _fmt_len(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def cmd_demo(args) -> int:
    """Base eval -> train SEAL-H and SEAL-C -> eval -> merged == unmerged -> save, with a table."""
    import torch

    from .evaluation import plot_accuracy_vs_length
    from .models import load_model

    t_start = time.time()
    progress = not args.quiet
    os.makedirs(args.out, exist_ok=True)
    model, tok = load_model(args.model)
    _log(f"[demo] model: {args.model or 'embedded SmolLM2-135M-Instruct'}; output: {args.out}", args.quiet)
    train_ds = _generate(
        tok,
        "line",
        args.train_samples,
        [args.train_length],
        None,
        args.prompt_format,
        args.seed,
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
    checks = {}
    for granularity in args.granularities:
        label = f"SEAL-{granularity[0].upper()}"
        base, _ = load_model(args.model)
        t0 = time.time()
        _log(f"[demo] training {label} ({RECIPES[granularity]}) ...", args.quiet)
        peft_model = train_variant(
            base,
            tok,
            train_ds,
            granularity,
            os.path.join(args.out, "trainer"),
            seed=args.seed,
            progress=progress,
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
        # merged == unmerged on a real evaluation prompt
        ids = torch.tensor([eval_ds[0]["input_ids"][: eval_ds[0]["prompt_length"]]])
        with torch.no_grad():
            unmerged = peft_model(input_ids=ids).logits
            merged_model = peft_model.merge_and_unload(safe_merge=True)
            merged = merged_model(input_ids=ids).logits
        diff = (merged - unmerged).abs().max().item()
        checks[label] = diff
        _log(f"[demo] {label}: merged vs unmerged max |logit diff| = {diff:.2e}", args.quiet)
        if granularity == args.granularities[-1]:
            merged_dir = os.path.join(args.out, f"merged-{granularity}")
            merged_model.save_pretrained(merged_dir)
            tok.save_pretrained(merged_dir)
            _log(f"[demo] merged {label} model saved to {merged_dir}", args.quiet)
        del peft_model, merged_model, base
    plot = os.path.join(args.out, "accuracy_vs_length.png")
    plot_accuracy_vs_length({s["name"]: s["result"] for s in summaries}, plot, title="Line retrieval")
    table = _table(summaries, args.lengths)
    report = {
        "lengths": args.lengths,
        "prompt_format": args.prompt_format,
        "variants": [{k: v for k, v in s.items() if k != "result"} for s in summaries],
        "merged_vs_unmerged_max_abs_logit_diff": checks,
        "seconds": round(time.time() - t_start, 1),
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(
        f"\nLine retrieval accuracy ({args.eval_samples} samples per length, prompt format {args.prompt_format}):"
    )
    print(table)
    print(f"\nmerged == unmerged: {', '.join(f'{k} max|diff| {v:.1e}' for k, v in checks.items())}")
    print(f"plot: {plot}   records: {os.path.join(args.out, 'eval')}   total: {report['seconds']:.0f} s")
    return 0


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seal-peft",
        description="SEAL: learn per-head (or per-channel) attention-output scales that restore long-context "
        "retrieval. Commands: demo (the whole loop on the embedded model), generate, train, eval, merge.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser(
        "demo", help="the whole loop on the embedded model: base eval, train SEAL-H/C, eval, merge"
    )
    _model_args(d)
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument(
        "--lengths", type=_ints, default=[512, 1024, 2048], help="evaluation lengths (default 512,1024,2048)"
    )
    d.add_argument("--eval-samples", type=int, default=20, help="evaluation samples per length (default 20)")
    d.add_argument(
        "--train-samples", type=int, default=50, help="training samples (default 50, as the paper)"
    )
    d.add_argument(
        "--train-length", type=int, default=1024, help="training sample length in tokens (default 1024)"
    )
    d.add_argument(
        "--granularities",
        type=lambda s: s.split(","),
        default=["head", "channel"],
        help="which SEAL variants to train (default head,channel)",
    )
    d.add_argument("--prompt-format", choices=("chat", "chat_prefill", "plain"), default="chat_prefill")
    d.add_argument(
        "--ppl-tokens", type=int, default=2048, help="held-out essay tokens for perplexity (0 = skip)"
    )
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)

    g = sub.add_parser("generate", help="write a synthetic dataset (datasets.save_to_disk folder)")
    _model_args(g)
    _data_args(g, samples=50, lengths="1024", seed=0)
    g.add_argument("--out", required=True, help="output folder")
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("train", help="train a SEAL adapter with the stock HF Trainer and save it")
    _model_args(t)
    _data_args(t, samples=50, lengths="1024", seed=0)
    t.add_argument(
        "--granularity", choices=("head", "channel"), default="head", help="head = SEAL-H, channel = SEAL-C"
    )
    t.add_argument("--lr", type=float, default=None, help="learning rate (default: 1e-2 head, 2e-2 channel)")
    t.add_argument("--epochs", type=float, default=None, help="epochs (default 1)")
    t.add_argument(
        "--scale-pull", type=float, default=None, help="weight of the pull of the scales toward 1 (default 0)"
    )
    t.add_argument("--layers", type=_ints, default=None, help="only adapt these layers (comma-separated)")
    t.add_argument(
        "--gradient-checkpointing", action="store_true", help="trade compute for memory on long samples"
    )
    t.add_argument("--out", required=True, help="adapter output folder")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser(
        "eval", help="retrieval accuracy by length (+ held-out perplexity), records and a plot"
    )
    _model_args(e)
    _data_args(e, samples=40, lengths="512,1024,2048", seed=1000)
    e.add_argument("--adapter", default=None, help="SEAL adapter folder (default: evaluate the base model)")
    e.add_argument("--merge", action="store_true", help="merge the adapter before evaluating")
    e.add_argument("--name", default=None, help="name of this run in tables/files")
    e.add_argument(
        "--ppl-tokens", type=int, default=2048, help="held-out essay tokens for perplexity (0 = skip)"
    )
    e.add_argument("--out", default=None, help="folder for records (JSON/CSV) and the plot")
    e.set_defaults(func=cmd_eval)

    m = sub.add_parser(
        "merge", help="fold an adapter into the model and save a plain transformers checkpoint"
    )
    _model_args(m)
    m.add_argument("--adapter", required=True, help="SEAL adapter folder")
    m.add_argument("--out", required=True, help="output folder for the merged model + tokenizer")
    m.set_defaults(func=cmd_merge)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
