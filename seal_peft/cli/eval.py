"""``seal-peft eval``: retrieval accuracy by length and held-out perplexity (:func:`seal_peft.evaluation.evaluate_model`)."""

from __future__ import annotations

import argparse
import json
import os

from ..evaluation.summary import evaluate_model
from ._common import (
    _data_args,
    _dataset_from_args,
    _device_args,
    _extend_arg,
    _int_at_least,
    _load_with_adapter,
    _model_args,
    _placement,
    _table,
)


def cmd_eval(args) -> int:
    from ..evaluation import plot_accuracy_vs_length

    model, tok = _load_with_adapter(
        args.model, args.adapter, args.merge, args.dtype, args.extend, placement=_placement(args)
    )
    ds = _dataset_from_args(args, tok, essays="eval")  # never the essays the LM windows trained on
    name = args.name or ("base" if not args.adapter else os.path.basename(os.path.normpath(args.adapter)))
    s = evaluate_model(model, tok, ds, args.lengths, name, args.out, args.ppl_tokens, progress=not args.quiet)
    print(_table([s], args.lengths))
    if args.out:
        plot_accuracy_vs_length({name: s["result"]}, os.path.join(args.out, f"{name}_accuracy.png"))
        with open(os.path.join(args.out, f"{name}_summary.json"), "w") as f:
            json.dump({k: v for k, v in s.items() if k != "result"}, f, indent=1)
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    e = sub.add_parser(
        "eval", help="retrieval accuracy by length (+ held-out perplexity), records and a plot"
    )
    _model_args(e)
    _device_args(e)
    _data_args(e, samples=40, lengths="512,1024,2048", seed=1000)
    e.add_argument("--adapter", default=None, help="SEAL adapter folder (default: evaluate the base model)")
    e.add_argument("--merge", action="store_true", help="merge the adapter before evaluating")
    _extend_arg(e, ". An adapter's recorded extension is applied automatically")
    e.add_argument("--name", default=None, help="name of this run in tables/files")
    e.add_argument(
        "--ppl-tokens",
        type=_int_at_least(0),
        default=2048,
        help="held-out essay tokens for perplexity (0 = skip)",
    )
    e.add_argument("--out", default=None, help="folder for records (JSON/CSV) and the plot")
    e.set_defaults(func=cmd_eval)

    return e
