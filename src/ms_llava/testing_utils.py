"""The tiny checkpoint and tiny data the tests, examples and docs build locally (no Hub, no download).

- `build_tiny_checkpoint` and its parts: a randomly initialised, odd-sized MS-LLaVA (8 x 8 grid, M = 16) with a BPE
  tokenizer trained in memory. UNTRAINED: its outputs are meaningless tokens; it exists so that every code path (save,
  load, pipeline, generate, remote code) runs on a machine with no network and no GPU in seconds.
- `write_shapes_dataset`: a synthetic "coloured shapes" data set in LLaVA's JSON format for training examples. Each
  image is one filled circle or square in one of four colours. Tasks: ``caption`` (stage 1: "Describe the picture."
  -> "A red circle."), ``qa`` (stage 2: the colour, then the shape), ``text`` (no image: a text-only warm-up that
  gives a random tiny LLM the language of the task, as Vicuna brings its own to the paper's stage 1).
  `answer_accuracy` scores greedy answers on a ``qa`` file.

``python -m ms_llava.testing_utils write DIR`` writes the shapes files of docs/training.md;
``python -m ms_llava.testing_utils accuracy CHECKPOINT QA_FILE`` scores a model on one.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import CLIPVisionConfig, LlamaConfig, PreTrainedTokenizerFast

from .configuration_ms_llava import MSLlavaConfig
from .image_processing_ms_llava import MSLlavaImageProcessor
from .images import load_image
from .modeling_ms_llava import MSLlavaForConditionalGeneration
from .processing_ms_llava import MSLlavaProcessor

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

_CORPUS = [
    "USER: ASSISTANT: What is in the image? Describe the picture. How many shapes are there?",
    "A red circle left of a blue square. A green triangle above a yellow star. The answer is yes or no.",
    "one two three four five six seven eight nine ten zero left right above below colour shape count",
]


def build_tiny_tokenizer(with_image_token: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (a few hundred tokens) trained in memory, with `<image>` as a special token (or,
    `with_image_token=False`, without it, like the original LLaVA code base's tokenizers)."""
    return train_bpe_tokenizer(_CORPUS * 4, vocab_size=400, with_image_token=with_image_token)


def train_bpe_tokenizer(corpus: list[str], vocab_size: int, with_image_token: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of `vocab_size` tokens trained in memory on `corpus`, with LLaVA's special tokens
    (`<s>`, `</s>`, `<pad>`, `<unk>`, and `<image>` unless `with_image_token=False`), padding on the left."""
    special_tokens = SPECIAL_TOKENS if with_image_token else [t for t in SPECIAL_TOKENS if t != "<image>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"} if with_image_token else {},
        padding_side="left",
    )


def tiny_vision_config() -> CLIPVisionConfig:
    """An odd-sized CLIP tower: 32 px images, patch 4 (an 8 x 8 grid), width 24."""
    return CLIPVisionConfig(
        hidden_size=24,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=4,
        projection_dim=16,
    )


def tiny_text_config(tokenizer: PreTrainedTokenizerFast, vocab_size: int | None = None, **overrides) -> LlamaConfig:
    """An odd-sized Llama of width 32 whose special token ids are the tokenizer's; `overrides`: other LlamaConfig
    values (e.g. `pad_token_id=None`: a base LLM whose config names no pad token)."""
    settings = {
        "vocab_size": vocab_size or len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return LlamaConfig(**{**settings, **overrides})


def build_tiny_config(tokenizer: PreTrainedTokenizerFast, **resampler_kwargs) -> MSLlavaConfig:
    """Odd-sized tiny dimensions: CLIP tower 32 px / patch 4 (an 8 x 8 grid), Llama width 32, M = 16, k = [2, 4, 8] by
    default."""
    vision_config = tiny_vision_config()
    text_config = tiny_text_config(tokenizer)
    resampler = {
        "num_queries": 16,
        "scope_windows": [2, 4, 8],
        "hidden_size": 20,
        "num_attention_heads": 2,
        "fusion_hidden_size": 5,
    }
    resampler.update(resampler_kwargs)
    return MSLlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        resampler_config=resampler,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )


def build_tiny_processor(config: MSLlavaConfig, tokenizer: PreTrainedTokenizerFast) -> MSLlavaProcessor:
    image_size = config.vision_config.image_size
    image_processor = MSLlavaImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return MSLlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=config.resampler_config.num_queries
    )


def build_tiny_checkpoint(seed: int = 0, **resampler_kwargs):
    """Returns `(model, processor)`: a randomly initialised tiny MS-LLaVA and its matching processor."""
    tokenizer = build_tiny_tokenizer()
    config = build_tiny_config(tokenizer, **resampler_kwargs)
    torch.manual_seed(seed)
    model = MSLlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, build_tiny_processor(config, tokenizer)


def write_tiny_checkpoint(directory: str | Path, seed: int = 0, overwrite: bool = False, log=None) -> Path:
    """Saves a tiny untrained MS-LLaVA (model, processor, remote-code modules) to `directory`.

    A `directory` that already holds a checkpoint (a `config.json` or weights) is refused with a `CheckpointError`
    unless `overwrite`; then only its checkpoint files are replaced, in one rename, and those the tiny checkpoint does
    not rewrite are removed and listed to `log` (`conversion.checkpoint_io.replace_folder`). Other files (notes,
    results, subfolders) are kept, with or without `overwrite`; without it, a file of the tiny checkpoint's names
    already there (a tokenizer.json of the user's, say) is refused too, named.
    """
    from .checkpoints import CheckpointError, checkpoint_files_in, holds_checkpoint
    from .conversion.checkpoint_io import replace_folder

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} exists and is not a folder; give a new or existing folder")
    if holds_checkpoint(directory) and not overwrite:
        found = checkpoint_files_in(directory)
        raise CheckpointError(
            f"{directory} already holds a checkpoint ({', '.join(found[:6])}{', ...' if len(found) > 6 else ''}); "
            "choose another folder, or pass --overwrite to replace its checkpoint files (other files are kept)"
        )
    model, processor = build_tiny_checkpoint(seed=seed)
    with replace_folder(directory, log=log, keep_existing=not overwrite) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
    return directory


def sample_image(size: int = 64, seed: int = 0) -> Image.Image:
    """A deterministic picture of a few coloured shapes."""
    generator = torch.Generator().manual_seed(seed)
    image = Image.new("RGB", (size, size), (240, 240, 240))
    draw = ImageDraw.Draw(image)
    colours = [(220, 40, 40), (40, 90, 220), (40, 170, 60), (230, 190, 30)]
    for index in range(3):
        x, y = (torch.randint(0, size * 3 // 4, (2,), generator=generator)).tolist()
        extent = size // 5
        box = (x, y, x + extent, y + extent)
        (draw.ellipse if index % 2 else draw.rectangle)(box, fill=colours[index % len(colours)])
    return image


# ---------------------------------------------------------------- the coloured-shapes data set

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
        image = load_image(Path(image_folder) / record["image"])
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
            padding=True,  # the tokenizer's padding side: left in ms_llava.testing_utils's, as batched generation needs
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`ms-llava tiny DIR`."""
    parser.add_argument("directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the checkpoint files of a folder that already holds a checkpoint (other files are kept)",
    )


def run(args: argparse.Namespace) -> int:
    directory = write_tiny_checkpoint(args.directory, seed=args.seed, overwrite=args.overwrite, log=print)
    print(f"wrote {directory} (untrained)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ms_llava.testing_utils",
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
        # The Auto classes know "ms_llava": importing this module ran the package's __init__, which registers them.
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(args.checkpoint)
        processor = AutoProcessor.from_pretrained(args.checkpoint)
        image_folder = args.image_folder or Path(args.data).parent / "images"
        print(f"{answer_accuracy(model, processor, args.data, image_folder):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
