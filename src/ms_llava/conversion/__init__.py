"""`ms-llava convert llava-to-ms-llava`: a transformers LLaVA checkpoint -> an MS-LLaVA one with a fresh MS-Resampler
(`conversion.llava`); `convert original-to-hf`: an original LLaVA code base checkpoint -> transformers
(`conversion.original`); both streamed and checked strictly (`conversion.streaming`). Their options are defined in
`ms_llava_cli`."""

from __future__ import annotations

import argparse

from .llava import convert_llava_to_ms_llava
from .original import convert_original_to_hf
from .streaming import ConversionError


def shared_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of `convert_llava_to_ms_llava` and `compose` that `ms_llava_cli.resampler_options` gives."""
    names = ("num_queries", "scope_windows", "scope_bias_strength", "fusion", "seed", "max_shard_size", "overwrite")
    kwargs = {"hidden_size": args.resampler_hidden_size, "num_attention_heads": args.resampler_heads}
    options = {name: getattr(args, name) for name in names} | {"resampler_kwargs": kwargs}
    return options | {"check_parity": not args.no_parity}


def run(args: argparse.Namespace) -> int:
    if args.conversion == "original-to-hf":
        names = ("vision_tower", "base_llm", "seed", "max_shard_size", "overwrite")
        options = {name: getattr(args, name) for name in names} | {"check_parity": not args.no_parity}
        report = convert_original_to_hf(args.source, args.output, **options)
    else:
        report = convert_llava_to_ms_llava(args.source, args.output, **shared_options(args))
    print("\n".join(report.lines()))
    return 0


__all__ = ["ConversionError", "convert_llava_to_ms_llava", "convert_original_to_hf", "run"]
