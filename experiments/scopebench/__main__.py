"""`python -m experiments.scopebench COMMAND ...` from the repository root (commands: README.md here)."""

import sys

from .cli import main

sys.exit(main())
