"""``python -m seal_peft.cli``: the ``seal-peft`` command."""

import sys

from . import main

sys.exit(main())
