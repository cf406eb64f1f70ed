"""The lmms-eval tests' fixtures (lmms_helpers.py)."""

from lmms_helpers import default_checkpoint, yes_no_checkpoint  # noqa: F401
