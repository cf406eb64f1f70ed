"""A tiny transformers LLaVA checkpoint, the source the conversion and end-to-end Hub tests convert."""

from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from ms_llava import LLAVA_1_5_CHAT_TEMPLATE
from ms_llava.testing_utils import build_tiny_tokenizer, tiny_text_config, tiny_vision_config


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
