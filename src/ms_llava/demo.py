"""`ms-llava demo`: load a saved MS-LLaVA (by default the embedded one, `default_checkpoint/`) with `from_pretrained`
and `pipeline("image-text-to-text")`, answer its demo questions (or one given), and draw where one MS-Resampler query
looks (`ms_llava.visualize`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .chat import ask, default_checkpoint_path, load_checkpoint, load_demo_samples
from .visualize import draw_attention, query_options

DEFAULT_QUESTION = "What is in the image?"
DEMO_OUTPUT = "ms-llava-demo.png"


def print_measured_accuracy(checkpoint: str | Path) -> None:
    """Prints the checkpoint's held-out accuracy by question type (its `scopebench_result.json`, written when
    ScopeBench ships a model), next to chance, so that a few right demo answers are not read as more than they are."""
    path = Path(checkpoint) / "scopebench_result.json"
    if not path.is_file():
        return
    result = json.loads(path.read_text(encoding="utf-8"))
    accuracy, chance = result.get("single_turn_accuracy_by_type", {}), result.get("chance_by_type", {})
    cells = (
        f"{kind} {100 * value:.1f}% (chance {100 * chance.get(kind, 0):.1f}%)" for kind, value in accuracy.items()
    )
    print(f"held-out ScopeBench test accuracy of this checkpoint: {'; '.join(cells)}")
    print(
        "  (a toy model; the demo samples below are held-out questions of the types it learned, picked among those "
        "it answers right: experiments/scopebench/README.md)"
    )


def run_demo(
    checkpoint=None, image_path=None, question=None, max_new_tokens=12, output=DEMO_OUTPUT, query=None, query_at=None
) -> list[dict]:
    """`ms-llava demo`: answers the checkpoint's demo samples (or one image/question given instead), prints question,
    expected answer, answer and right or wrong, and draws one query's attention for the first sample. Returns the
    samples with their answers."""
    from .images import load_image

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
            image, shown = load_image(sample["image"]), sample["image"]
        text = sample["question"] or DEFAULT_QUESTION
        answer = ask(generator, text, max_new_tokens, image=image)
        expected = sample.get("answer")
        print(f"[{index}/{len(samples)}] image: {shown} ({image.size[0]}x{image.size[1]})")
        print(f"  question: {text}")
        if expected is not None:
            print(f"  expected: {expected}")
        verdict = "" if expected is None else "  RIGHT" if answer == str(expected).strip() else "  WRONG"
        print(f"  answer:   {answer!r}{verdict}")
        results.append({**sample, "question": text, "predicted": answer, "image_object": image})
    scored = [r for r in results if r.get("answer") is not None]
    if scored:
        print(f"correct: {sum(r['predicted'] == str(r['answer']).strip() for r in scored)}/{len(scored)}")
    first = results[0]
    notes = [f"Q: {first['question']}   A: {first['predicted']}"]
    draw_attention(model, processor, first["image_object"], output, query=query, query_at=query_at, notes=notes)
    return results


def run(args: argparse.Namespace) -> int:
    run_demo(args.checkpoint, args.image, args.question, args.max_new_tokens, **query_options(args))
    return 0


__all__ = ["default_checkpoint_path", "run_demo"]
