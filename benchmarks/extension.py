"""Line retrieval with training-free context extension, with and without a SEAL adapter.

For each variant (base, every extension alone, the adapter alone, the adapter + every extension) the
script loads a fresh model, applies the extension (``seal_peft.extension.extend_context``), loads the
adapter on top if asked, and scores greedy line retrieval at each length. Lengths beyond the native
window (8K for the embedded SmolLM2-135M) show what the extension buys; lengths inside it show that
extension + SEAL keeps what SEAL alone achieves. CPU cost grows with the square of the length: a
10K-token sample takes minutes on one thread, so keep ``--samples`` small there.

    OMP_NUM_THREADS=1 python benchmarks/extension.py --lengths 10240 --samples 5 \\
        --extensions ntk:2,self_extend:4 --adapter runs/adapters/c2e-2 --out runs/extension/10k.json

Results are written after every variant (``--out``), so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _split(text: str) -> list[str]:
    return [t for t in text.split(",") if t.strip()]


def run_variant(name, extension, adapter, args, dataset, dtype, lengths):
    from seal_peft.evaluation import evaluate_retrieval
    from seal_peft.extension import extend_context, parse_extend, record_extension
    from seal_peft.loading import from_pretrained
    from seal_peft.models import load_model

    model, tok = load_model(args.model, dtype=dtype)
    if extension:
        record = parse_extend(extension)
        method, factor = record.pop("method"), record.pop("factor")
        extend_context(model, method, factor=factor, **record)
    if adapter:
        model = from_pretrained(model, adapter)
        record_extension(model)
    model.eval()
    t0 = time.time()
    result = evaluate_retrieval(
        model, tok, dataset, max_new_tokens=24, progress=not args.quiet, name=name, length_bins=lengths
    )
    return {
        "name": name,
        "extension": extension,
        "adapter": adapter,
        "accuracy": result.accuracy,
        "by_length": {str(k): v for k, v in result.accuracy_by_length(lengths).items()},
        "outputs": [
            {
                "length": r.get("length"),
                "depth": r.get("depth"),
                "answer": r.get("answer"),
                "output": r.get("output"),
            }
            for r in result.rows
        ],
        "seconds": round(time.time() - t0, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF id/path; default: embedded SmolLM2-135M-Instruct")
    p.add_argument("--lengths", default="10240", help="comma-separated token lengths (default 10240)")
    p.add_argument("--samples", type=int, default=5, help="samples per length (default 5)")
    p.add_argument(
        "--extensions",
        default="ntk:2,dynamic_ntk:2,yarn:2,self_extend:4",
        help="comma-separated METHOD:FACTOR[:window=N] (default ntk:2,dynamic_ntk:2,yarn:2,self_extend:4)",
    )
    p.add_argument(
        "--adapter", default=None, help="a saved SEAL adapter to evaluate alone and with each extension"
    )
    p.add_argument(
        "--variants", default=None, help="only run these variant names, in this order (comma-separated)"
    )
    p.add_argument("--no-base", action="store_true", help="skip the unextended base model")
    p.add_argument("--prompt-format", default="chat_prefill", choices=["chat", "chat_prefill", "plain"])
    p.add_argument(
        "--seed", type=int, default=1000, help="evaluation data seed (default 1000, the test split)"
    )
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    import torch

    from seal_peft.data import line_retrieval
    from seal_peft.models import load_tokenizer

    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    lengths = [int(x) for x in _split(args.lengths)]
    tok = load_tokenizer(args.model)
    current = getattr(tok, "model_max_length", 0) or 0
    # we run past the native window on purpose: tell the data generators so
    needed = int(max(lengths) * 1.05)  # generated lengths are hit within +-3 %
    tok.model_max_length = needed if current > 10**7 else max(needed, current)
    dataset = line_retrieval(
        tok,
        num_samples=args.samples * len(lengths),
        length=lengths,
        prompt_format=args.prompt_format,
        seed=args.seed,
        progress=not args.quiet,
    )
    extensions = _split(args.extensions)
    variants: list[tuple[str, str | None, str | None]] = []
    if not args.no_base:
        variants.append(("base", None, None))
    variants += [(ext, ext, None) for ext in extensions]
    if args.adapter:
        label = os.path.basename(os.path.normpath(args.adapter))
        variants.append((f"SEAL {label}", None, args.adapter))
        variants += [(f"{ext} + SEAL {label}", ext, args.adapter) for ext in extensions]
    if args.variants:  # in the order given
        by_name = {v[0]: v for v in variants}
        unknown = [n for n in _split(args.variants) if n not in by_name]
        if unknown:
            raise SystemExit(f"unknown variant(s) {unknown}; available: {list(by_name)}")
        variants = [by_name[n] for n in _split(args.variants)]
    report = {
        "command": "python benchmarks/extension.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "lengths": lengths,
        "samples_per_length": args.samples,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "prompt_format": args.prompt_format,
        "seed": args.seed,
        "variants": [],
    }
    for name, ext, adapter in variants:
        row = run_variant(name, ext, adapter, args, dataset, dtype, lengths)
        report["variants"].append(row)
        cells = "  ".join(f"{k}: {v:.2f}" for k, v in row["by_length"].items())
        print(f"{name:<32} {cells}   ({row['seconds']:.0f} s)", flush=True)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1, default=str)
    return report


if __name__ == "__main__":
    main()
