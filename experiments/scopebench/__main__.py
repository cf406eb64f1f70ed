"""`python -m experiments.scopebench COMMAND ...` from the repository root (commands: README.md here)."""

import sys

from .experiment import main

sys.exit(main())
