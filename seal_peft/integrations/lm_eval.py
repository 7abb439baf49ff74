"""Run lm-evaluation-harness on SEAL adapters: its own CLI, with SEAL registered first.

lm-eval's ``hf`` model loads adapters with ``PeftModel.from_pretrained`` (``model_args=...,peft=PATH``),
which only knows SEAL after ``import seal_peft``. The stock ``lm_eval`` command does not import it,
so run the same command line through this module::

    python -m seal_peft.lmeval run (or python -m seal_peft.integrations.lm_eval run) --model hf \\
        --model_args pretrained=BASE,peft=ADAPTER_DIR,dtype=float32 \\
        --tasks my_task --include_path tasks/ --batch_size 8

Every argument is lm-eval's own (see ``lm_eval --help``); nothing else changes. A merged model
(``seal-peft merge``) is a plain checkpoint and runs with the stock ``lm_eval`` command. In Python,
``import seal_peft`` and call ``lm_eval.simple_evaluate(...)`` as usual (see docs/lm_eval.md).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """``lm_eval``'s command line (``lm_eval.__main__.cli_evaluate``) with SEAL registered with PEFT."""
    # importing this module ran seal_peft/__init__, which registers SEAL with PEFT
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit(f"lm-evaluation-harness is not installed: pip install lm-eval ({err})") from err
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
