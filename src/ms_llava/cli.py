"""The `ms-llava` command line.

ms-llava demo [--checkpoint DIR] [--image PATH] [--question TEXT] [--output PNG]
    answer the embedded default checkpoint's demo questions (or yours) and draw one query's attention
ms-llava visualize [--checkpoint DIR] [--image PATH] [--question TEXT] [--query I | --query-at X,Y] [--output PNG]
    draw one MS-Resampler query's scope windows and per-branch attention over an image
ms-llava tiny DIR                                                   write a tiny untrained checkpoint to DIR

Wiring only: each command's work is one function of the module that owns it (`demo`, `visualize`, `testing_utils`,
`conversion`, `hub`, `training`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .demo import DEMO_OUTPUT, VISUALIZE_OUTPUT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ms-llava", description="MS-LLaVA: LLaVA with an MS-Resampler projector")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="answer the default checkpoint's demo questions (or yours) and draw one query's attention"
    )
    demo.add_argument("--checkpoint", help="a saved MS-LLaVA directory (default: the embedded default)")
    demo.add_argument("--image", help="an image file instead of the demo samples")
    demo.add_argument("--question", help="a question instead of the demo samples'")
    demo.add_argument("--max-new-tokens", type=int, default=12)
    demo.add_argument("--output", default=DEMO_OUTPUT, help=f"the attention PNG (default: ./{DEMO_OUTPUT})")
    _add_query_arguments(demo)

    visualize = commands.add_parser(
        "visualize", help="draw one MS-Resampler query's scope windows and per-branch attention over an image"
    )
    visualize.add_argument("--checkpoint", help="a saved MS-LLaVA directory (default: the embedded default)")
    visualize.add_argument("--image", help="an image file (default: the checkpoint's first demo sample)")
    visualize.add_argument("--question", help="also answer this question about the image")
    visualize.add_argument("--max-new-tokens", type=int, default=12)
    visualize.add_argument(
        "--output", default=VISUALIZE_OUTPUT, help=f"the PNG to write (default: ./{VISUALIZE_OUTPUT})"
    )
    _add_query_arguments(visualize)

    tiny = commands.add_parser("tiny", help="write a tiny untrained checkpoint (for tests and examples)")
    tiny.add_argument("directory")
    tiny.add_argument("--seed", type=int, default=0)

    from . import hub, training
    from .conversion import llava as convert_llava
    from .conversion import original as convert_original

    convert = commands.add_parser("convert", help="convert checkpoints (LLaVA -> MS-LLaVA, original <-> HF)")
    conversions = convert.add_subparsers(dest="conversion", required=True)
    convert_llava.add_cli(conversions)
    convert_original.add_cli(conversions)
    hub.add_cli(commands)
    training.add_cli(commands)

    args = parser.parse_args(argv)
    if args.command in ("demo", "visualize"):
        return _run_image_command(commands.choices[args.command], args)
    if args.command == "tiny":
        from .testing_utils import write_tiny_checkpoint

        print(f"wrote {write_tiny_checkpoint(args.directory, seed=args.seed)} (untrained)")
        return 0
    return args.handler(args)


def _add_query_arguments(parser):
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--query", type=int, help="the query index 0..M-1 (default: the anchor nearest the centre)")
    which.add_argument("--query-at", metavar="X,Y", help="the query whose anchor is nearest this pixel of the image")


def _run_image_command(parser, args) -> int:
    from .demo import run_demo, run_visualize
    from .visualize import parse_point

    if args.image and not Path(args.image).is_file():
        parser.error(f"--image: no such file: {args.image}")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.output.lower().endswith(".png"):
        parser.error(f"--output must be a .png file, got {args.output!r}")
    try:
        query_at = parse_point(args.query_at) if args.query_at is not None else None
        options = dict(output=args.output, query=args.query, query_at=query_at, max_new_tokens=args.max_new_tokens)
        if args.command == "demo":
            run_demo(args.checkpoint, args.image, args.question, **options)
        else:
            run_visualize(args.checkpoint, args.image, args.question, **options)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
