"""`ms-llava convert llava-to-ms-llava`: a transformers LLaVA checkpoint -> an MS-LLaVA one with a fresh MS-Resampler
(`conversion.llava`); `convert original-to-hf`: an original LLaVA code base checkpoint -> transformers
(`conversion.original`); both streamed and checked strictly (`conversion.streaming`); and the MS-Resampler and output
options that `ms-llava compose` shares."""

from __future__ import annotations

import argparse
from typing import get_args

from ..configuration_ms_llava import MSResamplerConfig
from . import llava, original
from .llava import convert_llava_to_ms_llava
from .original import convert_original_to_hf
from .streaming import DEFAULT_MAX_SHARD_SIZE, ConversionError

FUSIONS = get_args(MSResamplerConfig.__annotations__["fusion"])


def add_shared_arguments(parser: argparse.ArgumentParser) -> None:
    """The MS-Resampler's size and settings and the output options, shared by `convert llava-to-ms-llava` and
    `compose`."""
    group = parser.add_argument_group("MS-Resampler")
    m = "visual tokens per image, a perfect square (default 144: the paper's budget, LLaVA-1.5's 576 tokens -> 144)"
    group.add_argument("--num-queries", type=int, default=144, metavar="M", help=m)
    d = "attention width D of every branch (default 1024: about 4.7 GMACs per image at LLaVA-1.5 sizes, within the "
    d += "paper's budget; use less for small parts, or the projector dominates their size)"
    group.add_argument("--resampler-hidden-size", type=int, default=1024, metavar="D", help=d)
    group.add_argument("--resampler-heads", type=int, default=16, metavar="H", help="heads per branch (default 16)")
    group.add_argument(
        "--scope-windows", type=int, nargs="+", metavar="K", help="window k per branch (default 2 6 24)"
    )
    group.add_argument("--scope-bias-strength", type=float, metavar="BETA", help="beta of the scope prior (default 5)")
    group.add_argument("--fusion", choices=FUSIONS, help="how the branches are fused (default channel_mlp)")
    group.add_argument("--seed", type=int, default=0, help="seed of the MS-Resampler's initialisation (default 0)")
    add_output_arguments(parser)


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """--max-shard-size, --overwrite and --no-parity: what every conversion and `compose` take."""
    size = f"largest output shard, e.g. 2GB or 200MB (default {DEFAULT_MAX_SHARD_SIZE}; one is in memory at a time)"
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help=size)
    overwrite = "replace a non-empty --output that holds a checkpoint a conversion wrote (its checkpoint files only; "
    overwrite += "other files are kept); never the current directory, the home directory or a filesystem root"
    parser.add_argument("--overwrite", action="store_true", help=overwrite)
    parser.add_argument("--no-parity", action="store_true", help="skip the parity check of the output")


def shared_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of `convert_llava_to_ms_llava` and `compose` that `add_shared_arguments` gives."""
    names = ("num_queries", "scope_windows", "scope_bias_strength", "fusion", "seed", "max_shard_size", "overwrite")
    kwargs = {"hidden_size": args.resampler_hidden_size, "num_attention_heads": args.resampler_heads}
    options = {name: getattr(args, name) for name in names} | {"resampler_kwargs": kwargs}
    return options | {"check_parity": not args.no_parity}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    conversions = parser.add_subparsers(dest="conversion", required=True, metavar="CONVERSION")
    what = "a transformers LLaVA -> an MS-LLaVA (fresh MS-Resampler, the rest bit for bit)"
    to_ms_llava = conversions.add_parser("llava-to-ms-llava", help=what, description=llava.__doc__)
    to_ms_llava.add_argument("--source", required=True, help="a transformers LLaVA checkpoint folder, or a Hub id")
    to_ms_llava.add_argument("--output", required=True, help="the MS-LLaVA checkpoint folder to write")
    add_shared_arguments(to_ms_llava)
    what = "an original LLaVA code base checkpoint -> transformers (LLaVA for mlp2x_gelu, MS-LLaVA for ms_resampler)"
    to_hf = conversions.add_parser("original-to-hf", help=what, description=original.__doc__)
    source = "an original LLaVA checkpoint folder (or a stage-1 one: config.json + mm_projector.bin), or a Hub id"
    to_hf.add_argument("--source", required=True, help=source)
    to_hf.add_argument("--output", required=True, help="the transformers checkpoint folder to write")
    tower = "a transformers CLIP checkpoint (folder or Hub id): the tower's config and preprocessing, and its weights "
    tower += "when --source holds none (default: config.json's mm_vision_tower)"
    to_hf.add_argument("--vision-tower", help=tower)
    to_hf.add_argument("--base-llm", help="the language model of a stage-1 --source (folder or Hub id)")
    to_hf.add_argument("--seed", type=int, default=0, help="seed of the new <image> embedding row (default 0)")
    add_output_arguments(to_hf)


def run(args: argparse.Namespace) -> int:
    if args.conversion == "original-to-hf":
        names = ("vision_tower", "base_llm", "seed", "max_shard_size", "overwrite")
        options = {name: getattr(args, name) for name in names} | {"check_parity": not args.no_parity}
        report = convert_original_to_hf(args.source, args.output, **options)
    else:
        report = convert_llava_to_ms_llava(args.source, args.output, **shared_options(args))
    print("\n".join(report.lines()))
    return 0


__all__ = ["ConversionError", "add_arguments", "convert_llava_to_ms_llava", "convert_original_to_hf", "run"]
