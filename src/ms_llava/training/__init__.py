"""Training MS-LLaVA: the paper's two-stage recipe (`ms_llava.recipes`) on transformers' `Trainer`.

- `arguments`: the options, a `TrainingArguments` subclass with the recipe as preset, and their command line;
- `trainer`: `train()` and `ms-llava train`, complete checkpoints and resume;
- `adapters`: what trains: the stage's modules, LoRA / QLoRA on the LLM, or ScAle's scalars; merging LoRA;
- `data`: LLaVA JSON and messages + images records, the pre-pass that names bad records, the assistant-only labels;
- `feature_cache`: the frozen vision tower's features computed once per distinct image.

`python -m ms_llava.training ...` takes the options of `ms-llava train` (for `accelerate launch -m`).

The names below are imported when first used: transformers' `TrainingArguments` imports peft, and peft imports
bitsandbytes where it is installed, which commands that do not train should not pay for (nor print its CPU kernel
warning, which `adapters.hold_back_bitsandbytes_cpu_kernel_warning` holds back and QLoRA on CPU says once, plainly).
"""

from __future__ import annotations

import importlib

from .adapters import hold_back_bitsandbytes_cpu_kernel_warning

hold_back_bitsandbytes_cpu_kernel_warning()

TRAIN_COMMAND_HELP = "train with the paper's two-stage recipe"

_LAZY = {
    "MSLlavaTrainingArguments": "arguments",
    "TrainResult": "trainer",
    "TrainingConfig": "arguments",
    "main": "trainer",
    "merge_lora_adapter": "adapters",
    "train": "trainer",
}

__all__ = [
    "MSLlavaTrainingArguments",
    "TrainResult",
    "TrainingConfig",
    "add_cli",
    "main",
    "merge_lora_adapter",
    "train",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def add_cli(subparsers, argv: list[str] | None = None):
    """Registers `train` on an argparse subparsers object (see `trainer.add_cli`). With `argv` (the command line
    about to be parsed) that does not name `train`, registers only its name and help line, without importing the
    trainer (and with it transformers' Trainer, peft and bitsandbytes): `ms-llava --help` and the other commands
    start without them."""
    if argv is not None and "train" not in argv:
        return subparsers.add_parser("train", help=TRAIN_COMMAND_HELP)
    from .trainer import add_cli as add_train_cli

    return add_train_cli(subparsers)
