"""Tiny, randomly initialised MS-LLaVA checkpoints built locally (no Hub): for tests, examples and the demo.

Everything here is UNTRAINED: its outputs are meaningless tokens. It exists so that every code path (save, load,
pipeline, generate, remote code) can run on a machine with no network and no GPU in seconds.
"""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import CLIPVisionConfig, LlamaConfig, PreTrainedTokenizerFast

from .configuration_ms_llava import MSLlavaConfig
from .image_processing_ms_llava import MSLlavaImageProcessor
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


def tiny_text_config(tokenizer: PreTrainedTokenizerFast, vocab_size: int | None = None) -> LlamaConfig:
    """An odd-sized Llama of width 32 whose special token ids are the tokenizer's."""
    return LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


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
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=config.num_image_tokens
    )


def build_tiny_checkpoint(seed: int = 0, **resampler_kwargs):
    """Returns `(model, processor)`: a randomly initialised tiny MS-LLaVA and its matching processor."""
    tokenizer = build_tiny_tokenizer()
    config = build_tiny_config(tokenizer, **resampler_kwargs)
    torch.manual_seed(seed)
    model = MSLlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, build_tiny_processor(config, tokenizer)


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
