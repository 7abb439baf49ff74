"""``seal-peft generate``: write a synthetic dataset (a ``datasets.save_to_disk`` folder)."""

from __future__ import annotations

import argparse

from ._common import _data_args, _dataset_from_args, _log, _model_args, _user_input


# ----------------------------------------------------------------------------- commands
def cmd_generate(args) -> int:
    from ..models import load_tokenizer

    with _user_input(f"--model {args.model or 'smollm2 (the embedded default)'}", OSError, ImportError):
        tok = load_tokenizer(args.model)
    ds = _dataset_from_args(args, tok, essays=args.essays)
    ds.save_to_disk(args.out)
    _log(f"wrote {len(ds)} samples ({args.task}, lengths {args.lengths}) to {args.out}", args.quiet)
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    g = sub.add_parser("generate", help="write a synthetic dataset (datasets.save_to_disk folder)")
    _model_args(g)
    _data_args(g, samples=50, lengths="2048", seed=0)
    g.add_argument(
        "--essays",
        choices=("train", "eval"),
        default="train",
        help="half of the essays that needle haystacks come from: train (default; training data) or eval "
        "(held out: for data you evaluate on; `seal-peft eval` generates from it and refuses --data from the "
        "other half)",
    )
    g.add_argument("--out", required=True, help="output folder")
    g.set_defaults(func=cmd_generate)

    return g
