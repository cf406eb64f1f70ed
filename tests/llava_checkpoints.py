"""Tiny checkpoints the conversion, compose and Hub tests read: a transformers LLaVA as transformers saves it, copies
of it in other key layouts, and helpers to read weights back."""

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from ms_llava import LLAVA_1_5_CHAT_TEMPLATE
from ms_llava.conversion.streaming import read_sources
from ms_llava.testing_utils import build_tiny_tokenizer, tiny_text_config, tiny_vision_config

# The tiny parts' MS-Resampler (an 8 x 8 grid): M = 16, three windows, D = 20 in 2 heads, h = 5.
TINY_RESAMPLER = {
    "num_queries": 16,
    "scope_windows": [2, 4, 8],
    "resampler_kwargs": {"hidden_size": 20, "num_attention_heads": 2, "fusion_hidden_size": 5},
}
QUIET = {"log": lambda line: None}


def save_llava(directory: Path, seed: int = 0) -> Path:
    """A tiny transformers LLaVA + LlavaProcessor, saved by transformers (its save writes the old top-level layout)."""
    tokenizer = build_tiny_tokenizer()
    config = LlavaConfig(
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=64,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(
        image_processor=LlavaImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_pad=True
        ),
        tokenizer=tokenizer,
        patch_size=4,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_1_5_CHAT_TEMPLATE.replace("USER: ", "USER:  "),  # a template of its own, to see it kept
        num_additional_image_tokens=1,
    )
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, by name."""
    return {source.key: source.load().clone() for source in read_sources(Path(path), "test")}


def rewrite_weights(source: Path, target: Path, rename=lambda name: name, extra: dict | None = None) -> Path:
    """A copy of `source` whose weights are one safetensors file with every key renamed by `rename` (plus `extra`)."""
    target.mkdir()
    for path in source.iterdir():
        if "safetensors" not in path.name:
            (target / path.name).write_bytes(path.read_bytes())
    save_file({**{rename(k): t for k, t in tensors_of(source).items()}, **(extra or {})}, target / "model.safetensors")
    return target


def to_new_layout(name: str) -> str:
    for old, new in (
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    ):
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def to_hub_4x_layout(name: str) -> str:
    """llava-hf/llava-1.5-7b-hf's layout (transformers 4.x): old prefixes, CLIP weights under vision_model."""
    return "vision_tower.vision_model." + name[len("vision_tower.") :] if name.startswith("vision_tower.") else name


def leftovers(directory: Path) -> list[str]:
    """The staging folders a write left next to its output (there must be none)."""
    return sorted(path.name for path in directory.iterdir() if ".partial-" in path.name or ".previous-" in path.name)
