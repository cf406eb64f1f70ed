"""`ms-llava`: one table of commands (`COMMANDS`) and one error boundary.

A command is a module with `add_arguments(parser)` and `run(args) -> exit status`; only the chosen one is imported
(this module sits beside the package because importing `ms_llava` imports torch). Errors are told by kind, found
along the exception's chain: network, file system, content, a missing dependency, each as one line `ms-llava COMMAND:
error: ...` naming the culprit (exit status 1; 2 for an `argparse.ArgumentError`); `--debug` or MS_LLAVA_DEBUG=1
shows the traceback; other exceptions (bugs) always show theirs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = {  # command -> (module with add_arguments / run, help line)
    "demo": ("ms_llava.demo", "answer the default checkpoint's demo questions (or yours), draw one query's attention"),
    "visualize": ("ms_llava.visualize", "draw one MS-Resampler query's scope windows and per-branch attention"),
    "chat": ("ms_llava.chat", "talk about images with a checkpoint in the terminal, answers streamed"),
    "tiny": ("ms_llava.testing_utils", "write a tiny untrained checkpoint (for tests and examples)"),
    "convert": ("ms_llava.conversion", "convert checkpoints (LLaVA -> MS-LLaVA, original LLaVA -> transformers)"),
    "compose": ("ms_llava.compose", "a vision encoder + a language model -> a new MS-LLaVA (fresh MS-Resampler)"),
    "push": ("ms_llava.hub", "upload a checkpoint to the Hugging Face Hub with a generated model card"),
    "eval": ("ms_llava.evaluation", "evaluate a checkpoint with lmms-eval and write the results record"),
    "train": ("ms_llava.training", "train with the paper's two-stage recipe"),
}
DEBUG_ENVIRONMENT_VARIABLE = "MS_LLAVA_DEBUG"  # anything but "" or "0": tracebacks, as --debug
MAX_MESSAGE = 1000  # characters of an error shown; --debug shows all
# the HTTP clients' errors, and those of Python's name lookup and urllib (besides ConnectionError and TimeoutError)
NETWORK_ERRORS = """httpx.HTTPError httpx2.HTTPError requests.RequestException urllib3.exceptions.HTTPError
aiohttp.ClientError huggingface_hub.errors.HfHubHTTPError huggingface_hub.errors.LocalEntryNotFoundError
socket.gaierror urllib.error.URLError""".split()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="ms-llava", description="MS-LLaVA: LLaVA with an MS-Resampler projector")
    # dest is not `debug`: train's TrainingArguments have a --debug of their own, whose default would overwrite it
    parser.add_argument("--debug", action="store_true", dest="show_traceback", help="show the traceback of errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((word for word in argv if not word.startswith("-")), None)  # --debug is the only option before it
    for name, (module_path, help_line) in COMMANDS.items():
        command = commands.add_parser(name, help=help_line, description=help_line)
        if name == chosen:
            module = importlib.import_module(module_path)
            module.add_arguments(command)
    args = parser.parse_args(argv)
    debug = args.show_traceback or os.environ.get(DEBUG_ENVIRONMENT_VARIABLE, "") not in ("", "0")
    try:
        return module.run(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"ms-llava {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        kind, message = describe(error, args)
        if kind is None or debug:
            raise
        print(f"ms-llava {args.command}: error: {message}", file=sys.stderr)
        if kind == "argument":
            return 2
        hint = f"`ms-llava --debug {args.command} ...` or {DEBUG_ENVIRONMENT_VARIABLE}=1 shows the traceback"
        print(f"  ({hint})", file=sys.stderr)
        return 1


def run_as_module(command: str, argv: list[str] | None = None) -> int:
    """`python -m ms_llava.training` / `ms_llava.evaluation` (for `accelerate launch -m`, `torchrun -m`) as `ms-llava
    COMMAND`. A leading `--debug` is the traceback flag; one further on is the command's own."""
    argv = sys.argv[1:] if argv is None else argv
    return main(["--debug", command, *argv[1:]] if argv[:1] == ["--debug"] else [command, *argv])


def _classes(*names: str) -> tuple[type, ...]:
    """The classes `module.Name` of the modules already imported (an error cannot come from the others)."""
    found = (getattr(sys.modules.get(name.rpartition(".")[0]), name.rpartition(".")[2], None) for name in names)
    return tuple(cls for cls in found if isinstance(cls, type))


def chain(error: BaseException) -> list[BaseException]:
    """`error` and what it wraps, outermost first: `__cause__` / `__context__`, and a tenacity `RetryError`'s last
    attempt (lmms-eval's and datasets' retries)."""
    links = []
    while error is not None and error not in links:
        links.append(error)
        if isinstance(error, _classes("tenacity.RetryError")) and error.last_attempt.failed:
            error = error.last_attempt.exception()
        else:
            error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return links


def kind_of(error: BaseException) -> str | None:
    """ "argument", "network", "file", "content", "dependency", or None for an error no input explains (a bug)."""
    safetensors = _classes("safetensors.SafetensorError")
    if isinstance(error, argparse.ArgumentError):
        return "argument"
    if isinstance(error, (ConnectionError, TimeoutError, *_classes(*NETWORK_ERRORS))):
        return "network"
    if isinstance(error, (OSError, *_classes("ms_llava.outputs.FolderInUseError"))) or (
        isinstance(error, safetensors) and "(os error" in str(error)  # a full disk while saving, as Rust words it
    ):
        return "file"
    content = (
        "pickle.UnpicklingError",
        "huggingface_hub.errors.StrictDataclassError",
    )  # refused pickles, config values
    if isinstance(error, (ValueError, *safetensors, *_classes(*content))):
        return "content"
    return "dependency" if isinstance(error, ImportError) else None


def describe(error: BaseException, args: argparse.Namespace | None = None) -> tuple[str | None, str]:
    """`(kind, one line)`: the outermost message in the chain of a known kind; the cause of the decisive kind added
    where it lacks it (an `OSError`'s file, a network error's host); the checkpoint argument named where a library's
    loading error names no file."""
    known = [(link, kind) for link in chain(error) for kind in [kind_of(link)] if kind is not None]
    if not known:
        return None, ""
    kind = min((kind for _, kind in known), key=("argument", "network", "file", "content", "dependency").index)
    shown, decisive = known[0][0], next(link for link, link_kind in known if link_kind == kind)
    message = _text(shown)
    if decisive is not shown and _text(decisive) not in message:
        message = f"{message} ({_text(decisive)})"
    if kind == "network":
        host = next((_host(link) for link, link_kind in known if link_kind == "network" and _host(link)), "")
        if _host(shown):  # the HTTP client's own error, which says neither what nor where
            message = f"cannot reach {host}: {type(shown).__name__}: {message}"
        elif host and host not in message:
            message += f" (host {host})"
    elif kind == "content" and not isinstance(shown, ValueError):  # a SafetensorError
        message = _name_the_checkpoint(message, args)
    message = " ".join(message.split())
    return kind, message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE] + " ... (--debug shows all)"


def _text(error: BaseException) -> str:
    """The message of `error`; an `OSError` as "what: file" without "[Errno N]"."""
    if isinstance(error, OSError) and error.strerror:
        files = [str(name) for name in (error.filename, error.filename2) if name is not None]
        return ": ".join([error.strerror, *(name for name in files if name not in error.strerror)])
    return str(error).strip() or type(error).__name__


def _host(error: BaseException) -> str:
    """The host (and port) an HTTP client's error was talking to, or ""."""
    from urllib.parse import urlsplit

    try:
        url = getattr(getattr(error, "request", None), "url", None)
    except RuntimeError:  # httpx: an error raised outside a request has none
        return ""
    return urlsplit(str(url)).netloc if url else ""


def _name_the_checkpoint(message: str, args) -> str:
    """A safetensors error from inside a library, which names no file (the checkpoint checks name the others): the
    checkpoint argument it came from, and its first broken file."""
    from pathlib import Path

    from ms_llava.checkpoints import CheckpointError, check_safetensors

    names = ("checkpoint", "model", "source", "directory")
    given = next((value for name in names if (value := getattr(args, name, None))), None)
    broken = ""
    for path in sorted(Path(given).expanduser().glob("*.safetensors")) if given else []:
        try:
            check_safetensors(path)
        except CheckpointError:
            broken = f" ({path})"
            break
    where = f" in {given}" if given else ""
    return f"a .safetensors file{where} is truncated or corrupt{broken}: {message}; save it again"


if __name__ == "__main__":
    sys.exit(main())
