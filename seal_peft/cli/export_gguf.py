"""``seal-peft export-gguf``: a SEAL adapter merged into a GGUF file for llama.cpp / Ollama."""

from __future__ import annotations

import argparse

from ._common import _log


def _gguf_type(text: str) -> str:
    from ..integrations.gguf_export import SUPPORTED_TYPES

    name = text.strip().upper()
    if name not in SUPPORTED_TYPES:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a type the attention-output tensors can be re-encoded in; choose one of "
            f"{', '.join(SUPPORTED_TYPES)}"
        )
    return name


def cmd_export_gguf(args) -> int:
    """Re-encode the base GGUF's attention-output tensors with the adapter's scales; copy everything else."""
    from ..integrations.gguf_export import export_gguf

    result = export_gguf(
        args.adapter, args.out, gguf_file=args.gguf, model=args.model, qtype=args.type, progress=not args.quiet
    )
    _log(f"wrote {result.summary()}", args.quiet)
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    from ..integrations.gguf_export import SUPPORTED_TYPES

    p = sub.add_parser(
        "export-gguf",
        help="merge an adapter into a GGUF file (llama.cpp / Ollama): only the attention-output tensors change",
        description="Write a GGUF whose blk.N.attn_output.weight tensors carry the SEAL scales (de-quantized, "
        "columns scaled, re-quantized); every other tensor and all metadata are copied byte for byte. The file "
        "appears only when complete.",
    )
    p.add_argument("--adapter", required=True, help="SEAL adapter folder (SEAL-H or SEAL-C)")
    p.add_argument("--out", required=True, help="the GGUF file to write, e.g. seal.gguf")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--gguf",
        default=None,
        help="the base model's GGUF file (default: the embedded model the adapter was trained on, which ships as "
        "a GGUF; the embedded SmolLM2-135M-Instruct Q4_1 for adapters of `seal-peft train`)",
    )
    source.add_argument(
        "--model", default=None, help="an embedded model name (smollm2, gemma3-270m) instead of --gguf"
    )
    p.add_argument(
        "--type",
        type=_gguf_type,
        default=None,
        metavar="TYPE",
        help=f"type of the re-encoded attention-output tensors: {', '.join(SUPPORTED_TYPES)} "
        "(default: each tensor's own type; needed when that is a k-quant such as Q4_K/Q6_K, which the gguf "
        "package cannot write)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=cmd_export_gguf)
    return p
