"""Checkpoint conversion: a transformers LLaVA into an MS-LLaVA (`llava`), the original LLaVA code base's layout to
and from transformers' (`original`), and the streaming, strict checkpoint I/O both share (`checkpoint_io`)."""

from .llava import add_cli as add_llava_cli
from .llava import convert_llava_to_ms_llava
from .original import add_cli as add_original_cli
from .original import convert_hf_to_original, convert_original_to_hf


def add_arguments(parser) -> None:
    """`ms-llava convert CONVERSION ...`: the three conversions as sub-commands."""
    conversions = parser.add_subparsers(dest="conversion", required=True)
    add_llava_cli(conversions)
    add_original_cli(conversions)


def run(args) -> int:
    return args.handler(args)


__all__ = [
    "add_arguments",
    "convert_hf_to_original",
    "convert_llava_to_ms_llava",
    "convert_original_to_hf",
    "run",
]
