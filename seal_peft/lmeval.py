"""``python -m seal_peft.lmeval ...``: lm-evaluation-harness's CLI with SEAL registered (docs/lm_eval.md).

The documented entry point; the code lives in :mod:`seal_peft.integrations.lm_eval`.
"""

from __future__ import annotations

from .integrations.lm_eval import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
