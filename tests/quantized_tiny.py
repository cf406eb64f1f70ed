"""A tiny MS-LLaVA whose quantized layers bitsandbytes' CPU inference path accepts.

bitsandbytes 0.50.2 on CPUs with AVX512-BF16 repacks a 4-bit weight for its fused kernel the first time the layer
runs in eval mode without grad, in blocks of 32 output by 64 input features, and fails on other widths ("N must be
divisible by block_n", "shape '[32, 0]' is invalid"). The tiny test model has odd widths (24, 32, 37); this one has 64
and 128, as LLaVA's widths are multiples of 64. Training (train mode or grad) does not repack.
"""

from pathlib import Path

import torch

from ms_llava import MSLlavaForConditionalGeneration
from ms_llava.testing_utils import build_tiny_config, build_tiny_processor, build_tiny_tokenizer


def write_tiny64_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """The tiny checkpoint with widths 64 (vision, text) and 128 (MLPs), saved with its processor."""
    tokenizer = build_tiny_tokenizer()
    config = build_tiny_config(tokenizer)
    config.vision_config.hidden_size = config.text_config.hidden_size = 64
    config.vision_config.intermediate_size = config.text_config.intermediate_size = 128
    config.text_config.head_dim = 32  # 2 heads of 32, 1 key-value head: k_proj / v_proj are 32 wide
    config.text_config.num_attention_heads = 2
    config.text_config.num_key_value_heads = 1
    torch.manual_seed(seed)
    MSLlavaForConditionalGeneration(config).save_pretrained(path)
    build_tiny_processor(config, tokenizer).save_pretrained(path)
    return Path(path)
