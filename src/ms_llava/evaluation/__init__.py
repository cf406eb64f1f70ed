"""Evaluation through lmms-eval (docs/evaluation.md).

- `lmms_model.MSLlavaLMMS`: the lmms-eval model `ms_llava`, registered through lmms-eval's entry point group
  `lmms_eval.models` (pyproject.toml points it at `lmms_eval_models` below), so `lmms-eval --model ms_llava
  --model_args pretrained=DIR ...` works once the package is installed.
- `run`: `ms-llava eval` (`evaluate`, `card_results`, `add_cli`).

Importing this package does not import lmms-eval (an optional install); the entry point and `ms-llava eval` do.
"""

from __future__ import annotations

from .run import PAPER_BENCHMARKS, add_cli, card_results, evaluate

__all__ = ["PAPER_BENCHMARKS", "add_cli", "card_results", "evaluate", "lmms_eval_models"]


def lmms_eval_models():
    """The payload of the `lmms_eval.models` entry point: lmms-eval's manifest of the `ms_llava` model (its
    "simple" API; lmms-eval imports the class only when the model is asked for)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="ms_llava", simple_class_path="ms_llava.evaluation.lmms_model.MSLlavaLMMS")
