"""ScopeBench: a deterministic synthetic benchmark whose questions need visual evidence at different scopes.

Each image is 336 x 336 pixels, so a CLIP-like tower with 14-pixel patches sees a 24 x 24 grid. It shows two to five
objects on a light background; every object fills a 3 x 3 block of patches (42 x 42 pixels) aligned to the patch
grid and has a colour of its own (six colours) and a shape (circle, square, triangle). Exactly one object, the
*marked* one, carries a small black digit (1-9) drawn in a 5 x 7 pixel bitmap font at its centre: the digit covers a
few pixels of one patch. Five questions per image, each with a one-word answer, at three scopes:

- ``fine`` (a few pixels of one patch): "What digit is in the picture?" -> "7".
- ``attribute`` (one object, 3 x 3 patches): "What colour is the object with the digit?" -> "blue", "What shape is
  the object with the digit?" -> "circle".
- ``global`` (the whole image): "How many objects are there?" -> "four"; "Are there more objects on the left or on
  the right?" -> "left" (objects lie wholly in one half; one half always holds more).

No question names an object by its colour or shape: a first design did ("What digit is on the red object?"), and
the tiny language models that fit this CPU budget did not learn that two-step look-up in a few hundred steps (they
stayed at chance, README.md here); the questions above need one look-up per question type, so what the projector
keeps of the evidence decides the answer.

Answers are balanced by construction (`balanced`): in every block of 9 consecutive images the digit takes each value
once, likewise counts over 4, colours over 6, shapes over 3, the layout answer over 2, in orders shuffled per block
and per question type so that no answer predicts another. Splits come from disjoint seeds (``SPLIT_SEEDS``); image i
of a split is drawn by `random.Random(f"scopebench-{seed}-{i}")` alone, so the same seed gives the same bytes on any
machine (PIL draws only axis-aligned ellipses, rectangles and polygons, and the digits are our own bitmaps: no
fonts).

Files (LLaVA JSON, images relative to ``images/``):

- ``caption-<split>.json`` (stage 1): ``<image>`` + "Describe the picture." -> "red square 7, blue circle." (objects
  from left to right, the digit after the marked one).
- ``qa-<split>.json`` (stage 2 and evaluation): one record per question, ``<image>`` + the question -> the answer
  (each question asked alone, as ``ms-llava demo`` asks); each record also has ``types`` (its question type) and
  ``scene`` (the generator's description).
- ``text-<split>.json`` (the language model's text-only warm-up), six records per image: the caption's words stand
  where the image would be, then the caption and the five questions in one conversation; and each question alone
  after the caption's words (the form in which stage 2 asks it).

`question_type_accuracy` scores a model with greedy exact match per question type (batched generation). The model
parts live in `models`, the runs in `runs`; ``python -m experiments.scopebench --help`` lists the commands (README.md
here).
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

IMAGE_SIZE = 336
PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 24
BLOCK = 3  # an object fills BLOCK x BLOCK patches
BACKGROUND = (236, 236, 232)
COLOURS = {
    "red": (215, 45, 40),
    "green": (45, 165, 70),
    "blue": (45, 85, 215),
    "yellow": (230, 200, 35),
    "purple": (145, 65, 195),
    "orange": (240, 135, 30),
}
SHAPES = ("circle", "square", "triangle")
DIGITS = tuple(str(d) for d in range(1, 10))
COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}
SPLIT_SEEDS = {"train": 1000, "val": 2000, "test": 3000, "encoder": 4000}
QUESTION_TYPES = ("attribute_colour", "attribute_shape", "fine_digit", "global_count", "global_layout")
SCOPES = {"attribute_colour": "attribute", "attribute_shape": "attribute", "fine_digit": "fine"}
SCOPES.update({"global_count": "global", "global_layout": "global"})
CAPTION_PROMPT = "Describe the picture."
ANSWER_COUNTS = {"attribute_colour": 6, "attribute_shape": 3, "fine_digit": 9, "global_count": 4, "global_layout": 2}

# 5 x 7 bitmaps of the digits 1-9 (rows top to bottom, '#' = ink).
FONT = {
    "1": ["..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."],
    "2": [".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"],
    "3": ["####.", "....#", "....#", ".###.", "....#", "....#", "####."],
    "4": ["...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."],
    "5": ["#####", "#....", "####.", "....#", "....#", "#...#", ".###."],
    "6": [".###.", "#....", "#....", "####.", "#...#", "#...#", ".###."],
    "7": ["#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."],
    "8": [".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."],
    "9": [".###.", "#...#", "#...#", ".####", "....#", "....#", ".###."],
}


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    digit: str
    row: int  # top-left patch of the object's BLOCK x BLOCK block
    col: int

    @property
    def centre(self) -> tuple[float, float]:
        """(row, col) of the block's centre, in patches."""
        return self.row + BLOCK / 2, self.col + BLOCK / 2


@dataclass(frozen=True)
class Question:
    type: str
    question: str
    answer: str


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    questions: tuple[Question, ...]

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects]}

    def caption(self) -> str:
        ordered = sorted(self.objects, key=lambda o: (o.col, o.row))
        return ", ".join(f"{o.colour} {o.shape}" + (f" {o.digit}" if o.digit else "") for o in ordered) + "."


def side(obj: SceneObject) -> str:
    """The half of the image ("left" or "right") that holds the object's block centre."""
    return "left" if obj.centre[1] < GRID / 2 else "right"


def patch_cell(row: int, col: int, cells_per_side: int) -> int:
    """Raster index of the cell that holds patch (row, col) when the GRID x GRID patches are cut into
    `cells_per_side` x `cells_per_side` equal cells (MS-Resampler's query cells for M = cells_per_side ** 2)."""
    if cells_per_side < 1 or GRID % cells_per_side:
        raise ValueError(f"the cells must divide the {GRID} x {GRID} patch grid, got {cells_per_side} per side")
    per_cell = GRID // cells_per_side
    return (row // per_cell) * cells_per_side + col // per_cell


def centre_patch(obj: dict) -> tuple[int, int]:
    """(row, col) of the centre patch of an object's block (a scene dict's object): where its digit is drawn."""
    return obj["row"] + BLOCK // 2, obj["col"] + BLOCK // 2


def scenes_by_image(qa_path: str | Path) -> dict[str, dict]:
    """{image file: scene dict} of a `qa-<split>.json`, in the file's order."""
    scenes: dict[str, dict] = {}
    for record in json.loads(Path(qa_path).read_text(encoding="utf-8")):
        scenes.setdefault(record["image"], record["scene"])
    return scenes


def _place(rng: random.Random, sides: list[str]) -> list[tuple[int, int]]:
    """Non-touching block positions (at least one patch between blocks), object i wholly in half `sides[i]`."""
    while True:
        positions: list[tuple[int, int]] = []
        for wanted in sides:
            for _ in range(500):
                low, high = (0, GRID // 2 - BLOCK) if wanted == "left" else (GRID // 2, GRID - BLOCK)
                candidate = (rng.randint(0, GRID - BLOCK), rng.randint(low, high))
                if all(abs(candidate[0] - r) > BLOCK or abs(candidate[1] - c) > BLOCK for r, c in positions):
                    positions.append(candidate)
                    break
        if len(positions) == len(sides):
            return positions


def balanced(seed: int, key: str, index: int, size: int) -> int:
    """A value in 0..size-1 for image `index`: every block of `size` consecutive images takes each value once, in an
    order shuffled per block and per `key`, so answers are balanced and independent across question types."""
    order = list(range(size))
    random.Random(f"scopebench-{seed}-{key}-{index // size}").shuffle(order)
    return order[index % size]


def make_scene(seed: int, index: int) -> Scene:
    """Scene `index` of the split with seed `seed`: objects and five questions, answers balanced over `index`."""
    rng = random.Random(f"scopebench-{seed}-{index}")
    count = 2 + balanced(seed, "count", index, 4)
    majority = "left" if balanced(seed, "layout", index, 2) == 0 else "right"
    minority = "right" if majority == "left" else "left"
    in_majority = rng.randint(count // 2 + 1, count)  # strictly more than half of the objects
    sides = [majority] * in_majority + [minority] * (count - in_majority)
    rng.shuffle(sides)
    positions = _place(rng, sides)
    # Object 0 carries the digit; its colour, shape and digit cycle (balanced); the others are plain.
    colour = list(COLOURS)[balanced(seed, "colour", index, len(COLOURS))]
    colours = [colour] + rng.sample([c for c in COLOURS if c != colour], count - 1)
    shapes = [SHAPES[balanced(seed, "shape", index, 3)]] + [rng.choice(SHAPES) for _ in range(count - 1)]
    digit = DIGITS[balanced(seed, "digit", index, 9)]
    objects = [
        SceneObject(colour=c, shape=s, digit=digit if i == 0 else "", row=r, col=k)
        for i, (c, s, (r, k)) in enumerate(zip(colours, shapes, positions, strict=True))
    ]
    rng.shuffle(objects)  # the marked object is not always drawn or listed first
    questions = [
        Question("attribute_colour", "What colour is the object with the digit?", colour),
        Question("attribute_shape", "What shape is the object with the digit?", shapes[0]),
        Question("fine_digit", "What digit is in the picture?", digit),
        Question("global_count", "How many objects are there?", COUNT_WORDS[count]),
        Question("global_layout", "Are there more objects on the left or on the right?", majority),
    ]
    rng.shuffle(questions)
    return Scene(objects=tuple(objects), questions=tuple(questions))


def render(scene: Scene) -> Image.Image:
    """The scene as a 336 x 336 RGB image."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        left, top = obj.col * PATCH + 2, obj.row * PATCH + 2
        right, bottom = left + BLOCK * PATCH - 5, top + BLOCK * PATCH - 5
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((left + 2, top + 2, right - 2, bottom - 2), fill=fill)
        else:
            draw.polygon([((left + right) / 2, top), (left, bottom), (right, bottom)], fill=fill)
        if not obj.digit:
            continue
        # The digit: 5 x 7 pixels centred in the block's centre patch (a triangle's centre patch is inside it).
        centre_y = (obj.row + 1) * PATCH + PATCH // 2 + (2 if obj.shape == "triangle" else 0)
        glyph_top, glyph_left = centre_y - 3, (obj.col + 1) * PATCH + PATCH // 2 - 2
        for y, line in enumerate(FONT[obj.digit]):
            for x, ink in enumerate(line):
                if ink == "#":
                    image.putpixel((glyph_left + x, glyph_top + y), (20, 20, 20))
    return image


def patch_labels(scene: Scene) -> dict[str, torch.Tensor]:
    """Per-patch targets of the encoder's objective (24 x 24 each): colour (0 none, 1-6), shape (0 none, 1-3) of the
    object whose block holds the patch, and digit (0 none, 1-9) on the block's centre patch only."""
    colour = torch.zeros(GRID, GRID, dtype=torch.long)
    shape = torch.zeros(GRID, GRID, dtype=torch.long)
    digit = torch.zeros(GRID, GRID, dtype=torch.long)
    for obj in scene.objects:
        colour[obj.row : obj.row + BLOCK, obj.col : obj.col + BLOCK] = list(COLOURS).index(obj.colour) + 1
        shape[obj.row : obj.row + BLOCK, obj.col : obj.col + BLOCK] = SHAPES.index(obj.shape) + 1
        if obj.digit:
            digit[obj.row + 1, obj.col + 1] = int(obj.digit)
    return {"colour": colour, "shape": shape, "digit": digit}


# --------------------------------------------------------------------------------------------- files


def split_records(split: str, count: int, seed: int | None = None) -> list[tuple[Scene, dict, list, list]]:
    """(scene, caption record, qa records (one per question), text records) for images 0..count-1 of `split`."""
    seed = SPLIT_SEEDS[split] if seed is None else seed
    out = []
    for index in range(count):
        scene = make_scene(seed, index)
        name = f"{split}-{index:05d}"
        caption = scene.caption()
        caption_record = {
            "id": f"caption-{name}",
            "image": f"{name}.png",
            "conversations": [
                {"from": "human", "value": f"<image>\n{CAPTION_PROMPT}"},
                {"from": "gpt", "value": caption},
            ],
        }
        turns = []
        for q in scene.questions:
            turns.append({"from": "human", "value": q.question})
            turns.append({"from": "gpt", "value": q.answer})
        # One record per question, the image first: each question is asked alone, as `ms-llava demo` asks.
        qa_records = [
            {
                "id": f"qa-{name}-{q.type}",
                "image": f"{name}.png",
                "conversations": [
                    {"from": "human", "value": f"<image>\n{q.question}"},
                    {"from": "gpt", "value": q.answer},
                ],
                "types": [q.type],
                "scene": scene.to_dict(),
            }
            for q in scene.questions
        ]
        text_turns = [
            {"from": "human", "value": f"{caption}\n{CAPTION_PROMPT}"},
            {"from": "gpt", "value": caption},
        ] + turns
        # The warm-up: the whole conversation, then each question alone after the caption, the form stage 2 asks in.
        text_records = [{"id": f"text-{name}", "conversations": text_turns}] + [
            {
                "id": f"text-{name}-{q.type}",
                "conversations": [
                    {"from": "human", "value": f"{caption}\n{q.question}"},
                    {"from": "gpt", "value": q.answer},
                ],
            }
            for q in scene.questions
        ]
        out.append((scene, caption_record, qa_records, text_records))
    return out


def write_split(directory: str | Path, split: str, count: int, images: bool = True) -> dict[str, Path]:
    """Writes `caption-<split>.json`, `qa-<split>.json`, `text-<split>.json` and (with `images`) the PNGs in
    `DIRECTORY/images/`; returns the JSON paths by task."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    by_task: dict[str, list] = {"caption": [], "qa": [], "text": []}
    for scene, caption, qa, text in split_records(split, count):
        if images:
            path = directory / "images" / caption["image"]
            if not path.exists():
                render(scene).save(path, optimize=False)
        by_task["caption"].append(caption)
        by_task["qa"].extend(qa)
        by_task["text"].extend(text)
    paths = {}
    for task, records in by_task.items():
        paths[task] = directory / f"{task}-{split}.json"
        paths[task].write_text(json.dumps(records, indent=0), encoding="utf-8")
    return paths


DEFAULT_SIZES = {"train": 2000, "val": 150, "test": 300}


def write_benchmark(directory: str | Path, sizes: dict[str, int] | None = None) -> dict[str, dict[str, Path]]:
    """Writes every split of `sizes` (default `DEFAULT_SIZES`) to `directory`."""
    sizes = sizes or DEFAULT_SIZES
    return {split: write_split(directory, split, count) for split, count in sizes.items()}


# --------------------------------------------------------------------------------------------- scoring


def qa_prompts(processor, records: list[dict]):
    """(prompt, image index, reference, type) for every question of `records`: each question asked with the
    conversation before it (the image, the earlier questions and their reference answers), as in training."""
    items = []
    for index, record in enumerate(records):
        history = []
        turns = record["conversations"]
        for position, (question, answer) in enumerate(zip(turns[::2], turns[1::2], strict=True)):
            text = question["value"].replace("<image>", "").strip()
            content = ([{"type": "image"}] if "<image>" in question["value"] else []) + [
                {"type": "text", "text": text}
            ]
            history.append({"role": "user", "content": content})
            prompt = processor.apply_chat_template(history, add_generation_prompt=True)
            items.append((prompt, index, answer["value"], record["types"][position]))
            history.append({"role": "assistant", "content": [{"type": "text", "text": answer["value"]}]})
    return items


class _SharedTower(torch.nn.Module):
    """Stands in for the vision tower during scoring: runs the real tower once per distinct image of a batch
    (`pixels`, set before each call) and hands each prompt the features of its image (`index`), so that the five
    questions about one image cost one tower pass instead of five. The pixel values it is called with are ignored."""

    def __init__(self, tower):
        super().__init__()
        self.tower = tower
        self.pixels = None
        self.index = None

    def forward(self, pixel_values, **kwargs):
        out = self.tower(self.pixels.to(pixel_values.dtype), **kwargs)
        for key in ("last_hidden_state", "pooler_output"):
            if getattr(out, key, None) is not None:
                out[key] = out[key][self.index]
        if getattr(out, "hidden_states", None) is not None:
            out["hidden_states"] = tuple(None if h is None else h[self.index] for h in out.hidden_states)
        return out


@torch.no_grad()
def generate_answers(model, processor, prompts, image_index, images, batch_size: int = 64) -> list[str]:
    """Greedy answers (at most 3 new tokens) to `prompts` about `images[image_index[i]]`, batched with left
    padding."""
    model.eval()
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    image_token, count = processor.image_token, processor.num_image_tokens
    tower = model.model.vision_tower
    shared = _SharedTower(tower)
    model.model.vision_tower = shared
    answers = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = [p.replace(image_token, image_token * count) for p in prompts[start : start + batch_size]]
            indices = image_index[start : start + batch_size]
            distinct = sorted(set(indices))
            shared.pixels = processor.image_processor([images[i] for i in distinct], return_tensors="pt")[
                "pixel_values"
            ].to(model.device)
            shared.index = torch.tensor([distinct.index(i) for i in indices], device=model.device)
            inputs = tokenizer(batch, padding=True, return_tensors="pt", add_special_tokens=False).to(model.device)
            size = shared.pixels.shape[-1]
            dummy = torch.zeros(len(batch), 3, size, size, dtype=model.dtype, device=model.device)
            output = model.generate(
                **inputs, pixel_values=dummy, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            decoded = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            answers += [a.strip() for a in decoded]
    finally:
        model.model.vision_tower = tower
    return answers


def question_type_accuracy(model, processor, qa_path: str | Path, image_folder: str | Path | None = None, **kw):
    """Greedy exact-match accuracy on a ``qa`` file: ``{"overall", "<type>"..., "fine", "attribute", "global"}``."""
    qa_path = Path(qa_path)
    records = json.loads(qa_path.read_text(encoding="utf-8"))
    folder = Path(image_folder or qa_path.parent / "images")
    images = [Image.open(folder / record["image"]).convert("RGB") for record in records]
    items = qa_prompts(processor, records)
    answers = generate_answers(model, processor, [i[0] for i in items], [i[1] for i in items], images, **kw)
    hits: dict[str, list[bool]] = defaultdict(list)
    for (_, _, reference, qtype), answer in zip(items, answers, strict=True):
        hits[qtype].append(answer == reference)
        hits[SCOPES[qtype]].append(answer == reference)
        hits["overall"].append(answer == reference)
    return {key: sum(v) / len(v) for key, v in sorted(hits.items())}
