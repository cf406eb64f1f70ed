"""The `ms-llava` command line.

ms-llava demo [--checkpoint DIR] [--image PATH] [--question TEXT] [--output PNG]
    answer the embedded default checkpoint's demo questions (or yours) and draw one query's attention
ms-llava visualize [--checkpoint DIR] [--image PATH] [--question TEXT] [--query I | --query-at X,Y] [--output PNG]
    draw one MS-Resampler query's scope windows and per-branch attention over an image
ms-llava tiny DIR [--overwrite] | --parts DIR | --data DIR         tiny untrained stand-ins (a checkpoint, parts, data)

Wiring only: each command's work is one function of the module that owns it (`demo`, `visualize`, `testing_utils`,
`conversion`, `hub`, `training`). Errors a user's input causes (a missing or unreadable file, a checkpoint argument
that names nothing, a truncated `.safetensors`, bad JSON) are caught in one place, `main`, and printed as
`ms-llava COMMAND: error: ...` naming the file, exit status 1; `ms-llava --debug ...` or `MS_LLAVA_DEBUG=1` shows
their traceback too. Programming errors always show theirs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .demo import DEMO_OUTPUT, VISUALIZE_OUTPUT

# Set to anything but "" or "0": handled errors show their traceback (as `--debug` does).
DEBUG_ENVIRONMENT_VARIABLE = "MS_LLAVA_DEBUG"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ms-llava", description="MS-LLaVA: LLaVA with an MS-Resampler projector")
    parser.add_argument(
        "--debug",
        action="store_true",
        # not `debug`: a subcommand's parser may define that dest (train has TrainingArguments' --debug), and its
        # default would overwrite this flag's value in the namespace
        dest="show_traceback",
        help=f"show the traceback of errors caused by the input too (or set {DEBUG_ENVIRONMENT_VARIABLE}=1)",
    )
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

    from . import compose, conversion, hub, testing_utils

    for name, module, help_text in (
        ("tiny", testing_utils, "write a tiny untrained checkpoint, compose parts or data (tests, examples, offline)"),
        ("convert", conversion, "convert checkpoints: llava-to-ms-llava (a transformers LLaVA -> an MS-LLaVA)"),
        ("compose", compose, "a vision encoder + a language model -> a new MS-LLaVA (fresh MS-Resampler)"),
        ("push", hub, "upload a checkpoint folder to the Hugging Face Hub with a model card built from its records"),
    ):
        module.add_arguments(command := commands.add_parser(name, help=help_text))
        command.set_defaults(handler=module.run)
    __import__("ms_llava.evaluation", fromlist=["add_cli"]).add_cli(commands)  # ms-llava eval (lmms-eval)
    train = commands.add_parser("train", help="train with the paper's two-stage recipe")
    if next((word for word in (sys.argv[1:] if argv is None else argv) if not word.startswith("-")), None) == "train":
        from . import training  # a command's module only when it is chosen (add_arguments / run)

        training.add_arguments(train)
        train.set_defaults(handler=training.run)

    args = parser.parse_args(argv)
    debug = _debug(args)
    try:
        return _run(commands, args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"ms-llava {args.command}: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as error:
        if debug:
            raise
        print(f"ms-llava {args.command}: error: {_describe(error, args)}", file=sys.stderr)
        print(
            f"  (`ms-llava --debug {args.command} ...` or {DEBUG_ENVIRONMENT_VARIABLE}=1 shows the traceback)",
            file=sys.stderr,
        )
        return 1


def run_as_module(command: str, argv: list[str] | None = None) -> int:
    """`python -m ms_llava.training ...` / `python -m ms_llava.evaluation ...` (for `accelerate launch -m`,
    `torchrun -m`): `ms-llava COMMAND ...`, with the same handling of input errors. A leading `--debug` is the
    traceback flag, as in `ms-llava --debug COMMAND`; one further on stays the command's own (train's is
    TrainingArguments' `--debug`)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--debug"]:
        return main(["--debug", command, *argv[1:]])
    return main([command, *argv])


def _debug(args) -> bool:
    return args.show_traceback or os.environ.get(DEBUG_ENVIRONMENT_VARIABLE, "") not in ("", "0")


def _run(commands, args) -> int:
    if args.command in ("demo", "visualize"):
        return _run_image_command(commands.choices[args.command], args)
    if args.command in ("train", "eval"):
        _resolve_model_argument(args)
    return args.handler(args)


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a user's input causes, printed without a traceback: bad values and files (`ValueError`, which
    `CheckpointError`, `ConversionError`, JSON and UTF-8 decoding errors are), files that cannot be read or written
    (`OSError`: missing, permission, not an image, Hub and download errors), a missing optional dependency
    (`ImportError`), a corrupt `.safetensors` (`SafetensorError`) and an image too large to decode safely."""
    from PIL import Image
    from safetensors import SafetensorError

    from .outputs import FolderInUseError

    return (ValueError, OSError, ImportError, SafetensorError, Image.DecompressionBombError, FolderInUseError)


def _describe(error: BaseException, args) -> str:
    """The error's message in at most three lines; for a `SafetensorError`, which names no file, also the checkpoint
    argument it came from."""
    from safetensors import SafetensorError

    lines = [line for line in str(error).strip().splitlines() if line.strip()] or [type(error).__name__]
    text = "\n  ".join(lines[:3]) + ("\n  ..." if len(lines) > 3 else "")
    if isinstance(error, SafetensorError):
        given = [getattr(args, name, None) for name in ("checkpoint", "model", "source", "directory")]
        where = next((f" in {value}" for value in given if value), "")
        culprit = next((found for value in given if value for found in [_unreadable_safetensors(value)] if found), "")
        text = (
            f"a .safetensors file{where} is truncated or corrupt{f' ({culprit})' if culprit else ''}: {text}; "
            "download or save the checkpoint again"
        )
    return text


def _unreadable_safetensors(folder: str) -> str:
    """The first `.safetensors` file in `folder` whose header does not read, or ""."""
    from .checkpoints import CheckpointError, check_safetensors

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return ""
    for path in sorted(folder.glob("*.safetensors")):
        try:
            check_safetensors(path)
        except CheckpointError:
            return str(path)
    return ""


def _resolve_model_argument(args) -> None:
    """`train --model` and `eval --model`: a path that does not exist, a bare name that is neither here nor on the
    Hub, or an incomplete or truncated checkpoint fails before the work starts (`resolve_checkpoint`). A local folder
    is passed on with `~` expanded; a Hub id is passed on as given (downloaded now, then read from the Hub cache), so
    the run records it."""
    from .checkpoints import resolve_checkpoint

    folder = resolve_checkpoint(args.model, "--model", processor=True)
    if Path(args.model).expanduser().is_dir():
        args.model = str(folder)


def _add_query_arguments(parser):
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--query", type=int, help="the query index 0..M-1 (default: the anchor nearest the centre)")
    which.add_argument("--query-at", metavar="X,Y", help="the query whose anchor is nearest this pixel of the image")


def _run_image_command(parser, args) -> int:
    from .checkpoints import CheckpointError
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
    except CheckpointError:
        raise  # main prints it, without the usage lines: the checkpoint, not the command line, is wrong
    except (ValueError, FileNotFoundError) as error:
        if _debug(args):
            raise
        # A bad --query / --query-at / --image value is an argument error (exit status 2), shown without the usage
        # lines: the usage is not what went wrong.
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
