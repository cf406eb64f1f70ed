"""A synthetic spatial-relation task and the ScAle evidence experiment (docs/scale.md), on the tiny MS-LLaVA.

Each 32 x 32 image shows a circle and a square of two different colours, one left of, right of, above or below the
other (separated along that axis, roughly aligned along the other). The question is always "Where is the circle
relative to the square?" and the answer one word: ``left``, ``right``, ``above`` or ``below`` (equally frequent).

The experiment, for each seed:

1. a small MS-LLaVA trained on the *general* task: `docs/training.md`'s tiny recipe (text warm-up, stage 1 on
   captions, stage 2), where stage 2's data are the colour / shape questions of `ms_llava.testing_utils` plus a small
   share of spatial questions (as LLaVA-1.5's instruction mix holds some), and the warm-up text also has the spatial
   answer words;
2. that model frozen, scored on the spatial test split (exact match of the greedy answer);
3. a ScAle adapter (`ms-llava train --adapter scale`) and a LoRA adapter (`--lora`) trained on the spatial training
   split from it, each scored on the same test split.

``python -m experiments.spatial_scale run OUT --seeds 0 1 2`` runs it and writes ``OUT/results.json`` and a Markdown table;
``python -m experiments.spatial_scale write DIR`` only writes the data.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ms_llava.testing_utils import COLOURS, answer_accuracy, write_records, write_shapes_dataset

RELATIONS = ("left", "right", "above", "below")
QUESTION = "Where is the circle relative to the square?"
# The circle is always red and the square blue (None: two random colours, see docs/scale.md: too hard for the tiny
# model, whose full fine-tune stays at chance on it).
FIXED_COLOURS = ("red", "blue")


def draw_pair(relation: str, circle_colour: str, square_colour: str, rng: random.Random, size: int = 32):
    """A circle and a square, the circle `relation` of the square, on a light grey background."""
    image = Image.new("RGB", (size, size), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    extent = rng.randint(size // 4, size * 3 // 8)  # 8..12 px on 32 px
    gap = rng.randint(1, 3)
    free = size - 2 * extent - gap  # room left along the separating axis
    first = rng.randint(0, free)  # the shape that comes first (left / top)
    second = first + extent + gap + rng.randint(0, free - first)
    across = rng.randint(0, size - extent)
    jitter = max(0, min(size - extent, across + rng.randint(-3, 3)))
    circle_first = relation in ("left", "above")
    along = (first, second) if circle_first else (second, first)  # circle, square along the separating axis
    horizontal = relation in ("left", "right")
    boxes = []
    for position, cross in zip(along, (across, jitter), strict=True):
        x, y = (position, cross) if horizontal else (cross, position)
        boxes.append((x, y, x + extent - 1, y + extent - 1))

    def fill(colour):
        return tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[colour])

    draw.ellipse(boxes[0], fill=fill(circle_colour))
    draw.rectangle(boxes[1], fill=fill(square_colour))
    return image


def spatial_records(
    num_records: int, seed: int, task: str = "qa", id_prefix: str | None = None, fixed_colours=FIXED_COLOURS
):
    """`num_records` (LLaVA record, image) pairs; relations cycle so that every answer is equally frequent. ``task``:
    ``qa`` (image + question -> one word) or ``text`` (the words "red circle left of blue square" in place of the
    image, for the LLM warm-up)."""
    if task not in ("qa", "text"):
        raise ValueError(f"task must be 'qa' or 'text', got {task!r}")
    rng = random.Random(seed)
    prefix = id_prefix or f"spatial-{task}-{seed}"
    colours = list(COLOURS)
    pairs = []
    for index in range(num_records):
        relation = RELATIONS[index % len(RELATIONS)]
        circle_colour, square_colour = fixed_colours or rng.sample(colours, 2)
        record_id = f"{prefix}-{index:05d}"
        image = draw_pair(relation, circle_colour, square_colour, rng)
        words = {"left": "left of", "right": "right of", "above": "above", "below": "below"}[relation]
        first = f"{circle_colour} circle {words} {square_colour} square" if task == "text" else "<image>"
        record = {
            "id": record_id,
            "conversations": [
                {"from": "human", "value": f"{first}\n{QUESTION}"},
                {"from": "gpt", "value": relation},
            ],
        }
        if task == "qa":
            record["image"] = f"{record_id}.png"
        pairs.append((record, image))
    rng.shuffle(pairs)
    return pairs


def write_spatial_data(directory: str | Path, seed: int = 0, train: int = 128, test: int = 256, general: int = 96):
    """Writes, under `directory`: the general task's files (`ms_llava.testing_utils` shapes `text`, `caption`, `qa`; spatial `text` mixed
    into the warm-up, `general` spatial questions mixed into stage 2) and the spatial `train` / `test` splits. Every
    split draws from its own seed, derived from `seed`. Returns a dict of paths."""
    directory = Path(directory)
    base = 1000 * seed
    shapes_text = json.loads(write_shapes_dataset(directory, "text", 96, seed=base + 3).read_text())
    spatial_text = [record for record, _ in spatial_records(48, base + 13, task="text")]
    warm_up = directory / "warm-up.json"
    mixed = shapes_text + spatial_text
    random.Random(base + 23).shuffle(mixed)
    warm_up.write_text(json.dumps(mixed, indent=1), encoding="utf-8")
    caption = write_shapes_dataset(directory, "caption", 96, seed=base)
    shapes_qa = json.loads(write_shapes_dataset(directory, "qa", 96, seed=base + 1).read_text())
    general_spatial = json.loads(
        write_records(directory, "spatial-general", spatial_records(general, base + 11)).read_text()
    )
    stage2 = shapes_qa + general_spatial
    random.Random(base + 21).shuffle(stage2)
    general_path = directory / "general.json"
    general_path.write_text(json.dumps(stage2, indent=1), encoding="utf-8")
    return {
        "warm-up": warm_up,
        "caption": caption,
        "general": general_path,
        "train": write_records(directory, "spatial-train", spatial_records(train, base + 12)),
        "test": write_records(directory, "spatial-test", spatial_records(test, base + 14)),
        "images": directory / "images",
    }


# The tiny recipe of docs/training.md (its learning rates and epochs), then the adapters.
GENERAL_RECIPE = (
    ("warm-up", "finetune", {"global_batch_size": 8, "learning_rate": 1e-2, "num_train_epochs": 10}),
    ("caption", "pretrain", {"global_batch_size": 8, "learning_rate": 1e-2, "num_train_epochs": 8}),
    ("general", "finetune", {"global_batch_size": 8, "learning_rate": 3e-3, "num_train_epochs": 10}),
)
ADAPTER_RUNS = {
    "ScAle": {"adapter": "scale", "learning_rate": 5e-2},
    "ScAle (all tokens)": {"adapter": "scale", "learning_rate": 5e-2, "scale_token_scope": "all"},
    "LoRA": {"lora": True, "lora_r": 8, "lora_alpha": 16, "learning_rate": 1e-3, "projector_learning_rate": 1e-3},
}
OUTPUT_NAMES = {"ScAle": "scale", "ScAle (all tokens)": "scale-all", "LoRA": "lora"}
ADAPTER_COMMON = {"global_batch_size": 8, "num_train_epochs": 10}
RUN = {"warmup_ratio": 0.1, "dataloader_num_workers": 0, "save_steps": 10_000, "logging_steps": 4}


def _score(model, processor, paths) -> float:
    return answer_accuracy(model, processor, paths["test"], paths["images"])


def _adapter_parameters(adapter_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as handle:
        return sum(_numel(handle, key) for key in handle.keys())


def _numel(handle, key) -> int:
    size = 1
    for dimension in handle.get_slice(key).get_shape():
        size *= dimension
    return size


def run_seed(out: Path, seed: int, general: int = 96, train_records: int = 128, log=print) -> dict:
    """The whole experiment for one seed (data, general model, frozen / ScAle / LoRA scores)."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ms_llava.testing_utils import build_tiny_checkpoint
    from ms_llava.training import train
    from ms_llava.tuners import scale as _scale  # noqa: F401  (registers ScAle with PEFT)

    out = Path(out) / f"seed-{seed}"
    paths = write_spatial_data(out / "data", seed=seed, train=train_records, general=general)
    model, processor = build_tiny_checkpoint(seed=seed)
    model.save_pretrained(out / "untrained")
    processor.save_pretrained(out / "untrained")
    checkpoint = out / "untrained"
    timings = {}
    for name, stage, settings in GENERAL_RECIPE:
        started = time.perf_counter()
        image_folder = None if name == "warm-up" else paths["images"]
        train(checkpoint, stage, paths[name], image_folder, out / name, seed=seed, **settings, **RUN)
        timings[name] = time.perf_counter() - started
        checkpoint = out / name
    base = AutoModelForImageTextToText.from_pretrained(checkpoint)
    processor = AutoProcessor.from_pretrained(checkpoint)
    result = {"seed": seed, "frozen": {"accuracy": _score(base, processor, paths), "parameters": 0}}
    result["general_qa_accuracy"] = answer_accuracy(base, processor, paths["general"], paths["images"])
    log(f"seed {seed}: frozen general model: spatial test {result['frozen']['accuracy']:.3f}")
    for label, settings in ADAPTER_RUNS.items():
        started = time.perf_counter()
        run = train(
            checkpoint,
            "finetune",
            paths["train"],
            paths["images"],
            out / OUTPUT_NAMES[label],
            seed=seed,
            **ADAPTER_COMMON,
            **settings,
            **RUN,
        )
        timings[label] = time.perf_counter() - started
        base = AutoModelForImageTextToText.from_pretrained(checkpoint)
        adapted = PeftModel.from_pretrained(base, run.output_dir).eval()
        result[label] = {
            "accuracy": _score(adapted, processor, paths),
            "parameters": _adapter_parameters(run.output_dir),
            "final_loss": run.losses[-1][1] if run.losses else None,
        }
        log(
            f"seed {seed}: {label}: spatial test {result[label]['accuracy']:.3f}, {result[label]['parameters']} params"
        )
    result["train_seconds"] = timings
    return result


def summarise(results: list[dict]) -> str:
    """A Markdown table: trainable parameters, per-seed accuracy, mean and sample standard deviation."""
    seeds = [r["seed"] for r in results]
    lines = [
        "| method | trainable parameters | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | std |",
        "|---|---|" + "---|" * len(seeds) + "---|---|",
    ]
    for label in ("frozen", *ADAPTER_RUNS):
        values = [r[label]["accuracy"] for r in results]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        params = sorted({r[label]["parameters"] for r in results})
        lines.append(
            f"| {label} | {', '.join(f'{p:,}' for p in params)} | "
            + " | ".join(f"{v:.3f}" for v in values)
            + f" | {statistics.mean(values):.3f} | {spread:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.spatial_scale", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="write the general-task and spatial data for one seed")
    write.add_argument("directory")
    write.add_argument("--seed", type=int, default=0)
    run = commands.add_parser("run", help="the frozen / ScAle / LoRA comparison (docs/scale.md)")
    run.add_argument("output_dir")
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    run.add_argument("--general-spatial", type=int, default=96, help="spatial records in the general mix (96)")
    run.add_argument("--train-records", type=int, default=128, help="spatial training records (128)")
    args = parser.parse_args(argv)
    if args.command == "write":
        for name, path in write_spatial_data(args.directory, seed=args.seed).items():
            print(f"{name}: {path}")
        return 0
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    results = [
        run_seed(Path(args.output_dir), seed, general=args.general_spatial, train_records=args.train_records)
        for seed in args.seeds
    ]
    table = summarise(results)
    wall = time.perf_counter() - started
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / "results.json").write_text(
        json.dumps({"results": results, "wall_seconds": wall}, indent=1), encoding="utf-8"
    )
    (Path(args.output_dir) / "results.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    print(f"wall time {wall:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
