"""A synthetic "coloured shapes" data set in LLaVA's JSON format, for tests and examples of training (no download).

Each image is one filled circle or square in one of four colours on a light background, at a random place and size.
Two tasks mirror the paper's two training stages (Sec. 4.1), a third stands in for the pre-trained LLM:

- ``caption`` (stage 1, projector pre-training): ``<image>`` + "Describe the picture." -> "A red circle."
- ``qa`` (stage 2, instruction tuning): two turns, "What colour is the shape?" -> "red", then "What shape is it?" ->
  "circle".
- ``text`` (no image): the words "red circle" where the image would be, then the caption and both questions in one
  conversation. A randomly initialised tiny LLM predicts near-uniform tokens whatever its input (its small output
  weights bound the logits), so a projector alone cannot lower its loss; a short text-only fine-tune on ``text``
  first gives it the language of the task and the habit of reading what precedes the prompt, as Vicuna brings its
  own to the paper's stage 1.

`write_shapes_dataset` writes the images (PNG) and the LLaVA JSON; `answer_accuracy` measures how many answers of a
``qa`` file a model gets exactly right with greedy decoding. ``python -m ms_llava.tiny_shapes write DIR`` writes the
files used in ``docs/training.md``, ``python -m ms_llava.tiny_shapes accuracy CHECKPOINT QA_FILE`` scores a model.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "blue": (40, 90, 220), "green": (40, 170, 60), "yellow": (230, 190, 30)}
SHAPES = ("circle", "square")
CAPTION_PROMPT = "Describe the picture."
COLOUR_QUESTION = "What colour is the shape?"
SHAPE_QUESTION = "What shape is it?"


def draw_shape(colour: str, shape: str, rng: random.Random, size: int = 32) -> Image.Image:
    """One `shape` filled with `colour` (lightly jittered) at a random place and size on a light grey background."""
    image = Image.new("RGB", (size, size), (235, 235, 235))
    extent = rng.randint(size * 2 // 5, size * 3 // 4)
    left, top = rng.randint(0, size - extent), rng.randint(0, size - extent)
    fill = tuple(min(255, max(0, channel + rng.randint(-20, 20))) for channel in COLOURS[colour])
    box = (left, top, left + extent - 1, top + extent - 1)
    (ImageDraw.Draw(image).ellipse if shape == "circle" else ImageDraw.Draw(image).rectangle)(box, fill=fill)
    return image


def shapes_records(
    task: str, num_records: int, seed: int, id_prefix: str | None = None
) -> list[tuple[dict, Image.Image]]:
    """`num_records` (LLaVA record, image) pairs; colours and shapes cycle so that every class is equally frequent."""
    if task not in ("caption", "qa", "text"):
        raise ValueError(f"task must be 'caption', 'qa' or 'text', got {task!r}")
    rng = random.Random(seed)
    classes = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    prefix = id_prefix or f"{task}-{seed}"
    pairs = []
    for index in range(num_records):
        colour, shape = classes[index % len(classes)]
        record_id = f"{prefix}-{index:05d}"
        caption = [{"from": "human", "value": CAPTION_PROMPT}, {"from": "gpt", "value": f"A {colour} {shape}."}]
        questions = [
            {"from": "human", "value": COLOUR_QUESTION},
            {"from": "gpt", "value": colour},
            {"from": "human", "value": SHAPE_QUESTION},
            {"from": "gpt", "value": shape},
        ]
        conversations = {"caption": caption, "qa": questions, "text": caption + questions}[task]
        record = {"id": record_id, "conversations": conversations}
        image = draw_shape(colour, shape, rng)
        # The image goes first in the first turn; in `text`, the words it shows stand in its place.
        first = f"{colour} {shape}" if task == "text" else "<image>"
        conversations[0]["value"] = f"{first}\n{conversations[0]['value']}"
        if task != "text":
            record["image"] = f"{record_id}.png"
        pairs.append((record, image))
    rng.shuffle(pairs)
    return pairs


def write_shapes_dataset(directory: str | Path, task: str, num_records: int, seed: int = 0) -> Path:
    """Writes `num_records` records of `task` as `DIRECTORY/<task>-<seed>.json` (LLaVA format) with their images in
    `DIRECTORY/images/` (none for ``text``), and returns the JSON's path. Use `DIRECTORY/images` as the image folder."""
    return write_records(directory, f"{task}-{seed}", shapes_records(task, num_records, seed))


def write_records(directory: str | Path, name: str, pairs) -> Path:
    """Writes (LLaVA record, image) `pairs` as `DIRECTORY/<name>.json` with the images of the records that have one
    in `DIRECTORY/images/`, and returns the JSON's path."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    for record, image in pairs:
        if "image" in record:
            image.save(directory / "images" / record["image"])
    path = directory / f"{name}.json"
    path.write_text(json.dumps([record for record, _ in pairs], indent=1), encoding="utf-8")
    return path


@torch.no_grad()
def answer_accuracy(model, processor, data_path: str | Path, image_folder: str | Path, batch_size: int = 16) -> float:
    """Exact-match accuracy of greedy answers on every question of a ``qa`` file written by `write_shapes_dataset`.

    Each question is asked with the conversation before it (the image, and for the second question the first
    question and its reference answer), as in training; an answer counts when the generated text, stripped, equals
    the reference.
    """
    records = json.loads(Path(data_path).read_text(encoding="utf-8"))
    prompts, images, references = [], [], []
    for record in records:
        image = Image.open(Path(image_folder) / record["image"]).convert("RGB")
        history = []
        for question, answer in zip(record["conversations"][::2], record["conversations"][1::2], strict=True):
            text = question["value"].replace("<image>", "").strip()
            content = ([{"type": "image"}] if "<image>" in question["value"] else []) + [
                {"type": "text", "text": text}
            ]
            history.append({"role": "user", "content": content})
            prompts.append(processor.apply_chat_template(history, add_generation_prompt=True))
            images.append(image)
            references.append(answer["value"])
            history.append({"role": "assistant", "content": [{"type": "text", "text": answer["value"]}]})
    model.eval()
    correct = 0
    for start in range(0, len(prompts), batch_size):
        inputs = processor(
            images=images[start : start + batch_size],
            text=prompts[start : start + batch_size],
            padding=True,  # the tokenizer's padding side: left in ms_llava.tiny's, as batched generation needs
            return_tensors="pt",
        ).to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        answers = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += sum(
            answer.strip() == reference
            for answer, reference in zip(answers, references[start : start + batch_size], strict=True)
        )
    return correct / len(prompts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ms_llava.tiny_shapes",
        description="The synthetic coloured-shapes data used in docs/training.md: write it, or score a model on it.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="write the text, caption, qa and held-out qa files and the images")
    write.add_argument("directory")
    write.add_argument("--records", type=int, default=96, help="records per training file (default 96)")
    write.add_argument("--held-out-records", type=int, default=32, help="held-out qa records (default 32)")
    score = commands.add_parser("accuracy", help="exact-match accuracy of greedy answers on a qa file")
    score.add_argument("checkpoint")
    score.add_argument("data", help="a qa file written by `write`")
    score.add_argument("--image-folder", help="default: images/ next to the data file")
    args = parser.parse_args(argv)
    if args.command == "write":
        for task, count, seed in (
            ("text", args.records, 3),
            ("caption", args.records, 0),
            ("qa", args.records, 1),
            ("qa", args.held_out_records, 2),
        ):
            print(write_shapes_dataset(args.directory, task, count, seed=seed))
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        import ms_llava  # noqa: F401  (registers the Auto classes)

        model = AutoModelForImageTextToText.from_pretrained(args.checkpoint)
        processor = AutoProcessor.from_pretrained(args.checkpoint)
        image_folder = args.image_folder or Path(args.data).parent / "images"
        print(f"{answer_accuracy(model, processor, args.data, image_folder):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
