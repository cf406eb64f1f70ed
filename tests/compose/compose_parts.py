"""Tiny vision towers and language models built with transformers configs and saved to disk, as a user's parts
(`parts` is the fixture; tests/compose/conftest.py re-exports it)."""

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from ms_llava.testing_utils import _CORPUS

IMAGE_SIZE, PATCH_SIZE = 32, 4  # an 8 x 8 grid
TINY_RESAMPLER = {
    "num_queries": 16,
    "scope_windows": [2, 4, 8],
    "resampler_kwargs": {"hidden_size": 20, "num_attention_heads": 2, "fusion_hidden_size": 5},
}
# A Qwen2-style ChatML template without generation markers, as the LLM ships it.
QWEN_OWN_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CLIP_PREPROCESSING = {
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
}
SIGLIP_PREPROCESSING = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2}


def vision_kwargs():
    return dict(
        hidden_size=24, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )  # fmt: skip


def bpe_tokenizer(special_tokens: list[str], **roles) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of 300 tokens with `special_tokens`; `roles`: bos_token=..., eos_token=..., ..."""
    backend = Tokenizer(models.BPE(unk_token=roles.get("unk_token")))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    corpus = _CORPUS * 4 + ["A red circle. A blue square. What colour is the shape? green yellow system user"]
    backend.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **roles)


def write_tower(directory: Path, kind: str, seed: int = 0) -> Path:
    """`clip` (CLIPVisionModel), `clip-full` (a whole CLIPModel), `siglip` (SiglipVisionModel)."""
    torch.manual_seed(seed)
    if kind == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(**vision_kwargs()))
    elif kind == "clip-full":
        text = dict(hidden_size=16, intermediate_size=20, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
        model = CLIPModel(CLIPConfig(vision_config=vision_kwargs(), text_config=text, projection_dim=8))
    else:
        model = SiglipVisionModel(SiglipVisionConfig(**vision_kwargs()))
    model.save_pretrained(directory)
    preprocessing = SIGLIP_PREPROCESSING if kind == "siglip" else CLIP_PREPROCESSING
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessing), encoding="utf-8")
    return directory


def write_llm(directory: Path, kind: str, seed: int = 0) -> Path:
    """`llama` and `mistral` (unk, no pad, no chat template: Vicuna / Mistral base), `qwen2` (ChatML template, tied
    embeddings, no unk, no pad)."""
    if kind == "qwen2":
        tokenizer = bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos_token="<|endoftext|>")
        tokenizer.chat_template = QWEN_OWN_TEMPLATE
    else:
        tokenizer = bpe_tokenizer(["<unk>", "<s>", "</s>"], unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    common = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    config_class, model_class = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[kind]
    torch.manual_seed(seed)
    model = model_class(config_class(**common, tie_word_embeddings=kind == "qwen2"))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def parts(tmp_path_factory):
    """`parts(kind)`: the directory of a tiny part (written once per session)."""
    root = tmp_path_factory.mktemp("parts")
    written = {}

    def get(kind: str) -> Path:
        if kind not in written:
            writer = write_tower if kind in ("clip", "clip-full", "siglip") else write_llm
            written[kind] = writer(root / kind, kind)
        return written[kind]

    return get
