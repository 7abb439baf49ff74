"""``seal-peft``: generate data, train, evaluate, merge, analyze — and the end-to-end demo.

Run ``seal-peft COMMAND --help`` for each command's options. Every command works on the embedded
SmolLM2-135M-Instruct by default (``--model`` takes any HF causal LM id or path). One module per command
(``seal_peft/cli/<command>.py``: ``add_parser`` and ``cmd_<command>``), each a thin layer over library
functions; the shared option types and loaders are in ``_common.py``.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import SealUsageError
from . import analyze, demo, export_gguf, generate, merge, train
from . import eval as eval_
from ._common import DEVICE_MAP_STRATEGIES, TASKS

COMMANDS = (demo, generate, train, eval_, merge, export_gguf, analyze)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seal-peft",
        description="SEAL: learn per-head (or per-channel) attention-output scales that restore long-context "
        "retrieval. Commands: demo (the whole loop on the embedded model), generate, train, eval, merge, "
        "export-gguf.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    for command in sub.choices.values():
        command.add_argument(
            "--debug",
            action="store_true",
            help="show the traceback of a usage error too (other errors always show theirs)",
        )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return args.func(args)
    except SealUsageError as err:  # bad input: one line; anything else is a bug and keeps its traceback
        if getattr(args, "debug", False):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


__all__ = ["COMMANDS", "DEVICE_MAP_STRATEGIES", "TASKS", "SealUsageError", "build_parser", "main"]
