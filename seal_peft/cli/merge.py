"""``seal-peft merge``: fold an adapter into the model and save a plain transformers checkpoint."""

from __future__ import annotations

import argparse

from ..models import resolve_dtype
from ._common import _apply_extend, _log, _model_args


def cmd_merge(args) -> int:
    """Fold the adapter into the base weights; the adapter's context extension goes into config.json."""
    import warnings

    import torch

    from ..extension import extension_of, from_pretrained  # applies the extension recorded with the adapter
    from ..models import load_model

    # merge in full precision unless asked otherwise (the merged checkpoint is what gets deployed)
    model, tok = load_model(
        args.model, dtype=torch.float32 if args.dtype == "auto" else resolve_dtype(args.dtype)
    )
    merged = from_pretrained(model, args.adapter).merge_and_unload(safe_merge=True)
    _apply_extend(merged, tok, None)  # an extended model: the tokenizer accepts the extended length
    merged.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    record = extension_of(merged)
    note = "a plain transformers checkpoint; no seal_peft needed to load it"
    if record is not None and record["method"] == "self_extend":
        warnings.warn(
            f"{args.out}: the adapter was trained under Self-Extend ({record}), an attention implementation "
            f"rather than a config value. config.json records it as `seal_extension`, but transformers, vLLM, "
            f"TGI or llama.cpp load the merged model WITHOUT Self-Extend. After loading, re-apply it with "
            f"seal_peft.extension.apply_from_config(model, {args.out!r}).",
            UserWarning,
            stacklevel=2,
        )
        note = "Self-Extend is recorded in config.json but must be re-applied with seal_peft after loading"
    elif record is not None:
        note += f"; the {record['method']} RoPE extension is in config.json and applied by transformers on load"
    _log(f"merged model written to {args.out} ({note})", args.quiet)
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    m = sub.add_parser(
        "merge", help="fold an adapter into the model and save a plain transformers checkpoint"
    )
    _model_args(m)
    m.add_argument("--adapter", required=True, help="SEAL adapter folder")
    m.add_argument("--out", required=True, help="output folder for the merged model + tokenizer")
    m.set_defaults(func=cmd_merge)

    return m
