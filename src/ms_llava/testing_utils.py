"""Tiny stand-ins that tests, examples and docs build offline in seconds, and `ms-llava tiny`: an untrained odd-sized
MS-LLaVA (`build_tiny_checkpoint`: 8 x 8 grid, M = 16), parts for compose (`write_tiny_part`: CLIP, whole-CLIP and
SigLIP towers; a Vicuna-like Llama or Mistral with unk and no pad token nor chat template, a Qwen2 with its ChatML
template), and coloured-shapes data in LLaVA's format (`write_shapes_dataset`) with its scorer (`answer_accuracy`)."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
import transformers
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import CLIPVisionConfig, LlamaConfig, PreTrainedTokenizerFast
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

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
PARTS_CORPUS = [*_CORPUS * 4, "A red circle. A blue square. What colour is the shape? green yellow system user"]
CLIP_PREPROCESSING = {"image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD), "resample": 3}
SIGLIP_PREPROCESSING = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 2}
# Qwen2's own chat template (ChatML), without generation markers, as the LLM ships it.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_VISION = {"image_size": 32, "patch_size": 4, "hidden_size": 24, "intermediate_size": 37}
_VISION |= {"num_hidden_layers": 2, "num_attention_heads": 4}
_TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
_TEXT |= {"num_key_value_heads": 2, "max_position_embeddings": 512}
_CLIP_TEXT = {"hidden_size": 16, "intermediate_size": 20, "num_hidden_layers": 1, "num_attention_heads": 2}
_CLIP_TEXT |= {"vocab_size": 50, "bos_token_id": 0, "eos_token_id": 1}
TOWERS = {"clip": "CLIPVision", "clip-full": "CLIP", "siglip": "SiglipVision"}  # part -> transformers class
LANGUAGE_MODELS = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
PARTS = {"vision": "clip", "llama": "llama", "qwen2": "qwen2"}  # what `ms-llava tiny --parts DIR` writes


def build_tiny_tokenizer(with_image_token: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of 400 tokens with LLaVA's special tokens (without `<image>`, like the original LLaVA
    code base's tokenizers, when `with_image_token=False`)."""
    special = SPECIAL_TOKENS if with_image_token else SPECIAL_TOKENS[:-1]
    return train_bpe_tokenizer(_CORPUS * 4, vocab_size=400, special_tokens=special)


def train_bpe_tokenizer(
    corpus: list[str], vocab_size: int, special_tokens: list[str] = SPECIAL_TOKENS, **roles
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of `vocab_size` tokens trained in memory on `corpus`. `roles` (`eos_token=...`, ...)
    name its special tokens; by default LLaVA's (`<unk>`, `<s>`, `</s>`, `<pad>`, `<image>` when it has one) with
    padding on the left."""
    backend = Tokenizer(models.BPE(unk_token="<unk>" if "<unk>" in special_tokens else None))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    image = {"image_token": "<image>"} if "<image>" in special_tokens else {}
    llava = dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>", extra_special_tokens=image)
    roles = roles or dict(llava, padding_side="left")
    return PreTrainedTokenizerFast(tokenizer_object=backend, **roles)


def tiny_vision_config() -> CLIPVisionConfig:
    """An odd-sized CLIP tower: 32 px images, patch 4 (an 8 x 8 grid), width 24."""
    return CLIPVisionConfig(**_VISION, projection_dim=16)


def tiny_text_config(tokenizer, vocab_size: int | None = None, config_class=LlamaConfig, **overrides) -> LlamaConfig:
    """An odd-sized Llama (or other `config_class`) of width 32 with the tokenizer's special token ids, and `overrides`
    (`pad_token_id=None`)."""
    ids = {name: getattr(tokenizer, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return config_class(**{**_TEXT, "vocab_size": vocab_size or len(tokenizer), **ids, **overrides})


def build_tiny_config(tokenizer: PreTrainedTokenizerFast, **resampler_kwargs) -> MSLlavaConfig:
    """The tiny MS-LLaVA's config: M = 16, k = [2, 4, 8], D = 20 in 2 heads unless `resampler_kwargs` say otherwise."""
    resampler = {"num_queries": 16, "scope_windows": [2, 4, 8], "hidden_size": 20, "num_attention_heads": 2}
    return MSLlavaConfig(
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config(tokenizer),
        resampler_config={**resampler, "fusion_hidden_size": 5, **resampler_kwargs},
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )


def build_tiny_processor(config: MSLlavaConfig, tokenizer) -> MSLlavaProcessor:
    size = config.vision_config.image_size
    image_processor = MSLlavaImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return MSLlavaProcessor(image_processor, tokenizer, num_image_tokens=config.resampler_config.num_queries)


def build_tiny_checkpoint(seed: int = 0, **resampler_kwargs):
    """Returns `(model, processor)`: a randomly initialised tiny MS-LLaVA and its matching processor."""
    tokenizer = build_tiny_tokenizer()
    config = build_tiny_config(tokenizer, **resampler_kwargs)
    torch.manual_seed(seed)
    model = MSLlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, build_tiny_processor(config, tokenizer)


def write_tiny_checkpoint(directory: str | Path, seed: int = 0, overwrite: bool = False, log=None) -> Path:
    """Saves a tiny untrained MS-LLaVA (model, processor, remote-code modules) to `directory`, as the conversions write
    (`conversion.streaming.check_output`, `replace_folder`): a folder holding a checkpoint only with `overwrite`,
    which replaces its checkpoint files only and lists to `log` those it removes; other files are kept."""
    from .conversion.streaming import check_output, replace_folder

    check_output(directory, overwrite)
    model, processor = build_tiny_checkpoint(seed=seed)
    with replace_folder(directory, log=log, keep_existing=not overwrite) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
    return directory


def write_tiny_part(directory: str | Path, kind: str, seed: int = 0) -> Path:
    """Saves a tiny part for compose to `directory`: a tower (`TOWERS`: 32 px, patch 4, width 24) with its
    preprocessor_config.json, or a language model (`LANGUAGE_MODELS`: width 32) with its tokenizer."""
    directory, name = Path(directory), {**TOWERS, **LANGUAGE_MODELS}.get(kind)
    if name is None:
        raise ValueError(f"unknown part {kind!r}; choose one of {', '.join([*TOWERS, *LANGUAGE_MODELS])}")
    torch.manual_seed(seed)
    if kind in TOWERS:
        whole = {"vision_config": _VISION, "text_config": _CLIP_TEXT, "projection_dim": 8}
        model_class, config_class = (getattr(transformers, f"{name}{suffix}") for suffix in ("Model", "Config"))
        model_class(config_class(**(whole if kind == "clip-full" else _VISION))).save_pretrained(directory)
        preprocessing = SIGLIP_PREPROCESSING if kind == "siglip" else CLIP_PREPROCESSING
        (directory / "preprocessor_config.json").write_text(json.dumps(preprocessing), encoding="utf-8")
        return directory
    if kind == "qwen2":
        tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tokenizer = train_bpe_tokenizer(PARTS_CORPUS, 300, tokens, eos_token="<|endoftext|>")
        tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    else:
        roles = dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>")
        tokenizer = train_bpe_tokenizer(PARTS_CORPUS, 300, ["<unk>", "<s>", "</s>"], **roles)
    config_class = getattr(transformers, f"{name}Config")
    config = tiny_text_config(tokenizer, None, config_class, tie_word_embeddings=kind == "qwen2")
    getattr(transformers, f"{name}ForCausalLM")(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_tiny_parts(directory: str | Path) -> dict[str, Path]:
    """`ms-llava tiny --parts DIR`: DIR/vision (CLIP), DIR/llama (Vicuna-like) and DIR/qwen2 (ChatML)."""
    return {name: write_tiny_part(Path(directory) / name, kind) for name, kind in PARTS.items()}


def sample_image(size: int = 64, seed: int = 0) -> Image.Image:
    """A deterministic picture of a few coloured shapes."""
    generator, image = torch.Generator().manual_seed(seed), Image.new("RGB", (size, size), (240, 240, 240))
    draw = ImageDraw.Draw(image)
    for index, colour in enumerate(list(COLOURS.values())[:3]):
        x, y = torch.randint(0, size * 3 // 4, (2,), generator=generator).tolist()
        (draw.ellipse if index % 2 else draw.rectangle)((x, y, x + size // 5, y + size // 5), fill=colour)
    return image


COLOURS = {"red": (220, 40, 40), "blue": (40, 90, 220), "green": (40, 170, 60), "yellow": (230, 190, 30)}
SHAPES = ("circle", "square")
CAPTION_PROMPT = "Describe the picture."
COLOUR_QUESTION, SHAPE_QUESTION = "What colour is the shape?", "What shape is it?"


def draw_shape(colour: str, shape: str, rng: random.Random, size: int = 32) -> Image.Image:
    """One `shape` filled with `colour` (lightly jittered) at a random place and size on a light grey background."""
    image = Image.new("RGB", (size, size), (235, 235, 235))
    extent = rng.randint(size * 2 // 5, size * 3 // 4)
    left, top = rng.randint(0, size - extent), rng.randint(0, size - extent)
    fill = tuple(min(255, max(0, channel + rng.randint(-20, 20))) for channel in COLOURS[colour])
    box = (left, top, left + extent - 1, top + extent - 1)
    (ImageDraw.Draw(image).ellipse if shape == "circle" else ImageDraw.Draw(image).rectangle)(box, fill=fill)
    return image


def shapes_records(task: str, num_records: int, seed: int, id_prefix: str | None = None) -> list[tuple]:
    """`num_records` (LLaVA record, image) pairs; colours and shapes cycle so that every class is equally frequent."""
    if task not in ("caption", "qa", "text"):
        raise ValueError(f"task must be 'caption', 'qa' or 'text', got {task!r}")
    rng, pairs = random.Random(seed), []
    classes = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    for index in range(num_records):
        colour, shape = classes[index % len(classes)]
        record_id = f"{id_prefix or f'{task}-{seed}'}-{index:05d}"
        caption, questions = [CAPTION_PROMPT, f"A {colour} {shape}."], [COLOUR_QUESTION, colour, SHAPE_QUESTION, shape]
        turns = {"caption": caption, "qa": questions, "text": caption + questions}[task]
        # The image goes first in the first turn; in `text`, the words it shows stand in its place.
        turns[0] = f"{f'{colour} {shape}' if task == 'text' else '<image>'}\n{turns[0]}"
        conversations = [{"from": ("human", "gpt")[i % 2], "value": value} for i, value in enumerate(turns)]
        record = {"id": record_id, "conversations": conversations}
        if task != "text":
            record["image"] = f"{record_id}.png"
        pairs.append((record, draw_shape(colour, shape, rng)))
    rng.shuffle(pairs)
    return pairs


def write_shapes_dataset(directory: str | Path, task: str, num_records: int, seed: int = 0) -> Path:
    """`DIRECTORY/<task>-<seed>.json` (LLaVA format; returned), its images in `DIRECTORY/images/` (none for `text`)."""
    return write_records(directory, f"{task}-{seed}", shapes_records(task, num_records, seed))


def write_records(directory: str | Path, name: str, pairs) -> Path:
    """Writes (LLaVA record, image) `pairs` as `DIRECTORY/<name>.json` with the images of the records that have one
    in `DIRECTORY/images/`, and returns the JSON's path."""
    (Path(directory) / "images").mkdir(parents=True, exist_ok=True)
    for record, image in (pair for pair in pairs if "image" in pair[0]):
        image.save(Path(directory) / "images" / record["image"])
    path = Path(directory) / f"{name}.json"
    path.write_text(json.dumps([record for record, _ in pairs], indent=1), encoding="utf-8")
    return path


@torch.no_grad()
def answer_accuracy(model, processor, data_path: str | Path, image_folder: str | Path, batch_size: int = 16) -> float:
    """Exact-match accuracy of greedy answers on every question of a `qa` file of `write_shapes_dataset`: each
    question asked after the conversation before it (its image; the first question and its reference answer), as in
    training; an answer counts when the generated text, stripped, equals the reference."""
    prompts, images, references, correct = [], [], [], 0
    for record in json.loads(Path(data_path).read_text(encoding="utf-8")):
        turns, history = record["conversations"], []
        for question, answer in zip(turns[::2], turns[1::2], strict=True):
            image = [{"type": "image"}] if "<image>" in question["value"] else []
            text = question["value"].replace("<image>", "").strip()
            history.append({"role": "user", "content": [*image, {"type": "text", "text": text}]})
            prompts.append(processor.apply_chat_template(history, add_generation_prompt=True))
            images.append(load_image(Path(image_folder) / record["image"]))
            references.append(answer["value"])
            history.append({"role": "assistant", "content": [{"type": "text", "text": answer["value"]}]})
    model.eval()
    for start in range(0, len(prompts), batch_size):
        batch = slice(start, start + batch_size)  # padded on the tokenizer's side: the left, as generation needs
        inputs = processor(images=images[batch], text=prompts[batch], padding=True, return_tensors="pt")
        inputs = inputs.to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        answers = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += sum(a.strip() == r for a, r in zip(answers, references[batch], strict=True))
    return correct / len(prompts)


def run(args: argparse.Namespace) -> int:
    if not (args.directory or args.parts or args.data or args.accuracy):
        raise ValueError("give a folder for a tiny checkpoint, or --parts DIR, --data DIR or --accuracy CKPT QA_FILE")
    for path in write_tiny_parts(args.parts).values() if args.parts else ():
        print(f"wrote {path} (untrained)")
    for task, count, seed in (("text", 96, 3), ("caption", 96, 0), ("qa", 96, 1), ("qa", 32, 2)) if args.data else ():
        print(write_shapes_dataset(args.data, task, count, seed=seed))
    if args.accuracy:
        checkpoint, data = args.accuracy
        model = transformers.AutoModelForImageTextToText.from_pretrained(checkpoint)
        processor = transformers.AutoProcessor.from_pretrained(checkpoint)
        print(f"{answer_accuracy(model, processor, data, Path(data).parent / 'images'):.4f}")
    if args.directory:
        directory = write_tiny_checkpoint(args.directory, seed=args.seed, overwrite=args.overwrite, log=print)
        print(f"wrote {directory} (untrained)")
    return 0
