"""Exceptions of seal-peft.

``SealUsageError`` marks a bad value given by the user (a command-line option, a file, a device):
``seal-peft`` prints it as one ``error: ...`` line and exits with code 2, while any other exception
is a bug and shows its traceback. It is a ``ValueError``, so library callers catch it as one.
"""

from __future__ import annotations

__all__ = ["SealUsageError"]


class SealUsageError(ValueError):
    """Bad input from the user; the message names the bad value and how to fix it."""
