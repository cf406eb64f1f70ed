"""`ms-llava`: one table of commands (`COMMANDS`), their options, and one error boundary.

A command is its options here (`OPTIONS_FUNCTION(parser)`) and a module with `run(args) -> exit status`, imported only
once the arguments parsed: this module sits beside the package because importing `ms_llava` imports torch, so that
`--help` and an argument error answer without it (except `train`'s, which are `TrainingArguments`' fields). Errors are
told by kind, found along the exception's chain: network, file system, content, a missing dependency, each as one line
`ms-llava COMMAND: error: ...` naming the culprit (exit status 1; 2 for an `argparse.ArgumentError`); `--debug` or
MS_LLAVA_DEBUG=1 shows the traceback; other exceptions (bugs) always show theirs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

FUSIONS = ("channel_mlp", "mean", "attention", "concat_mlp")  # MSResamplerConfig.fusion's values (a test compares)
MAX_SHARD_SIZE = "500MB"  # conversion.streaming.DEFAULT_MAX_SHARD_SIZE (a test compares)
DEMO_OUTPUT = "ms-llava-demo.png"


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def checkpoint_options(parser: argparse.ArgumentParser, max_new_tokens: int = 12) -> None:
    parser.add_argument("--checkpoint", help="a saved MS-LLaVA folder or Hub id (default: the embedded default)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens)


def query_options(parser: argparse.ArgumentParser, output: str) -> None:
    """--output and --query | --query-at of `demo` and `visualize`."""
    parser.add_argument("--output", default=output, help=f"the attention PNG (default: ./{output})")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--query", type=int, help="the query index 0..M-1 (default: the anchor nearest the centre)")
    which.add_argument("--query-at", metavar="X,Y", help="the query whose anchor is nearest this pixel of the image")


def demo_options(parser: argparse.ArgumentParser) -> None:
    checkpoint_options(parser)
    parser.add_argument("--image", help="an image file instead of the demo samples")
    parser.add_argument("--question", help="a question instead of the demo samples'")
    query_options(parser, DEMO_OUTPUT)


def visualize_options(parser: argparse.ArgumentParser) -> None:
    checkpoint_options(parser)
    parser.add_argument("--image", help="an image file (default: the checkpoint's first demo sample)")
    parser.add_argument("--question", help="also answer this question about the image")
    query_options(parser, "ms-llava-attention.png")


def chat_options(parser: argparse.ArgumentParser) -> None:
    checkpoint_options(parser, max_new_tokens=64)
    parser.add_argument("--image", action="append", default=[], help="an image for the first question (repeatable)")


def tiny_options(parser: argparse.ArgumentParser) -> None:
    parser.description = "Tiny untrained stand-ins to rehearse every path offline: a checkpoint, parts, data."
    parser.add_argument("directory", nargs="?", help="write a tiny untrained MS-LLaVA checkpoint here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace the checkpoint files of a folder with one")
    parser.add_argument("--parts", metavar="DIR", help="write parts for compose: DIR/vision, DIR/llama, DIR/qwen2")
    parser.add_argument("--data", metavar="DIR", help="write the coloured-shapes data of docs/training.md")
    parser.add_argument("--accuracy", nargs=2, metavar=("CHECKPOINT", "QA_FILE"), help="score a model on --data's qa")


def resampler_options(parser: argparse.ArgumentParser) -> None:
    """The MS-Resampler's size and settings and the output options of `convert llava-to-ms-llava` and `compose`
    (`ms_llava.conversion.shared_options` reads them)."""
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
    output_options(parser)


def output_options(parser: argparse.ArgumentParser) -> None:
    """--max-shard-size, --overwrite and --no-parity: what every conversion and `compose` take."""
    size = f"largest output shard, e.g. 2GB or 200MB (default {MAX_SHARD_SIZE}; one is in memory at a time)"
    parser.add_argument("--max-shard-size", default=MAX_SHARD_SIZE, help=size)
    overwrite = "replace a non-empty --output that holds a checkpoint a conversion wrote (its checkpoint files only; "
    overwrite += "other files are kept); never the current directory, the home directory or a filesystem root"
    parser.add_argument("--overwrite", action="store_true", help=overwrite)
    parser.add_argument("--no-parity", action="store_true", help="skip the parity check of the output")


def convert_options(parser: argparse.ArgumentParser) -> None:
    conversions = parser.add_subparsers(dest="conversion", required=True, metavar="CONVERSION")
    what = "a transformers LLaVA -> an MS-LLaVA (fresh MS-Resampler, the rest bit for bit)"
    to_ms_llava = conversions.add_parser("llava-to-ms-llava", help=what, description=what)
    to_ms_llava.add_argument("--source", required=True, help="a transformers LLaVA checkpoint folder, or a Hub id")
    to_ms_llava.add_argument("--output", required=True, help="the MS-LLaVA checkpoint folder to write")
    resampler_options(to_ms_llava)
    what = "an original LLaVA code base checkpoint -> transformers (LLaVA for mlp2x_gelu, MS-LLaVA for ms_resampler)"
    to_hf = conversions.add_parser("original-to-hf", help=what, description=what)
    source = "an original LLaVA checkpoint folder (or a stage-1 one: config.json + mm_projector.bin), or a Hub id"
    to_hf.add_argument("--source", required=True, help=source)
    to_hf.add_argument("--output", required=True, help="the transformers checkpoint folder to write")
    tower = "a transformers CLIP checkpoint (folder or Hub id): the tower's config and preprocessing, and its weights "
    tower += "when --source holds none (default: config.json's mm_vision_tower)"
    to_hf.add_argument("--vision-tower", help=tower)
    to_hf.add_argument("--base-llm", help="the language model of a stage-1 --source (folder or Hub id)")
    to_hf.add_argument("--seed", type=int, default=0, help="seed of the new <image> embedding row (default 0)")
    output_options(to_hf)


def compose_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vision-tower", required=True, help="a CLIP / SigLIP / ViT checkpoint folder or Hub id")
    parser.add_argument("--language-model", required=True, help="a causal LM checkpoint folder or Hub id")
    parser.add_argument("--output", required=True, help="the MS-LLaVA checkpoint folder to write")
    layer = "the tower layer(s) the resampler reads (-2, LLaVA-1.5's penultimate layer)"
    parser.add_argument("--vision-feature-layer", type=int, nargs="+", default=[-2], metavar="LAYER", help=layer)
    strategy = "'default' drops the CLS token, 'full' keeps every token (default: 'default' for a tower with a CLS "
    strategy += "token such as CLIP, 'full' for one without such as SigLIP)"
    parser.add_argument("--vision-feature-select-strategy", choices=("default", "full"), help=strategy)
    template = "vicuna_v1 (LLaVA-1.5), chatml (Qwen2), llm (the LLM's own, with {%% generation %%} markers) or a "
    template += "Jinja file (default: chatml for an LLM whose template is ChatML, else vicuna_v1)"
    parser.add_argument("--chat-template", metavar="NAME_OR_FILE", help=template)
    resampler_options(parser)


def push_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="a checkpoint folder written by save_pretrained (model + processor)")
    parser.add_argument("repo_id", help="the Hub repository, org/name (created if needed)")
    parser.add_argument("--dry-run", metavar="OUT", help="write exactly what would be uploaded into OUT; no network")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", help="branch to commit to (created from main if needed)")
    base = "Hub id of the model this one was built from (repeatable)"
    parser.add_argument("--base-model", action="append", help=base)
    parser.add_argument("--license", default="apache-2.0", help="the card's license (default: apache-2.0)")
    parser.add_argument("--results", help="`ms-llava eval --output`'s results file (or your own {name: score} JSON)")
    parser.add_argument("--training", help="your statement of the training: 'paper', or a JSON file with your recipe")
    parser.add_argument("--commit-message")


def eval_options(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run lmms-eval on a checkpoint; write the record `ms-llava push --results` reads (docs/evaluation.md)"
    )
    parser.add_argument("--model", required=True, help="a checkpoint folder or Hub id")
    parser.add_argument("--tasks", required=True, help="comma-separated lmms-eval tasks, e.g. pope,gqa,textvqa_val")
    parser.add_argument("--output", required=True, help="the results record (JSON) to write")
    parser.add_argument("--include-path", action="append", help="a folder of task YAMLs (local data; repeatable)")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--limit", type=positive_int, help="only the first N samples of each task (a smoke test)")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the checkpoint's own modules")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", help="e.g. cpu, cuda:0 (default: the accelerator's device)")
    parser.add_argument("--log-samples", metavar="FILE", help="write each sample's prompt, answer and score (JSONL)")
    parser.add_argument("--lmms-eval-output", metavar="FILE", help="also write lmms-eval's whole results (JSON)")


def train_options(parser: argparse.ArgumentParser) -> None:
    """The options are `MSLlavaTrainingArguments`' fields (`TrainingArguments`' among them): transformers is needed."""
    from ms_llava.training.arguments import add_arguments

    add_arguments(parser)


COMMANDS = {  # command -> (its options, the module with run(args), help line)
    "demo": (demo_options, "ms_llava.demo", "answer the default checkpoint's demo questions, draw an attention map"),
    "visualize": (visualize_options, "ms_llava.visualize", "draw one MS-Resampler query's windows and attention"),
    "chat": (chat_options, "ms_llava.chat", "talk about images with a checkpoint in the terminal, answers streamed"),
    "tiny": (tiny_options, "ms_llava.testing_utils", "write a tiny untrained checkpoint (for tests and examples)"),
    "convert": (convert_options, "ms_llava.conversion", "LLaVA -> MS-LLaVA; original LLaVA -> transformers"),
    "compose": (compose_options, "ms_llava.compose", "a vision encoder + a language model -> a new MS-LLaVA"),
    "push": (push_options, "ms_llava.hub", "upload a checkpoint to the Hugging Face Hub with a generated model card"),
    "eval": (eval_options, "ms_llava.evaluation", "evaluate a checkpoint with lmms-eval and write the results record"),
    "train": (train_options, "ms_llava.training", "train with the paper's two-stage recipe"),
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
    for name, (add_options, _, help_line) in COMMANDS.items():
        command = commands.add_parser(name, help=help_line, description=help_line)
        if name == chosen:  # only its options: train's import transformers
            add_options(command)
    args = parser.parse_args(argv)
    debug = args.show_traceback or os.environ.get(DEBUG_ENVIRONMENT_VARIABLE, "") not in ("", "0")
    try:
        return importlib.import_module(COMMANDS[args.command][1]).run(args)
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
