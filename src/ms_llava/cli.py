"""The `ms-llava` command line.

ms-llava demo [--checkpoint DIR] [--image PATH] [--question TEXT]   answer a question about an image
ms-llava tiny DIR                                                   write a tiny untrained checkpoint to DIR
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

UNTRAINED_BANNER = (
    "NOTE: no trained MS-LLaVA checkpoint ships yet, so this demo runs a tiny RANDOMLY INITIALISED model built on\n"
    "this machine. Its answers are meaningless tokens; the demo shows the full path (save_pretrained ->\n"
    "from_pretrained -> pipeline('image-text-to-text') -> generate) working end to end."
)


def write_tiny_checkpoint(directory: str | Path, seed: int = 0) -> Path:
    """Saves a tiny untrained MS-LLaVA (model, processor, remote-code modules) to `directory`."""
    from .tiny import build_tiny_checkpoint

    directory = Path(directory)
    model, processor = build_tiny_checkpoint(seed=seed)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def run_demo(checkpoint: str | None, image_path: str | None, question: str, max_new_tokens: int) -> str:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, pipeline

    import ms_llava  # noqa: F401  (registers the Auto classes)

    from .tiny import sample_image

    with tempfile.TemporaryDirectory() as scratch:
        if checkpoint is None:
            print(UNTRAINED_BANNER, flush=True)
            checkpoint = str(write_tiny_checkpoint(Path(scratch) / "ms-llava-tiny-untrained"))
        image = Image.open(image_path) if image_path else sample_image(size=96, seed=0)
        processor = AutoProcessor.from_pretrained(checkpoint)
        generator = pipeline("image-text-to-text", model=checkpoint, processor=processor, dtype=torch.float32)
        config = generator.model.config
        resampler = config.resampler_config
        print(f"checkpoint: {checkpoint}")
        print(
            f"projector: MS-Resampler M={resampler.num_queries} windows={resampler.scope_windows} "
            f"beta={resampler.scope_bias_strength} fusion={resampler.fusion}"
        )
        print(f"image: {image_path or 'built-in sample (coloured shapes)'} {image.size[0]}x{image.size[1]}")
        messages = [
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}
        ]
        result = generator(text=messages, generate_kwargs={"max_new_tokens": max_new_tokens, "do_sample": False})
        answer = result[0]["generated_text"][-1]["content"]
        print(f"question: {question}")
        print(f"answer: {answer!r}")
        return answer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ms-llava", description="MS-LLaVA: LLaVA with an MS-Resampler projector")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="answer a question about an image with a checkpoint")
    demo.add_argument("--checkpoint", help="a saved MS-LLaVA directory (default: the embedded default)")
    demo.add_argument("--image", help="an image file (default: a built-in sample)")
    demo.add_argument("--question", default="What is in the image?")
    demo.add_argument("--max-new-tokens", type=int, default=12)

    tiny = commands.add_parser("tiny", help="write a tiny untrained checkpoint (for tests and examples)")
    tiny.add_argument("directory")
    tiny.add_argument("--seed", type=int, default=0)

    from . import convert_llava, convert_original, hub, training

    convert = commands.add_parser("convert", help="convert checkpoints (LLaVA -> MS-LLaVA, original <-> HF)")
    conversions = convert.add_subparsers(dest="conversion", required=True)
    convert_llava.add_cli(conversions)
    convert_original.add_cli(conversions)
    hub.add_cli(commands)
    training.add_cli(commands)

    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.image and not Path(args.image).is_file():
            parser.error(f"--image: no such file: {args.image}")
        if args.max_new_tokens < 1:
            parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        run_demo(args.checkpoint, args.image, args.question, args.max_new_tokens)
        return 0
    if args.command == "tiny":
        print(f"wrote {write_tiny_checkpoint(args.directory, seed=args.seed)} (untrained)")
        return 0
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
