"""A checkpoint on the command line (the embedded default, loading one, asking it), and `ms-llava chat [--checkpoint
DIR] [--image PATH ...]`: a terminal session, as LLaVA's `llava.serve.cli`, whose answers stream token by token. The
conversation is kept in the checkpoint's chat template, images go into the next question; `/image PATH` adds one,
`/reset` starts over, `/quit` or the end of input ends. Without a terminal it reads a question per line, so that
`printf 'What colour?\\nHow many?\\n' | ms-llava chat --image x.png` scripts it. A question the model refuses (longer
than its context) is said in one line and the session goes on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# The embedded default checkpoint; `python -m experiments.scopebench ship` writes it.
DEFAULT_CHECKPOINT_DIR = Path(__file__).resolve().parent / "default_checkpoint"


def default_checkpoint_path() -> Path:
    """The folder of the embedded default checkpoint (`src/ms_llava/default_checkpoint/`): a trained MS-LLaVA with its
    processor, model card and `demo_samples.json`. Raises `FileNotFoundError` naming what is missing."""
    path = DEFAULT_CHECKPOINT_DIR
    missing = [name for name in ("config.json", "demo_samples.json") if not (path / name).is_file()]
    if not any(path.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise FileNotFoundError(
            f"the embedded default checkpoint is incomplete: {path} lacks {', '.join(missing)}; reinstall ms-llava "
            "from a full clone, or pass --checkpoint DIR"
        )
    return path


def load_demo_samples(checkpoint: str | Path) -> list[dict]:
    """The checkpoint's `demo_samples.json` (a list of {"image", "question", "answer", "type"}, images relative to
    the checkpoint), with `image` made absolute; [] when the checkpoint has none."""
    path = Path(checkpoint) / "demo_samples.json"
    if not path.is_file():
        return []
    samples = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(samples, list) or not all(
        isinstance(s, dict) and {"image", "question"} <= set(s) for s in samples
    ):
        raise ValueError(f"{path}: expected a list of objects with 'image' and 'question', got {samples!r:.200}")
    return [{**sample, "image": str(Path(checkpoint) / sample["image"])} for sample in samples]


def load_checkpoint(checkpoint: str | Path | None):
    """`(path, model, processor, pipeline)` for a saved MS-LLaVA (default: the embedded one; a folder or a Hub id,
    `ms_llava.checkpoints.resolve_checkpoint`), loaded with `from_pretrained` (float32) and wrapped in
    `pipeline("image-text-to-text")`; prints which, and its projector."""
    import transformers
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    # The Auto classes know "ms_llava": importing this module ran the package's __init__, which registers them.
    from .checkpoints import resolve_checkpoint

    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bars between the command's lines
    # A mistyped path, a missing file or a truncated .safetensors is a CheckpointError naming it, before
    # from_pretrained (which would try a typo as a Hub id, with retries).
    path = resolve_checkpoint(checkpoint, processor=True) if checkpoint is not None else default_checkpoint_path()
    model = AutoModelForImageTextToText.from_pretrained(path, dtype="float32").eval()
    processor = AutoProcessor.from_pretrained(path)
    generator = pipeline("image-text-to-text", model=model, processor=processor)
    resampler = model.config.resampler_config
    print(f"checkpoint: {path}")
    windows, beta = resampler.scope_windows, resampler.scope_bias_strength
    print(f"projector: MS-Resampler M={resampler.num_queries} windows={windows} beta={beta} fusion={resampler.fusion}")
    return path, model, processor, generator


def ask(generator, messages: list[dict] | str, max_new_tokens: int, image=None, streamer=None) -> str:
    """The greedy answer of `generator` (an image-text-to-text pipeline) to chat `messages`, or to one question about
    `image`; without the pipeline's leading space."""
    if isinstance(messages, str):
        messages = [
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": messages}]}
        ]
    options = {"max_new_tokens": max_new_tokens, "do_sample": False, "streamer": streamer}
    return generator(text=messages, generate_kwargs=options)[0]["generated_text"][-1]["content"].strip()


def run(args) -> int:
    from transformers import TextStreamer

    from .images import load_image

    class Streamer(TextStreamer):  # prints the answer as it is generated, without the leading space
        def on_finalized_text(self, text: str, stream_end: bool = False):
            if not getattr(self, "started", False):
                text = text.lstrip()
                self.started = bool(text)
            print(text, flush=True, end="\n" if stream_end else "")

    images = [load_image(path) for path in args.image]  # before the model loads: a bad path fails at once
    _, _, processor, generator = load_checkpoint(args.checkpoint)
    interactive, messages = sys.stdin.isatty(), []
    if interactive:
        print("Ask about the images (/image PATH adds one, /reset starts over, /quit ends).")
    for line in _until_eof(iter(lambda: input("USER: "), None) if interactive else sys.stdin):
        question = line.strip()
        if question in ("/quit", "/exit"):
            break
        if question == "/reset":
            messages, images = [], []
        elif question.startswith("/image "):
            try:
                images.append(load_image(question.removeprefix("/image ").strip()))
            except ValueError as error:
                _say(error, "no image added")
        elif question:
            if not interactive:
                print(f"USER: {question}")
            content = [*({"type": "image", "image": image} for image in images), {"type": "text", "text": question}]
            turn = {"role": "user", "content": content}
            streamer = Streamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
            print("ASSISTANT: ", end="", flush=True)
            try:
                answer = ask(generator, [*messages, turn], args.max_new_tokens, streamer=streamer)
            except ValueError as error:  # the model refuses a conversation beyond its context: the session goes on
                print(flush=True)
                _say(error, "question not kept; /reset starts over")
                continue
            messages += [turn, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
            images = []
    return 0


def _say(error: Exception, what_now: str) -> None:
    print(f"ms-llava chat: error: {' '.join(str(error).split())} ({what_now})", file=sys.stderr, flush=True)


def _until_eof(lines):
    try:
        yield from lines
    except EOFError:  # Ctrl-D at the prompt
        print()
