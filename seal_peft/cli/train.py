"""``seal-peft train``: train a SEAL adapter with the stock HF Trainer (:func:`seal_peft.training.train_variant`)."""

from __future__ import annotations

import argparse
import difflib
import functools
import inspect
import os
import time
from typing import Any

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

#: TrainingArguments fields that a ``seal-peft train`` option already sets: ``--ta`` names the option to use.
OWNED_FIELDS = {
    "output_dir": "--out",
    "learning_rate": "--lr",
    "num_train_epochs": "--epochs",
    "seed": "--seed",
    "data_seed": "--seed",
    "gradient_checkpointing": "--gradient-checkpointing",
    "activation_checkpointing": "--gradient-checkpointing",
    "use_cpu": "--device cpu",
    "disable_tqdm": "--quiet",
}


@functools.lru_cache(maxsize=1)
def _training_args_actions() -> dict[str, Any]:
    """transformers' own parser of ``TrainingArguments`` (``HfArgumentParser``): its action per field gives
    the conversion (``string_to_bool``, enum choices, numbers) the Trainer's scripts use."""
    import dataclasses

    from transformers import HfArgumentParser, TrainingArguments

    # the declared annotations (HfArgumentParser rewrites ``field.type`` in place, e.g. report_to -> str)
    annotations = inspect.get_annotations(TrainingArguments)
    fields = {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}
    parser = HfArgumentParser(TrainingArguments)
    return {
        a.dest: (a, fields[a.dest], str(annotations.get(a.dest, ""))) for a in parser._actions if a.dest in fields
    }


def parse_training_arg(text: str) -> tuple[str, Any]:
    """``FIELD=VALUE`` -> ``(field, value)`` for a ``TrainingArguments`` field, converted as transformers'
    ``HfArgumentParser`` converts it; ``a,b`` is a list for list fields (``report_to``, ``label_names``)."""
    name, sep, raw = text.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or not name:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected FIELD=VALUE, e.g. --ta per_device_train_batch_size=4 "
            "(list the fields with seal-peft train --list-training-args)"
        )
    if name in OWNED_FIELDS:
        raise argparse.ArgumentTypeError(f"{name} is set by a train option: use {OWNED_FIELDS[name]}")
    actions = _training_args_actions()
    if name not in actions:
        close = difflib.get_close_matches(name, list(actions), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise argparse.ArgumentTypeError(
            f"{name!r} is not a TrainingArguments field{hint}; list them with seal-peft train --list-training-args"
        )
    action, _, annotation = actions[name]
    convert = action.type or str
    takes_list = action.nargs in ("+", "*") or "list" in annotation
    pieces = [p.strip() for p in raw.split(",")] if takes_list and "," in raw else [raw]
    try:
        values = [convert(p) for p in pieces]
    except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
        kind = getattr(action.type, "__name__", "value")
        raise argparse.ArgumentTypeError(f"{name}={raw!r}: not a valid {kind} ({err})") from None
    if action.choices is not None:
        bad = [v for v in values if v not in action.choices]
        if bad:
            raise argparse.ArgumentTypeError(
                f"{name}={raw!r}: choose from {', '.join(map(str, action.choices))}"
            )
    return name, values if len(pieces) > 1 or action.nargs in ("+", "*") else values[0]


class _ListTrainingArgs(argparse.Action):
    """``--list-training-args``: every field ``--ta`` accepts, its type and default, then exit (like --help)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        lines = ["TrainingArguments fields for --ta FIELD=VALUE (transformers' types and defaults):"]
        for name, (action, field, _) in sorted(_training_args_actions().items()):
            if name in OWNED_FIELDS:
                continue
            kind = "bool" if action.nargs == "?" and action.const is True else getattr(action.type, "__name__", "str")
            if action.choices is not None:
                kind = "{" + ",".join(map(str, action.choices)) + "}"
            lines.append(f"  {name}: {kind} = {field.default!r}")
        lines.append("set by train options: " + ", ".join(f"{k} ({v})" for k, v in OWNED_FIELDS.items()))
        print("\n".join(lines))
        parser.exit(0)


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
        lm_kl=args.lm_kl,
        recipe=recipe,
        **dict(args.training_args or []),
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
        "--lm-kl",
        type=_non_negative,
        default=None,
        metavar="W",
        help="train the LM windows on W x the KL divergence to the base model's next-token distribution "
        "instead of on their text (one extra forward per window; default 0 = their cross-entropy)",
    )
    t.add_argument(
        "--gradient-checkpointing", action="store_true", help="trade compute for memory on long samples"
    )
    _extend_arg(t, "; recorded in the adapter")
    t.add_argument("--out", required=True, help="adapter output folder")
    t.add_argument(
        "--ta",
        "--training-arg",
        dest="training_args",
        action="append",
        type=parse_training_arg,
        metavar="FIELD=VALUE",
        help="any other transformers TrainingArguments field, repeatable: e.g. --ta per_device_train_batch_size=4 "
        "--ta gradient_accumulation_steps=8 --ta logging_steps=10 --ta report_to=tensorboard "
        "(a,b for lists; docs/cli.md)",
    )
    t.add_argument(
        "--list-training-args", action=_ListTrainingArgs, help="list the fields --ta accepts, with types, and exit"
    )
    t.set_defaults(func=cmd_train)

    return t
