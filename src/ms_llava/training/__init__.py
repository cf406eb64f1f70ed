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
    "add_arguments",
    "add_cli",
    "main",
    "merge_lora_adapter",
    "run",
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


def add_arguments(parser) -> None:
    """`ms-llava train`: the options of `arguments.train_argument_parser`, added to `parser`."""
    from .trainer import _DESCRIPTION, train_argument_parser

    parser.description = _DESCRIPTION
    source = train_argument_parser(add_help=False)
    for action in source._actions:  # rebuilt with the public add_argument, one per option
        stores = {"nargs", "const", "type", "choices", "metavar"} if action.nargs != 0 else set()
        keywords = {key: getattr(action, key) for key in ("dest", "default", "required", "help", *stores)}
        parser.add_argument(*action.option_strings, action=type(action), **keywords)


def run(args) -> int:
    """`ms-llava train`: the --model argument is resolved (a mistyped path, an incomplete checkpoint) first."""
    from pathlib import Path

    from ..checkpoints import resolve_checkpoint
    from .trainer import _train_command

    folder = resolve_checkpoint(args.model, "--model", processor=True)
    if Path(args.model).expanduser().is_dir():
        args.model = str(folder)
    return _train_command(args)
