"""Tiny checkpoints the conversion, compose and Hub tests read: a transformers LLaVA as transformers saves it, copies
of it in other key layouts, one in the original LLaVA code base's format, and helpers to read weights back."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    CLIPVisionModel,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from ms_llava import LLAVA_1_5_CHAT_TEMPLATE, MSLlavaConfig
from ms_llava.conversion.streaming import read_sources
from ms_llava.modeling_ms_llava import MSResampler
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


# ------------------------------------------------------------------------------------- the original LLaVA code base

ORIGINAL_TOWER = "model.vision_tower.vision_tower.vision_model."  # transformers 4's CLIPVisionModel under the wrapper
ORIGINAL_RESAMPLER = {"num_queries": 16, "scope_windows": [2, 4, 8], "hidden_size": 20, "num_attention_heads": 2}
ORIGINAL_RESAMPLER |= {"fusion_hidden_size": 5}


def original_config(tokenizer, projector_type: str, mm_vision_tower: str) -> dict:
    """config.json as the original code base writes it: transformers 4.3x's Llama fields and the mm_* fields."""
    config = tiny_text_config(tokenizer).to_dict()
    for name in ("rope_parameters", "dtype", "transformers_version", "architectures"):
        config.pop(name, None)
    config.update(
        architectures=["LlavaLlamaForCausalLM"],
        model_type="llava_llama",
        rope_theta=10000.0,
        torch_dtype="float32",
        mm_vision_tower=mm_vision_tower,
        mm_hidden_size=24,
        mm_projector_type=projector_type,
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        image_aspect_ratio="pad",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        mm_patch_merge_type="flat",
        tune_mm_mlp_adapter=False,
        use_mm_proj=True,
    )
    if projector_type == "ms_resampler":
        config["mm_resampler_config"] = dict(ORIGINAL_RESAMPLER, fusion="channel_mlp")
    return config


def projector_tensors(projector_type: str, tokenizer) -> dict[str, torch.Tensor]:
    """`model.mm_projector.*`: mlp2x_gelu's Linear-GELU-Linear (24 -> 32 -> 32), or an MS-Resampler's state dict."""
    if projector_type == "mlp2x_gelu":
        shapes = {"0.weight": (32, 24), "0.bias": (32,), "2.weight": (32, 32), "2.bias": (32,)}
        return {f"model.mm_projector.{name}": torch.randn(shape) for name, shape in shapes.items()}
    config = MSLlavaConfig(
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config(tokenizer),
        resampler_config=ORIGINAL_RESAMPLER,
    )
    resampler = MSResampler(config)
    resampler.reset_parameters()  # built alone, it is not initialised (its parameters are torch.empty's)
    return {
        f"model.mm_projector.{name}": tensor.detach() + 0.01 * torch.randn_like(tensor)
        for name, tensor in resampler.state_dict().items()
    }


def save_bin_shards(tensors: dict[str, torch.Tensor], directory: Path, parts: int = 3) -> None:
    """`pytorch_model-0000i-of-0000n.bin` shards and their index, as the original code base's checkpoints are saved."""
    names, weight_map = sorted(tensors), {}
    for part in range(parts):
        file_name = f"pytorch_model-{part + 1:05d}-of-{parts:05d}.bin"
        chunk = {name: tensors[name] for name in names[part::parts]}
        torch.save(chunk, directory / file_name)
        weight_map.update(dict.fromkeys(chunk, file_name))
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def save_original(
    directory: Path, projector_type: str, clip_dir: Path, weights="bin", with_tower=True, tokenizer=None
) -> dict[str, torch.Tensor]:
    """An original-format LLaVA checkpoint: Llama weights (model.*, lm_head.*), model.mm_projector.*, optionally the
    CLIP tower, an original config.json (mm_vision_tower: the local CLIP folder `clip_dir`, as researchers' own
    checkpoints often have) and a tokenizer without `<image>`. Returns the tensors."""
    tokenizer = tokenizer or build_tiny_tokenizer(with_image_token=False)
    directory.mkdir(parents=True)
    torch.manual_seed(1)
    tensors = dict(LlamaForCausalLM(tiny_text_config(tokenizer)).state_dict())
    tensors.update(projector_tensors(projector_type, tokenizer))
    if with_tower:
        tower = CLIPVisionModel(tiny_vision_config()).state_dict()
        tensors.update({ORIGINAL_TOWER + name: tensor for name, tensor in tower.items()})
    tensors = {name: tensor.detach().clone().contiguous() for name, tensor in tensors.items()}
    if weights == "bin":
        save_bin_shards(tensors, directory)
    else:
        save_file(tensors, directory / "model.safetensors")
    config = original_config(tokenizer, projector_type, str(clip_dir))
    (directory / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(directory)
    return tensors


def original_to_hf_name(key: str) -> str:
    """Where a tensor of the original format goes in transformers' layout (docs/conversion.md's table)."""
    for old, new in (
        (ORIGINAL_TOWER, "model.vision_tower."),
        ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),  # mlp2x_gelu; an MS-Resampler has no
        ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),  # key starting 0. or 2.
        ("model.mm_projector.", "model.multi_modal_projector."),
        ("model.", "model.language_model."),
    ):
        if key.startswith(old):
            return new + key[len(old) :]
    return key
