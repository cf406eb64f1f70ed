"""Convert between the original LLaVA code base's checkpoint format and transformers' (HF) layout, both ways.

The original code base (haotian-liu/LLaVA, `LlavaLlamaForCausalLM`) stores the language model as a Llama checkpoint
(`model.embed_tokens.*`, `model.layers.*`, `model.norm.*`, `lm_head.*`), the projector as `model.mm_projector.*`, the
CLIP tower (when saved) as `model.vision_tower.vision_tower.vision_model.*`, and the multimodal settings in config.json
(`mm_vision_tower`, `mm_projector_type`, `mm_vision_select_layer`, `mm_vision_select_feature`, `image_aspect_ratio`,
...). Stage-1 (projector pre-training) writes only `mm_projector.bin` next to config.json.

* `original-to-hf`: LLaVA-1.5's `mlp2x_gelu` projector -> transformers' `LlavaForConditionalGeneration` (with
  LlavaConfig, LlavaProcessor); an `ms_resampler` projector -> `MSLlavaForConditionalGeneration` (with MSLlavaConfig,
  MSLlavaProcessor).
* `hf-to-original`: either of those back to the original format.

The `ms_resampler` layout in the original code base (defined here, documented in docs/conversion.md):
`mm_projector_type: "ms_resampler"`, the resampler's hyper-parameters in `mm_resampler_config` (MSResamplerConfig's
field names), and `model.mm_projector.<name>` for every `<name>` of `MSResampler.state_dict()`.

Strict like every conversion here: every source key is used (or dropped for a stated reason), every target key is
filled, shapes are checked against the target config, the written tensors are read back and compared with their
sources, and where the models are small enough the outputs are compared (language-model logits, vision tower hidden
states, image features) between the HF model and plain transformers modules built from the original-format tensors.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..configuration_ms_llava import MSLlavaConfig, MSResamplerConfig
from ..image_processing_ms_llava import MSLlavaImageProcessor
from ..modeling_ms_llava import MSLlavaForConditionalGeneration, MSResampler
from ..processing_ms_llava import LLAVA_1_5_CHAT_TEMPLATE, MSLlavaProcessor
from .checkpoint_io import (
    BIN_WEIGHTS_NAME,
    HUB_ALLOW_PATTERNS,
    IMAGE_TOKEN,
    ConversionError,
    ConversionOutput,
    ConversionReport,
    KeyPlan,
    TensorSource,
    build_on_meta,
    copy_files,
    expected_state_dict_shapes,
    format_keys,
    has_weights,
    max_abs_difference,
    quiet_transformers,
    read_checkpoint,
    read_json,
    resolve_source,
    run_conversion,
)
from .llava import (
    DEFAULT_MAX_SHARD_SIZE,
    OVERWRITE_HELP,
    TOKENIZER_DATA_FILES,
    is_recomputed_buffer,
    plan_llava_tensors,
    save_config_files,
)

PROJECTOR_TYPES = ("mlp2x_gelu", "ms_resampler")
ORIGINAL_TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."
ORIGINAL_PROJECTOR_PREFIX = "model.mm_projector."
STAGE1_PROJECTOR_FILE = "mm_projector.bin"
# LLaVA-1.5's tower. hf-to-original writes this name only for a tower of its dimensions (DEFAULT_MM_VISION_TOWER_DIMS:
# hidden_size, image_size, patch_size) when the checkpoint records no mm_vision_tower of its own.
DEFAULT_MM_VISION_TOWER = "openai/clip-vit-large-patch14-336"
DEFAULT_MM_VISION_TOWER_DIMS = {"hidden_size": 1024, "image_size": 336, "patch_size": 14}
# original-to-hf records the source's mm_vision_tower under this name in the HF config's vision_config, where it
# survives save_pretrained / from_pretrained (and llava-to-ms-llava, which copies the vision_config); hf-to-original
# writes it back.
VISION_CONFIG_TOWER_FIELD = "mm_vision_tower"
SELECT_FEATURE_TO_STRATEGY = {"patch": "default", "cls_patch": "full"}
STRATEGY_TO_SELECT_FEATURE = {strategy: feature for feature, strategy in SELECT_FEATURE_TO_STRATEGY.items()}
ORIGINAL_MODEL_TYPES = ("llava_llama", "llava", "llama")
RESAMPLER_FIELDS = tuple(MSResamplerConfig.__annotations__)  # the resampler's own fields, as in mm_resampler_config
TOKENIZER_FILES = (*TOKENIZER_DATA_FILES, "tokenizer_config.json", "special_tokens_map.json")

# config.json fields of the original code base that this converter reads, and those it knows to be training-only.
ORIGINAL_MULTIMODAL_FIELDS = {
    "mm_vision_tower",
    "mm_hidden_size",
    "mm_projector_type",
    "mm_vision_select_layer",
    "mm_vision_select_feature",
    "mm_resampler_config",
    "image_aspect_ratio",
    "mm_use_im_start_end",
    "mm_use_im_patch_token",
    "mm_patch_merge_type",
}
ORIGINAL_TRAINING_FIELDS = {
    "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter",
    "unfreeze_mm_vision_tower",
    "mm_projector_lr",
    "mm_vision_tower_lr",
    "use_mm_proj",
    "tokenizer_model_max_length",
    "tokenizer_padding_side",
    "image_grid_pinpoints",
    "pretrain_mm_mlp_adapter",
}


def _llama_fields() -> set[str]:
    from transformers import LlamaConfig

    meta_fields = {"_name_or_path", "architectures", "model_type", "transformers_version", "dtype", "rope_parameters"}
    return (set(LlamaConfig().to_dict()) - meta_fields) | {"rope_theta", "rope_scaling", "torch_dtype"}


def key_rules(projector_type: str) -> list[tuple[str, str]]:
    """`(original prefix, HF prefix)` pairs, most specific first: the key map between the two layouts."""
    if projector_type == "mlp2x_gelu":  # nn.Sequential(Linear, GELU, Linear): indices 0 and 2
        projector = [
            (ORIGINAL_PROJECTOR_PREFIX + "0.", "model.multi_modal_projector.linear_1."),
            (ORIGINAL_PROJECTOR_PREFIX + "2.", "model.multi_modal_projector.linear_2."),
        ]
    else:  # ms_resampler: MSResampler.state_dict() names under both prefixes
        projector = [(ORIGINAL_PROJECTOR_PREFIX, "model.multi_modal_projector.")]
    return [
        (ORIGINAL_TOWER_PREFIX, "model.vision_tower."),
        *projector,
        ("lm_head.", "lm_head."),
        ("model.", "model.language_model."),
    ]


def original_to_hf_key(key: str, rules: list[tuple[str, str]]) -> str | None:
    """The HF name of an original-format key (the first matching rule), or None. A key no rule really covers (say
    `model.mm_projector.4.weight` of an mlp3x) falls to the `model.` rule and lands outside the target model, where
    the key accounting reports it as unknown."""
    for original, hf in rules:
        if key.startswith(original):
            return hf + key[len(original) :]
    return None


def hf_to_original_key(key: str, rules: list[tuple[str, str]]) -> str | None:
    """The original-format name of an HF (new layout) key, or None."""
    for original, hf in sorted(rules, key=lambda rule: -len(rule[1])):
        if key.startswith(hf):
            return original + key[len(hf) :]
    return None


# --------------------------------------------------------------------------------------------------------------------
# The original config.json
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class OriginalSettings:
    """What an original-format config.json says, checked."""

    projector_type: str
    mm_vision_tower: str | None
    select_layer: int
    select_strategy: str
    image_aspect_ratio: str
    mm_hidden_size: int | None
    resampler_config: dict | None
    text_config: object  # LlamaConfig
    ignored_fields: list[str] = field(default_factory=list)


def parse_original_config(config: dict, path: Path) -> OriginalSettings:
    """Reads and checks an original-format config.json; raises a ConversionError naming any unsupported setting."""
    from transformers import LlamaConfig

    if "mm_vision_tower" not in config and "mm_projector_type" not in config:
        raise ConversionError(f"{path}: no mm_vision_tower / mm_projector_type: not an original LLaVA config.json")
    model_type = config.get("model_type")
    if model_type not in ORIGINAL_MODEL_TYPES:
        raise ConversionError(
            f"{path}: model_type {model_type!r} is not supported (Llama-based LLaVA only: {ORIGINAL_MODEL_TYPES})"
        )
    projector_type = config.get("mm_projector_type", "linear")
    if projector_type not in PROJECTOR_TYPES:
        raise ConversionError(
            f"{path}: unknown mm_projector_type {projector_type!r}; this converter knows {list(PROJECTOR_TYPES)} "
            "(LLaVA-1.5's MLP and MS-Resampler)"
        )
    unsupported = []
    if config.get("mm_use_im_start_end"):
        unsupported.append("mm_use_im_start_end=true (image start/end tokens)")
    if config.get("mm_patch_merge_type", "flat") != "flat":
        unsupported.append(f"mm_patch_merge_type={config['mm_patch_merge_type']!r} (LLaVA-NeXT)")
    aspect = config.get("image_aspect_ratio", "square") or "square"
    if str(aspect).startswith("anyres"):
        unsupported.append(f"image_aspect_ratio={aspect!r} (LLaVA-NeXT)")
    select_feature = config.get("mm_vision_select_feature", "patch")
    if select_feature not in SELECT_FEATURE_TO_STRATEGY:
        unsupported.append(f"mm_vision_select_feature={select_feature!r}")
    select_layer = config.get("mm_vision_select_layer", -2)
    if isinstance(select_layer, bool) or not isinstance(select_layer, int):
        unsupported.append(f"mm_vision_select_layer={select_layer!r} (one integer layer expected)")
    resampler_config = None
    if projector_type == "ms_resampler":
        resampler_config = config.get("mm_resampler_config")
        if not isinstance(resampler_config, dict):
            unsupported.append("mm_projector_type 'ms_resampler' without an mm_resampler_config dict")
        else:
            unknown = sorted(set(resampler_config) - set(RESAMPLER_FIELDS))
            if unknown:
                unsupported.append(f"mm_resampler_config fields MSResamplerConfig does not have: {unknown}")
            else:
                try:
                    MSResamplerConfig(**resampler_config)
                except ValueError as error:
                    unsupported.append(f"mm_resampler_config: {error}")
    if unsupported:
        raise ConversionError(f"{path}: unsupported settings: " + "; ".join(unsupported))

    llama_fields = _llama_fields()
    text_kwargs = {name: value for name, value in config.items() if name in llama_fields}
    if "torch_dtype" in text_kwargs:
        text_kwargs["dtype"] = text_kwargs.pop("torch_dtype")
    # transformers 4.x's rope_theta / rope_scaling become transformers 5's rope_parameters
    rope_theta, rope_scaling = text_kwargs.pop("rope_theta", 10000.0), text_kwargs.pop("rope_scaling", None) or {}
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    extra = {key: value for key, value in rope_scaling.items() if key not in ("type", "rope_type")}
    text_kwargs["rope_parameters"] = {"rope_type": rope_type, "rope_theta": rope_theta, **extra}
    ignored = sorted(
        set(config)
        - llama_fields
        - ORIGINAL_MULTIMODAL_FIELDS
        - ORIGINAL_TRAINING_FIELDS
        - {"_name_or_path", "architectures", "model_type", "transformers_version"}
    )
    return OriginalSettings(
        projector_type=projector_type,
        mm_vision_tower=config.get("mm_vision_tower"),
        select_layer=select_layer,
        select_strategy=SELECT_FEATURE_TO_STRATEGY[select_feature],
        image_aspect_ratio=aspect,
        mm_hidden_size=config.get("mm_hidden_size"),
        resampler_config=resampler_config,
        text_config=LlamaConfig(**text_kwargs),
        ignored_fields=ignored,
    )


def original_config_dict(
    hf_config,
    projector_type: str,
    mm_vision_tower: str,
    image_aspect_ratio: str,
    vocab_size: int,
    tower_embedded: bool,
) -> dict:
    """The original code base's config.json for an HF LLaVA / MS-LLaVA config: the Llama fields (rope settings as
    `rope_theta` / `rope_scaling`, dtype as `torch_dtype`, as transformers 4.3x writes them) plus the mm_* fields."""
    text = hf_config.text_config.to_dict()
    llama_fields = _llama_fields()
    original = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama"}
    original.update({name: value for name, value in text.items() if name in llama_fields})
    rope = dict(text.get("rope_parameters") or {})
    if rope:
        original["rope_theta"] = rope.pop("rope_theta", 10000.0)
        rope_type = rope.pop("rope_type", "default")
        if rope_type != "default":  # transformers 4.x's default rope_scaling is None: left out
            original["rope_scaling"] = {"type": rope_type, **rope}
    original["torch_dtype"] = str(hf_config.dtype or "float32").removeprefix("torch.")
    original["vocab_size"] = vocab_size
    original.update(
        {
            "mm_vision_tower": mm_vision_tower,
            "mm_hidden_size": hf_config.vision_config.hidden_size,
            "mm_projector_type": projector_type,
            "mm_vision_select_layer": hf_config.vision_feature_layer,
            "mm_vision_select_feature": STRATEGY_TO_SELECT_FEATURE[hf_config.vision_feature_select_strategy],
            "image_aspect_ratio": image_aspect_ratio,
            "mm_patch_merge_type": "flat",
            "mm_use_im_start_end": False,
            "mm_use_im_patch_token": False,
            "tune_mm_mlp_adapter": False,
            "freeze_mm_mlp_adapter": False,
            # True makes the original CLIPVisionTower build the tower at construction, so the weights stored in the
            # checkpoint are the ones used; False loads it from mm_vision_tower.
            "unfreeze_mm_vision_tower": tower_embedded,
            "use_mm_proj": True,
        }
    )
    if projector_type == "ms_resampler":
        resampler = hf_config.resampler_config.to_dict()
        original["mm_resampler_config"] = {name: resampler[name] for name in RESAMPLER_FIELDS if name in resampler}
    return original


# --------------------------------------------------------------------------------------------------------------------
# Pieces: the vision tower, the tokenizer, the processor
# --------------------------------------------------------------------------------------------------------------------

CLIP_UNUSED_PREFIXES = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")


@dataclass
class VisionTower:
    config: object  # CLIPVisionConfig
    sources: list[TensorSource]  # renamed to original-format names
    image_settings: dict
    dropped: dict[str, list[str]]


def read_vision_tower(directory: Path, read_weights: bool) -> VisionTower:
    """A transformers CLIP checkpoint (CLIPVisionModel, or a full CLIPModel whose text half is dropped): its vision
    config, its tensors renamed to `model.vision_tower.vision_tower.vision_model.*`, and its preprocessing."""
    from transformers import CLIPConfig, CLIPVisionConfig

    model_type = read_json(directory / "config.json").get("model_type")
    if model_type == "clip_vision_model":
        config = CLIPVisionConfig.from_pretrained(directory)
    elif model_type == "clip":
        config = CLIPConfig.from_pretrained(directory).vision_config
    else:
        raise ConversionError(f"{directory}: --vision-tower must be a CLIP checkpoint, got model_type {model_type!r}")
    sources, dropped = [], {}
    if read_weights:
        for source in read_checkpoint(directory):
            name = source.name.removeprefix("vision_model.")
            if source.name.startswith(CLIP_UNUSED_PREFIXES):
                dropped.setdefault("CLIP text model and projection heads (LLaVA uses the vision model)", []).append(
                    source.name
                )
            elif is_recomputed_buffer(name):
                dropped.setdefault("buffer recomputed by transformers", []).append(source.name)
            else:
                sources.append(
                    TensorSource(ORIGINAL_TOWER_PREFIX + name, source.dtype, source.shape, source.load, source.origin)
                )
    return VisionTower(config, sources, read_image_settings(directory, config), dropped)


def read_image_settings(directory: Path | None, vision_config) -> dict:
    """Size, crop, mean, std and resampling from a CLIP directory's preprocessor config, or CLIP's defaults at the
    tower's resolution."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    image_size = vision_config.image_size
    settings = {
        "size": {"shortest_edge": image_size},
        "crop_size": {"height": image_size, "width": image_size},
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "resample": 3,  # bicubic
    }
    stored = {}
    if directory is not None and (directory / "preprocessor_config.json").is_file():
        stored = read_json(directory / "preprocessor_config.json")
    elif directory is not None and (directory / "processor_config.json").is_file():
        stored = read_json(directory / "processor_config.json").get("image_processor", {})
    for name in settings:
        if stored.get(name) is not None:
            settings[name] = stored[name]
    if isinstance(settings["size"], int):
        settings["size"] = {"shortest_edge": settings["size"]}
    if isinstance(settings["crop_size"], int):
        settings["crop_size"] = {"height": settings["crop_size"], "width": settings["crop_size"]}
    return settings


def read_original_weights(source_dir: Path, base_dir: Path | None, log: Callable[[str], None]) -> list[TensorSource]:
    """The tensors of an original-format checkpoint, named as in the original code base: its full weights, or the
    base LLM's weights plus a stage-1 `mm_projector.bin`."""
    stage1_file = source_dir / STAGE1_PROJECTOR_FILE
    if has_weights(source_dir):
        if stage1_file.is_file():
            raise ConversionError(
                f"{source_dir} holds both full weights and {STAGE1_PROJECTOR_FILE}: which projector is meant? "
                f"Move {STAGE1_PROJECTOR_FILE} away, or convert the stage-1 directory on its own with --base-llm"
            )
        if base_dir is not None:
            raise ConversionError(
                f"--base-llm is for stage-1 checkpoints ({STAGE1_PROJECTOR_FILE} only); {source_dir} has full weights"
            )
        log(f"reading {source_dir}")
        return read_checkpoint(source_dir)
    if stage1_file.is_file():
        if base_dir is None:
            raise ConversionError(
                f"{source_dir} is a stage-1 checkpoint ({STAGE1_PROJECTOR_FILE} only): pass --base-llm"
            )
        log(f"reading {base_dir} (language model) and {stage1_file} (projector)")
        return read_checkpoint(base_dir) + read_checkpoint(stage1_file)
    raise ConversionError(
        f"{source_dir}: no weights ({BIN_WEIGHTS_NAME}, model.safetensors, their indexes, or {STAGE1_PROJECTOR_FILE})"
    )


def find_vision_tower(
    vision_tower: str | Path | None, settings: OriginalSettings, tower_in_checkpoint: bool, source_dir: Path
) -> VisionTower:
    """The CLIP tower: its weights from the checkpoint when it has them, otherwise from `vision_tower`; its config and
    preprocessing from `vision_tower`, else from the config's `mm_vision_tower` (a local directory or a Hub id)."""
    if vision_tower is None and not tower_in_checkpoint:
        raise ConversionError(
            f"{source_dir}: the checkpoint holds no vision tower weights ({ORIGINAL_TOWER_PREFIX}*): pass "
            f"--vision-tower PATH, a transformers CLIP checkpoint (a download of {settings.mm_vision_tower!r})"
        )
    reference = vision_tower if vision_tower is not None else settings.mm_vision_tower
    try:
        directory = resolve_source(
            reference, ["*.json"] if tower_in_checkpoint else HUB_ALLOW_PATTERNS, "--vision-tower"
        )
    except ConversionError as error:
        raise ConversionError(
            f"the checkpoint's vision tower needs its config: {error}; pass --vision-tower DIR (a transformers CLIP "
            "checkpoint)"
        ) from error
    return read_vision_tower(directory, read_weights=not tower_in_checkpoint)


def _has_tokenizer(directory: Path | None) -> bool:
    return directory is not None and any((directory / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer_with_image_token(directory: Path):
    """The tokenizer of `directory`, with `<image>` added as a special token when it does not know it.

    Returns `(tokenizer, image_token_id, added)`. An added token gets the next id, `len(tokenizer)` before adding."""
    from transformers import AddedToken, AutoTokenizer

    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(directory)
    except Exception as error:
        raise ConversionError(f"{directory}: cannot load the tokenizer: {error}") from error
    token_ids = tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)
    if len(token_ids) == 1:
        return tokenizer, token_ids[0], False
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return tokenizer, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), True


def with_extra_rows(source: TensorSource, rows: int) -> TensorSource:
    """`source` (a `(vocab, hidden)` matrix) grown to `rows` rows, each new row the mean of the existing ones."""

    def load() -> torch.Tensor:
        weight = source.load()
        mean_row = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
        return torch.cat([weight, mean_row.expand(rows - weight.shape[0], -1)])

    return TensorSource(source.name, source.dtype, (rows, *source.shape[1:]), load, f"{source.origin} + mean row")


def without_last_rows(source: TensorSource, rows: int) -> TensorSource:
    """`source` cut to its first `rows` rows."""
    return TensorSource(
        source.name, source.dtype, (rows, *source.shape[1:]), lambda: source.load()[:rows].clone(), source.origin
    )


def strip_image_token_files(directory: Path, image_token_id: int) -> None:
    """Removes `<image>` (an added token with the last id) from the tokenizer files in `directory`, then checks the
    tokenizer loads without it."""
    from transformers import AutoTokenizer

    tokenizer_json = directory / "tokenizer.json"
    if tokenizer_json.is_file():
        data = read_json(tokenizer_json)
        kept = [
            t for t in data.get("added_tokens", []) if not (t["id"] == image_token_id and t["content"] == IMAGE_TOKEN)
        ]
        if len(kept) != len(data.get("added_tokens", [])) - 1:
            raise ConversionError(f"{tokenizer_json}: {IMAGE_TOKEN} is not an added token with id {image_token_id}")
        data["added_tokens"] = kept
        tokenizer_json.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        path = directory / name
        if not path.is_file():
            continue
        data = read_json(path)
        data.pop(IMAGE_TOKEN, None)  # added_tokens.json: token -> id
        (data.get("added_tokens_decoder") or {}).pop(str(image_token_id), None)
        for list_name in ("additional_special_tokens", "extra_special_tokens"):
            if isinstance(data.get(list_name), list):
                data[list_name] = [
                    t for t in data[list_name] if (t.get("content") if isinstance(t, dict) else t) != IMAGE_TOKEN
                ]
        for map_name in ("model_specific_special_tokens", "extra_special_tokens"):
            if isinstance(data.get(map_name), dict):
                data[map_name] = {k: v for k, v in data[map_name].items() if v != IMAGE_TOKEN}
        if data.get("image_token") == IMAGE_TOKEN:
            del data["image_token"]
        path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(directory)
    if len(tokenizer) != image_token_id or tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False) == [image_token_id]:
        raise ConversionError(f"{directory}: could not remove {IMAGE_TOKEN} from the tokenizer")


def build_hf_processor(projector_type: str, hf_config, tokenizer, image_settings: dict, do_pad: bool):
    """LlavaProcessor (mlp2x_gelu) or MSLlavaProcessor (ms_resampler), LLaVA-1.5's chat template unless the tokenizer
    has its own."""
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    chat_template = getattr(tokenizer, "chat_template", None) or LLAVA_1_5_CHAT_TEMPLATE
    if projector_type == "ms_resampler":
        return MSLlavaProcessor(
            image_processor=MSLlavaImageProcessor(**image_settings, do_pad=do_pad),
            tokenizer=tokenizer,
            chat_template=chat_template,
            num_image_tokens=hf_config.resampler_config.num_queries,
            image_token=IMAGE_TOKEN,
        )
    return LlavaProcessor(
        image_processor=LlavaImageProcessorPil(**image_settings, do_pad=do_pad),
        tokenizer=tokenizer,
        patch_size=hf_config.vision_config.patch_size,
        vision_feature_select_strategy=hf_config.vision_feature_select_strategy,
        chat_template=chat_template,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


def build_hf_config(
    settings: OriginalSettings, vision_config, image_token_id: int, mm_vision_tower: str | None = None
):
    """LlavaConfig (mlp2x_gelu) or MSLlavaConfig (ms_resampler), and the model class. `mm_vision_tower`, when given,
    is recorded in the vision_config (`VISION_CONFIG_TOWER_FIELD`) for hf-to-original to write back."""
    from transformers import LlavaConfig

    vision = vision_config.to_dict()
    if mm_vision_tower:
        vision[VISION_CONFIG_TOWER_FIELD] = mm_vision_tower
    common = {
        "vision_config": vision,
        "text_config": settings.text_config.to_dict(),
        "vision_feature_layer": settings.select_layer,
        "vision_feature_select_strategy": settings.select_strategy,
        "tie_word_embeddings": settings.text_config.tie_word_embeddings,
    }
    try:
        if settings.projector_type == "ms_resampler":
            config = MSLlavaConfig(resampler_config=settings.resampler_config, image_token_id=image_token_id, **common)
            return config, MSLlavaForConditionalGeneration
        from transformers import LlavaForConditionalGeneration

        grid = vision_config.image_size // vision_config.patch_size
        image_seq_length = grid * grid + (1 if settings.select_strategy == "full" else 0)
        config = LlavaConfig(
            projector_hidden_act="gelu", image_seq_length=image_seq_length, image_token_index=image_token_id, **common
        )
        return config, LlavaForConditionalGeneration
    except ValueError as error:
        raise ConversionError(f"cannot build the HF config: {error}") from error


# --------------------------------------------------------------------------------------------------------------------
# Parity: the HF model against plain transformers modules built from the original-format tensors
# --------------------------------------------------------------------------------------------------------------------


def _load_into(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], optional: set[str], what: str):
    result = module.load_state_dict(state_dict, strict=False)
    missing = set(result.missing_keys) - optional
    if missing or result.unexpected_keys:
        raise ConversionError(
            f"parity reference {what}: missing {format_keys(sorted(missing))}; "
            f"unexpected {format_keys(result.unexpected_keys)}"
        )


def check_original_parity(
    hf_dir: Path, hf_config, projector_type: str, original: dict[str, TensorSource]
) -> dict[str, float]:
    """Compares the HF checkpoint in `hf_dir` (loaded with from_pretrained, float32) with references built from the
    original-format tensors `original`: a LlamaForCausalLM (logits on a text-only prompt), a CLIPVisionModel (every
    hidden state on a random image) and the projector (image features = projector(selected tower features), with the
    original code base's selection: hidden_states[mm_vision_select_layer], CLS dropped for 'patch')."""
    from transformers import AutoModelForImageTextToText, CLIPVisionModel, LlamaForCausalLM

    generator = torch.Generator().manual_seed(0)
    embed = original["model.embed_tokens.weight"]
    vocab_size = embed.shape[0]
    input_ids = torch.randint(0, min(vocab_size, hf_config.text_config.vocab_size), (1, 12), generator=generator)
    input_ids[input_ids == hf_config.image_token_id] = 0 if hf_config.image_token_id != 0 else 1
    image_size = hf_config.vision_config.image_size
    pixel_values = torch.randn(1, 3, image_size, image_size, generator=generator)
    layer, strategy = hf_config.vision_feature_layer, hf_config.vision_feature_select_strategy
    grid = image_size // hf_config.vision_config.patch_size

    def select(hidden_states):  # the original CLIPVisionTower.feature_select
        features = hidden_states[layer]
        return features[:, 1:] if strategy == "default" else features

    with quiet_transformers(), torch.no_grad():
        hf_model = AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32).eval()
        hf_logits = hf_model(input_ids=input_ids).logits[..., :vocab_size]
        hf_hidden = hf_model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        hf_features = hf_model.model.get_image_features(pixel_values=pixel_values).pooler_output[0]
        del hf_model
        gc.collect()  # free the HF model before building the references

        def tensors(prefix: str, strip: str = "") -> dict[str, torch.Tensor]:
            return {
                name.removeprefix(strip): source.load().float()
                for name, source in original.items()
                if name.startswith(prefix) and not is_recomputed_buffer(name)
            }

        text_config = copy.deepcopy(hf_config.text_config)
        text_config.vocab_size = vocab_size
        language_model = LlamaForCausalLM(text_config)
        lm_tensors = {
            name: tensor
            for name, tensor in {**tensors("model."), **tensors("lm_head.")}.items()
            if not name.startswith(("model.mm_projector.", "model.vision_tower."))
        }
        tied = {"lm_head.weight"} if hf_config.tie_word_embeddings else set()
        _load_into(language_model, lm_tensors, tied, "language model")
        reference_logits = language_model.eval()(input_ids=input_ids).logits
        del language_model
        gc.collect()

        results = {"language model logits (text-only prompt)": max_abs_difference(reference_logits, hf_logits)}
        tower_tensors = tensors(ORIGINAL_TOWER_PREFIX, ORIGINAL_TOWER_PREFIX)
        if tower_tensors:
            tower = CLIPVisionModel(hf_config.vision_config).eval()
            _load_into(tower, tower_tensors, set(), "vision tower")
            reference_hidden = tower(pixel_values, output_hidden_states=True).hidden_states
            del tower
            results["vision tower hidden states (random image)"] = max_abs_difference(
                torch.stack(reference_hidden), torch.stack(hf_hidden)
            )
        else:  # the tower stays out of the original checkpoint: check the projector on the HF tower's features
            reference_hidden = hf_hidden
        features = select(reference_hidden)
        projector = tensors(ORIGINAL_PROJECTOR_PREFIX, ORIGINAL_PROJECTOR_PREFIX)
        if projector_type == "mlp2x_gelu":
            hidden = torch.nn.functional.linear(features, projector["0.weight"], projector["0.bias"])
            reference_features = torch.nn.functional.linear(
                torch.nn.functional.gelu(hidden), projector["2.weight"], projector["2.bias"]
            )
        else:
            resampler = MSResampler(hf_config).eval()
            _load_into(resampler, projector, set(), "MS-Resampler")
            prefix_tokens = 0 if strategy == "default" else 1
            reference_features = resampler(features, grid_size=(grid, grid), num_prefix_tokens=prefix_tokens)
        what = "image features (tower + selection + projector)" if tower_tensors else "image features (projector)"
        results[what] = max_abs_difference(reference_features[0], hf_features)
    return results


# --------------------------------------------------------------------------------------------------------------------
# original -> HF
# --------------------------------------------------------------------------------------------------------------------


def convert_original_to_hf(
    source: str | Path,
    output: str | Path,
    *,
    vision_tower: str | Path | None = None,
    base_llm: str | Path | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    check_parity: bool = True,
    log: Callable[[str], None] = print,
) -> ConversionReport:
    """Converts an original-format LLaVA checkpoint to transformers' layout.

    Args:
        source: The original checkpoint directory: config.json plus full weights (`pytorch_model*.bin` with its index,
            or safetensors), or plus only a stage-1 `mm_projector.bin` (then `base_llm` gives the language model).
        output: The HF checkpoint directory to write (refused when not empty, unless `overwrite`).
        vision_tower: A transformers CLIP checkpoint (directory or Hub id); required when the checkpoint holds no
            `model.vision_tower.*` weights, otherwise used only for the vision config and the preprocessing.
        base_llm: A Llama checkpoint (the language model of a stage-1 checkpoint; also its tokenizer when the source
            has none).

    The source's `mm_vision_tower` (else `vision_tower`) is recorded as `vision_config.mm_vision_tower` in the
    output's config, for `convert_hf_to_original` to write back.
    """
    job = ConversionOutput.start(output, max_shard_size, overwrite, check_parity, log)
    source_dir = resolve_source(source, HUB_ALLOW_PATTERNS + ["*.bin"])
    settings = parse_original_config(read_json(source_dir / "config.json"), source_dir / "config.json")
    base_dir = resolve_source(base_llm, HUB_ALLOW_PATTERNS + ["*.bin"], "--base-llm") if base_llm is not None else None
    notes = [f"config fields not used: {', '.join(settings.ignored_fields)}"] if settings.ignored_fields else []

    sources = read_original_weights(source_dir, base_dir, log)
    tower_in_checkpoint = any(source.name.startswith(ORIGINAL_TOWER_PREFIX) for source in sources)
    tower = find_vision_tower(vision_tower, settings, tower_in_checkpoint, source_dir)
    if tower_in_checkpoint and vision_tower is not None:
        notes.append(
            "the vision tower's weights come from the checkpoint; --vision-tower gave its config and preprocessing"
        )
    sources += tower.sources
    vision_config, image_settings = tower.config, tower.image_settings
    if settings.mm_hidden_size is not None and settings.mm_hidden_size != vision_config.hidden_size:
        raise ConversionError(
            f"mm_hidden_size is {settings.mm_hidden_size} but the vision tower's hidden_size is "
            f"{vision_config.hidden_size}"
        )

    # the tokenizer, with <image>
    tokenizer_dir = source_dir if _has_tokenizer(source_dir) else base_dir if _has_tokenizer(base_dir) else None
    if tokenizer_dir is None:
        raise ConversionError(f"no tokenizer files in {source_dir}" + (f" or {base_dir}" if base_dir else ""))
    tokenizer, image_token_id, token_added = load_tokenizer_with_image_token(tokenizer_dir)
    embed = next((s for s in sources if s.name == "model.embed_tokens.weight"), None)
    if embed is None:
        raise ConversionError("the checkpoint has no model.embed_tokens.weight")
    rows = embed.shape[0]
    new_rows = rows + 1 if token_added and image_token_id == rows else rows
    if image_token_id >= new_rows:
        raise ConversionError(
            f"the tokenizer has {len(tokenizer)} tokens ({IMAGE_TOKEN} = {image_token_id}) but the embedding only "
            f"{rows} rows"
        )
    settings.text_config.vocab_size = new_rows
    # the source's mm_vision_tower (else the --vision-tower it was converted with), for hf-to-original to restore
    recorded_tower = settings.mm_vision_tower or (str(vision_tower) if vision_tower is not None else None)
    hf_config, model_class = build_hf_config(settings, vision_config, image_token_id, recorded_tower)
    meta_model = build_on_meta(model_class, hf_config)
    expected_shapes, tied_keys = expected_state_dict_shapes(meta_model)

    # the key map
    rules = key_rules(settings.projector_type)
    plan = KeyPlan(f"{source_dir} -> transformers")
    plan.dropped.update(tower.dropped)
    for source in sources:
        key = original_to_hf_key(source.name, rules)
        if key is not None and key.startswith("model.vision_tower.vision_model.") and key not in expected_shapes:
            key = "model.vision_tower." + key.removeprefix("model.vision_tower.vision_model.")
        if key in expected_shapes:
            plan.add(key, source)
        elif is_recomputed_buffer(source.name):
            plan.drop(source.name, "buffer recomputed by transformers")
        else:
            plan.unknown(source.name)
    report = ConversionReport(output=job.output, notes=notes)
    if new_rows != rows:
        grown = [key for key in ("model.language_model.embed_tokens.weight", "lm_head.weight") if key in plan.entries]
        for key in grown:
            plan.replace(key, with_extra_rows(plan.entries[key], new_rows))
        report.created[f"row {image_token_id} for the added {IMAGE_TOKEN} token (mean of the other rows)"] = grown
    if token_added:
        report.notes.append(
            f"added {IMAGE_TOKEN} to the tokenizer as id {image_token_id}; vocab_size {rows} -> {new_rows}"
        )
    plan.check(expected_shapes, optional=tied_keys)
    report.dropped = plan.dropped
    processor = build_hf_processor(
        settings.projector_type, hf_config, tokenizer, image_settings, do_pad=settings.image_aspect_ratio == "pad"
    )

    original_sources = {source.name: source for source in sources}
    dtype = plan.entries["model.language_model.embed_tokens.weight"].dtype

    def write_files(staging: Path) -> None:
        generation_dir = source_dir if (source_dir / "generation_config.json").is_file() else base_dir
        save_config_files(meta_model, hf_config, dtype, staging, generation_source=generation_dir)
        processor.save_pretrained(staging)
        copy_files(tokenizer_dir, staging, ["tokenizer.model"] if token_added else TOKENIZER_DATA_FILES)

    def parity(staging: Path) -> dict[str, float]:
        return check_original_parity(staging, hf_config, settings.projector_type, original_sources)

    what = "HF model vs modules built from the original tensors"
    return job.write(plan, report, [d for d in (source_dir, base_dir) if d], write_files, parity, what)


# --------------------------------------------------------------------------------------------------------------------
# HF -> original
# --------------------------------------------------------------------------------------------------------------------


def convert_hf_to_original(
    source: str | Path,
    output: str | Path,
    *,
    mm_vision_tower: str | None = None,
    exclude_vision_tower: bool = False,
    strip_image_token: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    check_parity: bool = True,
    log: Callable[[str], None] = print,
) -> ConversionReport:
    """Converts a transformers LLaVA (`mlp2x_gelu`) or MS-LLaVA (`ms_resampler`) checkpoint to the original format.

    Args:
        source: The HF checkpoint directory (old or new key layout) or a Hub repo id.
        output: The original-format directory to write.
        mm_vision_tower: What config.json's `mm_vision_tower` says (the original code base builds the CLIP tower from
            it, then fills it from the checkpoint when `unfreeze_mm_vision_tower` is true). `None` (the default): the
            name the checkpoint records (`vision_config.mm_vision_tower`, written by `original-to-hf`), else
            `openai/clip-vit-large-patch14-336` if the tower has its dimensions, else a ConversionError (see
            `output_mm_vision_tower`).
        exclude_vision_tower: Leave the tower's weights out (the original code base then loads `mm_vision_tower`).
        strip_image_token: Remove the `<image>` token that `original-to-hf` appended (it must be the last token and
            the last embedding row), giving back the original vocabulary.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    job = ConversionOutput.start(output, max_shard_size, overwrite, check_parity, log)
    source_dir = resolve_source(source, HUB_ALLOW_PATTERNS)
    model_type = read_json(source_dir / "config.json").get("model_type")
    if model_type == "llava":
        hf_config, model_class, projector_type = (
            LlavaConfig.from_pretrained(source_dir),
            LlavaForConditionalGeneration,
            "mlp2x_gelu",
        )
    elif model_type == "ms_llava":
        hf_config = MSLlavaConfig.from_pretrained(source_dir)
        model_class, projector_type = MSLlavaForConditionalGeneration, "ms_resampler"
    else:
        raise ConversionError(f"{source_dir}: expected model_type 'llava' or 'ms_llava', got {model_type!r}")
    unsupported = []
    if hf_config.text_config.model_type != "llama":
        unsupported.append(f"text model {hf_config.text_config.model_type!r} (Llama only)")
    if hf_config.vision_config.model_type != "clip_vision_model":
        unsupported.append(f"vision tower {hf_config.vision_config.model_type!r} (CLIP only)")
    if not isinstance(hf_config.vision_feature_layer, int):
        unsupported.append(f"vision_feature_layer={hf_config.vision_feature_layer} (one layer only)")
    if model_type == "llava" and (hf_config.projector_hidden_act != "gelu" or not hf_config.multimodal_projector_bias):
        unsupported.append("a projector other than Linear-GELU-Linear with biases (mlp2x_gelu)")
    if unsupported:
        raise ConversionError(f"{source_dir}: no original-format equivalent for: " + "; ".join(unsupported))

    meta_model = build_on_meta(model_class, hf_config)
    expected_shapes, tied_keys = expected_state_dict_shapes(meta_model)
    log(f"reading {source_dir}")
    hf_plan = KeyPlan(f"{source_dir} (transformers layout)")
    plan_llava_tensors(read_checkpoint(source_dir), expected_shapes, hf_plan, keep_projector=True)
    hf_plan.check(expected_shapes, optional=tied_keys)

    rules = key_rules(projector_type)
    plan = KeyPlan(f"{source_dir} -> original format")
    plan.dropped.update(hf_plan.dropped)
    for key, source in hf_plan.entries.items():
        if exclude_vision_tower and key.startswith("model.vision_tower."):
            plan.drop(source.name, "vision tower left out (--exclude-vision-tower): loaded from mm_vision_tower")
            continue
        original_key = hf_to_original_key(key, rules)
        if original_key is None:
            plan.unknown(source.name)
        else:
            plan.add(original_key, source)
    rows = plan.entries["model.embed_tokens.weight"].shape[0]
    report = ConversionReport(output=job.output)
    if not _has_tokenizer(source_dir):
        if strip_image_token:
            raise ConversionError(f"--strip-image-token: {source_dir} has no tokenizer files")
        report.notes.append(f"{source_dir} has no tokenizer files: the output has none either")
    if strip_image_token:
        if hf_config.image_token_id != rows - 1:
            raise ConversionError(
                f"--strip-image-token: {IMAGE_TOKEN} (id {hf_config.image_token_id}) is not the last of the {rows} "
                "embedding rows, so it was not appended by original-to-hf; convert without --strip-image-token"
            )
        rows -= 1
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            if key in plan.entries:
                plan.replace(key, without_last_rows(plan.entries[key], rows))
        report.notes.append(f"removed {IMAGE_TOKEN} (id {rows}) from the tokenizer and the embeddings")
    plan.check({key: source.shape for key, source in plan.entries.items()})  # unknown keys / duplicates
    report.dropped = plan.dropped

    processor_config = {}
    for name in ("processor_config.json", "preprocessor_config.json"):
        if (source_dir / name).is_file():
            stored = read_json(source_dir / name)
            processor_config = stored.get("image_processor", stored)
            break
    aspect = "square" if processor_config.get("do_pad") is False else "pad"  # LLaVA-1.5 pads unless told not to
    hf_config.dtype = plan.entries["model.embed_tokens.weight"].dtype
    original_config = original_config_dict(
        hf_config,
        projector_type,
        output_mm_vision_tower(hf_config.vision_config, mm_vision_tower, source_dir),
        aspect,
        rows,
        tower_embedded=not exclude_vision_tower,
    )

    def write_files(staging: Path) -> None:
        copy_files(source_dir, staging, ["generation_config.json", *TOKENIZER_FILES])
        if strip_image_token:
            strip_image_token_files(staging, rows)
        _make_tokenizer_class_portable(staging, report)
        (staging / "config.json").write_text(json.dumps(original_config, indent=2) + "\n", encoding="utf-8")

    def parity(staging: Path) -> dict[str, float]:
        written = {source.name: source for source in read_checkpoint(staging)}
        return check_original_parity(source_dir, hf_config, projector_type, written)

    what = "source HF model vs modules built from the written original tensors"
    return job.write(plan, report, [source_dir], write_files, parity, what)


def output_mm_vision_tower(vision_config, mm_vision_tower: str | None, source_dir: Path) -> str:
    """The `mm_vision_tower` hf-to-original writes: `mm_vision_tower` when given; else the name recorded in the
    vision config (`VISION_CONFIG_TOWER_FIELD`, which original-to-hf writes); else `DEFAULT_MM_VISION_TOWER` when the
    tower has its hidden size, image size and patch size. A tower of other dimensions with no recorded name is a
    ConversionError: writing LLaVA-1.5's tower name for it would make the original code base build the wrong tower."""
    if mm_vision_tower:
        return mm_vision_tower
    recorded = getattr(vision_config, VISION_CONFIG_TOWER_FIELD, None)
    if isinstance(recorded, str) and recorded:
        return recorded
    dims = {name: getattr(vision_config, name, None) for name in DEFAULT_MM_VISION_TOWER_DIMS}
    if dims == DEFAULT_MM_VISION_TOWER_DIMS:
        return DEFAULT_MM_VISION_TOWER
    shown = ", ".join(f"{name} {value}" for name, value in dims.items())
    expected = ", ".join(f"{name} {value}" for name, value in DEFAULT_MM_VISION_TOWER_DIMS.items())
    raise ConversionError(
        f"{source_dir}: the vision tower ({shown}) is not {DEFAULT_MM_VISION_TOWER} ({expected}) and the checkpoint "
        f"records no mm_vision_tower (vision_config.{VISION_CONFIG_TOWER_FIELD}): pass --mm-vision-tower NAME_OR_PATH, "
        "the CLIP tower the original code base should load"
    )


def _make_tokenizer_class_portable(directory: Path, report: ConversionReport) -> None:
    """transformers 5 records `tokenizer_class: "TokenizersBackend"`, a class the original code base's transformers
    (4.3x) lacks; a Llama tokenizer with its SentencePiece model is recorded as `LlamaTokenizer` instead."""
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return
    data = read_json(path)
    if data.get("tokenizer_class") == "TokenizersBackend":
        if (directory / "tokenizer.model").is_file():
            data["tokenizer_class"] = "LlamaTokenizer"
            path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        else:
            report.notes.append(
                "tokenizer_config.json names transformers 5's TokenizersBackend and there is no tokenizer.model: the "
                "original code base (transformers 4.3x, use_fast=False) needs a SentencePiece tokenizer.model"
            )


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help=f"largest output shard, e.g. 2GB or 200MB ({DEFAULT_MAX_SHARD_SIZE}; each is held in memory to write it)",
    )
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    parser.add_argument("--no-parity", action="store_true", help="skip the output parity check")


def _add_original_to_hf_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, help="original-format checkpoint directory (or stage-1 directory)")
    parser.add_argument("--output", required=True, help="the transformers checkpoint directory to write")
    parser.add_argument("--vision-tower", help="a transformers CLIP checkpoint, when the checkpoint holds no tower")
    parser.add_argument("--base-llm", help="the Llama checkpoint of a stage-1 (mm_projector.bin only) checkpoint")
    _add_common_arguments(parser)


def _add_hf_to_original_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, help="a transformers LLaVA or MS-LLaVA checkpoint directory")
    parser.add_argument("--output", required=True, help="the original-format directory to write")
    parser.add_argument(
        "--mm-vision-tower",
        default=None,
        help="config.json's mm_vision_tower (default: from the checkpoint, i.e. the name original-to-hf recorded in "
        f"vision_config.{VISION_CONFIG_TOWER_FIELD}, else {DEFAULT_MM_VISION_TOWER} if the tower has its "
        "dimensions; otherwise this option is required)",
    )
    parser.add_argument(
        "--exclude-vision-tower", action="store_true", help="leave the tower out (loaded from mm_vision_tower)"
    )
    parser.add_argument(
        "--strip-image-token",
        action="store_true",
        help="remove the <image> token that original-to-hf appended (restores the original vocabulary)",
    )
    _add_common_arguments(parser)


def _handle_original_to_hf(args: argparse.Namespace) -> int:
    return run_conversion(
        lambda: convert_original_to_hf(
            args.source,
            args.output,
            vision_tower=args.vision_tower,
            base_llm=args.base_llm,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            check_parity=not args.no_parity,
        )
    )


def _handle_hf_to_original(args: argparse.Namespace) -> int:
    return run_conversion(
        lambda: convert_hf_to_original(
            args.source,
            args.output,
            mm_vision_tower=args.mm_vision_tower,
            exclude_vision_tower=args.exclude_vision_tower,
            strip_image_token=args.strip_image_token,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            check_parity=not args.no_parity,
        )
    )


def add_cli(subparsers) -> None:
    """Registers `original-to-hf` and `hf-to-original` on an argparse subparsers object; `args.handler(args)` runs
    the chosen one and returns the exit code."""
    to_hf = subparsers.add_parser(
        "original-to-hf",
        help="original LLaVA code base checkpoint -> transformers (LLaVA or MS-LLaVA)",
        description="Convert an original-format LLaVA checkpoint (mlp2x_gelu or ms_resampler) to transformers.",
    )
    _add_original_to_hf_arguments(to_hf)
    to_hf.set_defaults(handler=_handle_original_to_hf)
    to_original = subparsers.add_parser(
        "hf-to-original",
        help="transformers LLaVA / MS-LLaVA checkpoint -> the original LLaVA code base's format",
        description="Convert a transformers LLaVA or MS-LLaVA checkpoint to the original LLaVA code base's format.",
    )
    _add_hf_to_original_arguments(to_original)
    to_original.set_defaults(handler=_handle_hf_to_original)


def main(argv: list[str] | None = None) -> int:
    """`convert_original_llava_to_hf.py [--direction original-to-hf|hf-to-original] ARGS...`"""
    argv = list(sys.argv[1:] if argv is None else argv)
    chooser = argparse.ArgumentParser(add_help=False)
    chooser.add_argument("--direction", choices=("original-to-hf", "hf-to-original"), default="original-to-hf")
    chosen, rest = chooser.parse_known_args(argv)
    parser = argparse.ArgumentParser(
        prog="convert_original_llava_to_hf.py",
        description="Convert between the original LLaVA code base's checkpoints and transformers' layout.",
    )
    parser.add_argument(
        "--direction",
        choices=("original-to-hf", "hf-to-original"),
        default="original-to-hf",
        help="original-to-hf (default) or hf-to-original; the other arguments depend on it",
    )
    if chosen.direction == "original-to-hf":
        _add_original_to_hf_arguments(parser)
        handler = _handle_original_to_hf
    else:
        _add_hf_to_original_arguments(parser)
        handler = _handle_hf_to_original
    return handler(parser.parse_args(argv))


__all__ = [
    "DEFAULT_MM_VISION_TOWER",
    "ORIGINAL_PROJECTOR_PREFIX",
    "ORIGINAL_TOWER_PREFIX",
    "PROJECTOR_TYPES",
    "add_cli",
    "convert_hf_to_original",
    "convert_original_to_hf",
    "hf_to_original_key",
    "key_rules",
    "main",
    "original_to_hf_key",
    "output_mm_vision_tower",
]
