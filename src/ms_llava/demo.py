"""`ms-llava demo` and `ms-llava visualize`: load a saved MS-LLaVA (by default the embedded one, `default_checkpoint/`)
with `from_pretrained` and `pipeline("image-text-to-text")`, answer questions about images, and draw where one
MS-Resampler query looks (`ms_llava.visualize`)."""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT_QUESTION = "What is in the image?"
DEMO_OUTPUT = "ms-llava-demo.png"
VISUALIZE_OUTPUT = "ms-llava-attention.png"
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
    checkpoint = Path(checkpoint)
    path = checkpoint / "demo_samples.json"
    if not path.is_file():
        return []
    samples = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(samples, list) or not all(
        isinstance(s, dict) and "image" in s and "question" in s for s in samples
    ):
        raise ValueError(f"{path}: expected a list of objects with 'image' and 'question', got {samples!r:.200}")
    return [{**sample, "image": str(checkpoint / sample["image"])} for sample in samples]


def load_checkpoint(checkpoint: str | Path | None):
    """`(path, model, processor, pipeline)` for a saved MS-LLaVA (default: the embedded one; a folder or a Hub id,
    `ms_llava.checkpoints.resolve_checkpoint`), loaded with `from_pretrained` (float32) and wrapped in
    `pipeline("image-text-to-text")`."""
    import torch
    import transformers
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    # The Auto classes know "ms_llava": importing this module ran the package's __init__, which registers them (an
    # explicit `import ms_llava` here would be an import cycle, since __init__ imports default_checkpoint_path).
    from .checkpoints import resolve_checkpoint

    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bars between the demo's lines
    # A folder, or a Hub id downloaded once here; a mistyped path, a missing file or a truncated .safetensors is a
    # CheckpointError naming it, before from_pretrained (which would try a typo as a Hub id, with retries).
    path = resolve_checkpoint(checkpoint, processor=True) if checkpoint is not None else default_checkpoint_path()
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    generator = pipeline("image-text-to-text", model=model, processor=processor)
    resampler = model.config.resampler_config
    print(f"checkpoint: {path}")
    print(
        f"projector: MS-Resampler M={resampler.num_queries} windows={resampler.scope_windows} "
        f"beta={resampler.scope_bias_strength} fusion={resampler.fusion}"
    )
    return path, model, processor, generator


def ask(generator, image, question: str, max_new_tokens: int) -> str:
    """The greedy answer of `generator` (an image-text-to-text pipeline) to `question` about `image`."""
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    result = generator(text=messages, generate_kwargs={"max_new_tokens": max_new_tokens, "do_sample": False})
    return result[0]["generated_text"][-1]["content"].strip()


def open_image(path: str | Path):
    """The image at `path` as the processor should see it: fully decoded, EXIF-upright, mode kept (`ValueError`
    naming the file when it cannot be read)."""
    from .images import load_image

    return load_image(path)


def _printable(text: str) -> str:
    """`text` for the PNG's header: characters the font cannot show (an untrained model's bytes) become '?'."""
    return "".join(c if c.isprintable() else "?" for c in text)


def draw_attention(model, processor, image, output, query=None, query_at=None, notes=()):
    """Writes the attention PNG and prints where, for which query, and each branch's mass inside its window."""
    from .visualize import visualize

    result = visualize(model, processor, image, output, query=query, query_at=query_at, notes=notes)
    print(
        f"attention map: {Path(output).resolve()} (query {result.query} of {result.num_queries}, anchor "
        f"row {result.anchor[0]:g} col {result.anchor[1]:g} on the {result.grid_size[0]}x{result.grid_size[1]} grid)"
    )
    for branch in result.branches:
        cls = f", CLS {100 * branch.prefix_mass:.1f}%" if result.num_prefix_tokens else ""
        print(f"  k={branch.window}: {100 * branch.mass_inside:.1f}% of the attention inside the window{cls}")
    return result


def print_measured_accuracy(checkpoint: str | Path) -> None:
    """Prints the checkpoint's held-out accuracy by question type (its `scopebench_result.json`, written when
    ScopeBench ships a model), next to chance, so that a few right demo answers are not read as more than they are."""
    path = Path(checkpoint) / "scopebench_result.json"
    if not path.is_file():
        return
    result = json.loads(path.read_text(encoding="utf-8"))
    accuracy, chance = result.get("single_turn_accuracy_by_type", {}), result.get("chance_by_type", {})
    cells = [
        f"{kind} {100 * value:.1f}% (chance {100 * chance.get(kind, 0):.1f}%)" for kind, value in accuracy.items()
    ]
    print(f"held-out ScopeBench test accuracy of this checkpoint: {'; '.join(cells)}")
    print(
        "  (a toy model; the demo samples below are held-out questions of the types it learned, picked among those "
        "it answers right: experiments/scopebench/README.md)"
    )


def run_demo(
    checkpoint: str | None = None,
    image_path: str | None = None,
    question: str | None = None,
    max_new_tokens: int = 12,
    output: str | Path = DEMO_OUTPUT,
    query: int | None = None,
    query_at: tuple[float, float] | None = None,
) -> list[dict]:
    """`ms-llava demo`: answers the checkpoint's demo samples (or one image/question given instead), prints question,
    expected answer, answer and right or wrong, and draws one query's attention for the first sample. Returns the
    samples with their answers."""
    path, model, processor, generator = load_checkpoint(checkpoint)
    print_measured_accuracy(path)
    samples = load_demo_samples(path)
    if image_path is not None or question is not None or not samples:
        first = samples[0] if samples else {}
        sample = {"image": image_path or first.get("image"), "question": question or first.get("question")}
        if sample["image"] == first.get("image") and sample["question"] == first.get("question"):
            sample.update(answer=first.get("answer"), type=first.get("type"))
        samples = [sample]
    results = []
    for index, sample in enumerate(samples, 1):
        if sample["image"] is None:
            from .testing_utils import sample_image

            image, shown = sample_image(size=96, seed=0), "built-in sample (coloured shapes)"
        else:
            image, shown = open_image(sample["image"]), sample["image"]
        text = sample["question"] or DEFAULT_QUESTION
        answer = ask(generator, image, text, max_new_tokens)
        expected = sample.get("answer")
        print(f"[{index}/{len(samples)}] image: {shown} ({image.size[0]}x{image.size[1]})")
        print(f"  question: {text}")
        if expected is not None:
            verdict = "RIGHT" if answer == str(expected).strip() else "WRONG"
            print(f"  expected: {expected}")
            print(f"  answer:   {answer!r}  {verdict}")
        else:
            print(f"  answer:   {answer!r}")
        results.append({**sample, "question": text, "predicted": answer, "image_object": image})
    scored = [r for r in results if r.get("answer") is not None]
    if scored:
        right = sum(r["predicted"] == str(r["answer"]).strip() for r in scored)
        print(f"correct: {right}/{len(scored)}")
    first = results[0]
    draw_attention(
        model,
        processor,
        first["image_object"],
        output,
        query=query,
        query_at=query_at,
        notes=[f"Q: {first['question']}   A: {_printable(first['predicted'])}"],
    )
    return results


def run_visualize(
    checkpoint: str | None,
    image_path: str | None,
    question: str | None,
    output: str | Path = VISUALIZE_OUTPUT,
    query: int | None = None,
    query_at: tuple[float, float] | None = None,
    max_new_tokens: int = 12,
):
    """`ms-llava visualize`: draws one query's per-branch attention (answers `question` first, when given)."""
    path, model, processor, generator = load_checkpoint(checkpoint)
    if image_path is None:
        samples = load_demo_samples(path)
        if not samples:
            raise ValueError(f"--image is required: {path} has no demo_samples.json to take an image from")
        image_path = samples[0]["image"]
    image = open_image(image_path)
    print(f"image: {image_path} ({image.size[0]}x{image.size[1]})")
    notes = []
    if question is not None:
        answer = ask(generator, image, question, max_new_tokens)
        print(f"question: {question}")
        print(f"answer: {answer!r}")
        notes.append(f"Q: {question}   A: {_printable(answer)}")
    return draw_attention(model, processor, image, output, query=query, query_at=query_at, notes=notes)
