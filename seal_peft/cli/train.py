"""``seal-peft train``: train a SEAL adapter with the stock HF Trainer (:func:`seal_peft.training.train_variant`)."""

from __future__ import annotations

import argparse
import os
import time

from ..models import resolve_dtype
from ..training import train_variant
from ._common import (
    _apply_extend,
    _check_layers,
    _data_args,
    _dataset_from_args,
    _device_args,
    _extend_arg,
    _int_at_least,
    _ints_at_least,
    _load_model,
    _log,
    _model_args,
    _non_negative,
    _positive,
    _recipe_arg,
    _recipe_name,
)


def cmd_train(args) -> int:
    model, tok = _load_model(args, resolve_dtype(args.dtype))
    _check_layers(model, args.layers)
    _apply_extend(model, tok, args.extend)
    ds = _dataset_from_args(args, tok, essays="train")
    recipe = _recipe_name(args)
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
        lm_every=args.lm_every,
        lm_length=args.lm_length,
        recipe=recipe,
    )
    from ..extension import record_extension

    record_extension(peft_model)  # the extension is saved in adapter_config.json ("extension")
    peft_model.save_pretrained(args.out)
    _log(
        f"trained SEAL-{args.granularity[0].upper()} (recipe {recipe}) on {len(ds)} samples in "
        f"{time.time() - t0:.0f} s; "
        f"adapter saved to {args.out}",
        args.quiet,
    )
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    t = sub.add_parser("train", help="train a SEAL adapter with the stock HF Trainer and save it")
    _model_args(t)
    _device_args(t)
    _data_args(t, samples=50, lengths="2048", seed=0)
    t.add_argument(
        "--granularity", choices=("head", "channel"), default="head", help="head = SEAL-H, channel = SEAL-C"
    )
    t.add_argument(
        "--lr",
        type=_positive,
        default=None,
        help="learning rate (default: the recipe's, see --recipe)",
    )
    _recipe_arg(t)
    t.add_argument("--epochs", type=_positive, default=None, help="epochs (default: the recipe's, 1)")
    t.add_argument(
        "--scale-pull", type=_non_negative, default=None, help="weight of the pull of the scales toward 1 (default 0)"
    )
    t.add_argument(
        "--layers", type=_ints_at_least(0), default=None, help="only adapt these layers (comma-separated)"
    )
    t.add_argument(
        "--lm-every",
        type=_int_at_least(0),
        default=None,
        metavar="N",
        help="keep the model a good LM: add one plain-text window (training essays) per N samples, "
        "shuffled with them (default: the recipe's, 2 for smollm2, 0 = off for paper; docs/training.md)",
    )
    t.add_argument("--lm-length", type=_int_at_least(1), default=None, help="tokens per LM window (default 512)")
    t.add_argument(
        "--gradient-checkpointing", action="store_true", help="trade compute for memory on long samples"
    )
    _extend_arg(t, "; recorded in the adapter")
    t.add_argument("--out", required=True, help="adapter output folder")
    t.set_defaults(func=cmd_train)

    return t
