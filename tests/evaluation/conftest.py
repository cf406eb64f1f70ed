"""The lmms-eval tests' fixtures (lmms_helpers.py)."""

from lmms_helpers import _lmms_eval_tasks_indexed_once, default_checkpoint, trained_checkpoint  # noqa: F401
