"""Original -> HF: a checkpoint of the original LLaVA code base (haotian-liu/LLaVA's `LlavaLlamaForCausalLM`) becomes a
transformers checkpoint: with an `mlp2x_gelu` projector a `LlavaForConditionalGeneration` (which `convert
llava-to-ms-llava` then takes), with an `ms_resampler` one (`mm_resampler_config`: MSResamplerConfig's fields) an
MS-LLaVA. The original format is a Llama checkpoint (`model.embed_tokens`, `model.layers.*`, `model.norm`, `lm_head`)
plus `model.mm_projector.*`, the CLIP tower when it was saved (`model.vision_tower.vision_tower.*`; otherwise
`--vision-tower`) and the LLaVA settings in config.json (`mm_vision_tower`, `mm_vision_select_layer`, ...); stage 1
writes `mm_projector.bin` alone (then `--base-llm`). Every tensor is carried over bit for bit; the code base splices id
-200 for images, so `<image>` is added to the tokenizer and the embeddings grow as `compose` grows them."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn import functional
from transformers import (
    AutoModel,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from ..checkpoints import load_config, read_json, resolve_checkpoint, tensor_headers, weight_files
from ..image_processing_ms_llava import MSLlavaImageProcessor
from ..modeling_ms_llava import MSLlavaForConditionalGeneration, MSResampler
from ..processing_ms_llava import LLAVA_1_5_CHAT_TEMPLATE, MSLlavaProcessor
from . import streaming
from .streaming import EMBED, IMAGE_TOKEN, ConversionError

MODEL_TYPES = ("llava_llama", "llava", "llama")
TOWER, PROJECTOR, STAGE1 = "model.vision_tower.vision_tower.", "model.mm_projector.", "mm_projector.bin"
PROJECTORS = {"mlp2x_gelu": {"0.": "linear_1.", "2.": "linear_2."}, "ms_resampler": {"": ""}}  # original -> HF names
# mm_vision_select_feature -> vision_feature_select_strategy
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}
# config.json fields read here, or not the language model's
LLAVA_FIELDS = {"mm_vision_tower", "mm_projector_type", "mm_resampler_config", "mm_vision_select_layer"}
LLAVA_FIELDS |= {"mm_vision_select_feature", "image_aspect_ratio", "mm_patch_merge_type", "mm_use_im_start_end"}
LLAVA_FIELDS |= {"architectures", "model_type", "transformers_version", "_name_or_path"}


def read_original_config(path: Path) -> tuple[dict, LlamaConfig, list[str]]:
    """`(LLaVA settings, the language model's LlamaConfig, the fields not used)` of an original config.json; a
    `ConversionError` names every field whose value has no transformers equivalent here."""
    config = read_json(path, "--source ")
    if "mm_vision_tower" not in config and "mm_projector_type" not in config:
        raise ConversionError(f"{path}: no mm_vision_tower or mm_projector_type: not an original LLaVA config.json")
    model_type, projector = config.get("model_type"), config.get("mm_projector_type", "linear")
    feature, layer = config.get("mm_vision_select_feature", "patch"), config.get("mm_vision_select_layer", -2)
    aspect, merge = config.get("image_aspect_ratio") or "square", config.get("mm_patch_merge_type", "flat")
    resampler = config.get("mm_resampler_config")
    checks = {
        f"model_type {model_type!r} (Llama-based LLaVA only: {', '.join(MODEL_TYPES)})": model_type in MODEL_TYPES,
        f"unknown mm_projector_type {projector!r} (known: {', '.join(PROJECTORS)})": projector in PROJECTORS,
        f"mm_resampler_config {resampler!r} (ms_resampler needs its settings)": projector != "ms_resampler"
        or isinstance(resampler, dict),
        f"mm_vision_select_feature {feature!r} (patch or cls_patch)": feature in SELECT_FEATURE,
        f"mm_vision_select_layer {layer!r} (one layer index)": type(layer) is int,
        f"image_aspect_ratio {aspect!r} (LLaVA-NeXT's)": not str(aspect).startswith("anyres"),
        f"mm_patch_merge_type {merge!r} (LLaVA-NeXT's)": merge == "flat",
        "mm_use_im_start_end true (image start and end tokens)": not config.get("mm_use_im_start_end"),
    }
    if problems := [what for what, supported in checks.items() if not supported]:
        raise ConversionError(f"{path}: cannot convert {'; '.join(problems)}")
    llama = set(LlamaConfig().to_dict()) - LLAVA_FIELDS | {
        "rope_theta",
        "rope_scaling",
        "torch_dtype",
    }  # transformers 4's names, which LlamaConfig still takes
    settings = {"projector": projector, "layer": layer, "strategy": SELECT_FEATURE[feature], "do_pad": aspect == "pad"}
    settings |= {"resampler": resampler, "mm_vision_tower": config.get("mm_vision_tower")}
    unused = sorted(set(config) - llama - LLAVA_FIELDS)
    return settings, LlamaConfig(**{k: v for k, v in config.items() if k in llama}), unused


def original_sources(source_dir: Path, base_dir: Path | None) -> list[streaming.Source]:
    """The original checkpoint's tensors: its own weights, or (stage 1) `mm_projector.bin` and `base_dir`'s LLM."""
    stage1 = source_dir / STAGE1
    if base_dir is None:
        if stage1.is_file() and not weight_files(source_dir, "--source"):
            raise ConversionError(f"--source {source_dir} is a stage-1 checkpoint ({STAGE1} only): pass --base-llm")
        return streaming.read_sources(source_dir, "--source")
    if not stage1.is_file():
        raise ConversionError(f"--base-llm is for a stage-1 checkpoint ({STAGE1} beside config.json): {source_dir}")
    projector = [streaming.Source(stage1, k, *header) for k, header in tensor_headers(stage1, "--source").items()]
    return streaming.read_sources(base_dir, "--base-llm") + projector


def convert_original_to_hf(
    source: str | Path,
    output: str | Path,
    *,
    vision_tower: str | Path | None = None,
    base_llm: str | Path | None = None,
    seed: int = 0,
    max_shard_size: int | str = streaming.DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    check_parity: bool = True,
    log: Callable[[str], None] = print,
) -> streaming.Report:
    """Converts the original-format checkpoint `source` (a folder or a Hub id; safetensors or `.bin`) into `output`
    and returns the `Report`. `vision_tower` (default: config.json's `mm_vision_tower`): a transformers CLIP
    checkpoint, the tower's config and preprocessing, and its weights when `source` has none; `base_llm`: the LLM of a
    stage-1 `source`; `seed`: the new `<image>` row's. The output options are `convert_llava_to_ms_llava`'s; the
    parity check compares the written model with plain transformers modules built from the original tensors. An
    unknown, missing or mis-shaped key, a setting without equivalent or a parity difference raise `ValueError`."""
    output = streaming.check_output(output, overwrite)
    source_dir = streaming.resolve_part(source, "--source")
    base_dir = streaming.resolve_part(base_llm, "--base-llm") if base_llm is not None else None
    settings, text_config, unused = read_original_config(source_dir / "config.json")
    sources = original_sources(source_dir, base_dir)
    has_tower, ms = any(s.key.startswith(TOWER) for s in sources), settings["projector"] == "ms_resampler"
    if (name := vision_tower or settings["mm_vision_tower"]) is None:
        raise ConversionError(
            f"{source_dir}: config.json has no mm_vision_tower: pass --vision-tower, a CLIP checkpoint"
        )
    label = "--vision-tower" if vision_tower else f"mm_vision_tower (of {source_dir}; or pass --vision-tower)"
    json_only = {"allow_patterns": ["*.json"], "check": False}  # the tower's weights are in the checkpoint
    tower_dir = resolve_checkpoint(name, label, **json_only) if has_tower else streaming.resolve_part(name, label)
    streaming.prepare_output(output, [folder for folder in (source_dir, base_dir, tower_dir) if folder])
    tower_config = load_config(tower_dir, label)
    vision = getattr(tower_config, "vision_config", None) or tower_config  # a dual encoder's (CLIPModel) vision half
    dual = vision is not tower_config
    tower = streaming.build_on_meta(AutoModel.from_config, vision)
    rename_tower, tower_keys = streaming.loader_renames(tower), set(tower.state_dict())

    tokenizer_dir = next((d for d in (source_dir, base_dir) if d and (d / "tokenizer_config.json").is_file()), None)
    if tokenizer_dir is None:
        raise ConversionError(f"{source_dir}: no tokenizer (tokenizer_config.json) here or in --base-llm")
    with streaming.quiet_transformers():  # its config.json's model_type (llava_llama) is unknown to transformers
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    added, notes = streaming.tokenizer_surgery(tokenizer)
    notes += [f"config.json fields not used: {', '.join(unused)}"] if unused else []
    image_token_id, rows = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), text_config.vocab_size
    fields = {"vision_feature_layer": settings["layer"], "vision_feature_select_strategy": settings["strategy"]}
    fields["tie_word_embeddings"] = text_config.tie_word_embeddings
    fields["image_token_id" if ms else "image_token_index"] = image_token_id
    if ms:
        config = streaming.ms_llava_config(vision, text_config, settings["resampler"], **fields)
    else:
        tokens = (vision.image_size // vision.patch_size) ** 2 + (settings["strategy"] == "full")
        parts = {"vision_config": vision.to_dict(), "text_config": text_config.to_dict(), "image_seq_length": tokens}
        config = LlavaConfig(**parts, **fields)
    new_vocab = max(rows, len(tokenizer))
    config.text_config.vocab_size, config.text_config.pad_token_id = new_vocab, tokenizer.pad_token_id

    log(f"reading {source_dir}")
    model_class = MSLlavaForConditionalGeneration if ms else LlavaForConditionalGeneration
    key_map = streaming.KeyMap(streaming.build_on_meta(model_class, config))
    projector = PROJECTORS[settings["projector"]]

    def rename(key: str) -> str:  # an unknown projector key (mlp3x's model.mm_projector.4.*) stays as it is: unknown
        if key.startswith(TOWER):
            return "model.vision_tower." + rename_tower(key[len(TOWER) :])
        if key.startswith(PROJECTOR):
            rest = key[len(PROJECTOR) :]
            hf = (f"{new}{rest[len(old) :]}" for old, new in projector.items() if rest.startswith(old))
            return next((f"model.multi_modal_projector.{name}" for name in hf), key)
        return re.sub(r"^model\.", "model.language_model.", key)

    key_map.map(sources, rename)
    if not has_tower:
        text_half = f"not part of the vision model ({vision.model_type}'s text half and projections)"
        drop = (lambda key: None if rename_tower(key) in tower_keys else text_half) if dual else None
        tower_sources = streaming.read_sources(tower_dir, label)
        key_map.map(tower_sources, lambda key: "model.vision_tower." + rename_tower(key), drop)
    if new_vocab > rows and EMBED in key_map.entries:
        streaming.grow_embeddings(key_map, text_config, new_vocab, seed, added)
    key_map.check(f"{source_dir} -> {model_class.__name__}")

    image_settings, image_notes = streaming.image_processor_settings(tower_dir, vision)
    image_settings["do_pad"] = settings["do_pad"]
    template = tokenizer.chat_template or LLAVA_1_5_CHAT_TEMPLATE
    notes += image_notes + ([] if tokenizer.chat_template else ["the tokenizer has no chat template: LLaVA-1.5's"])
    if ms:
        image_processor, m = MSLlavaImageProcessor(**image_settings), config.resampler_config.num_queries
        processor = MSLlavaProcessor(image_processor, tokenizer, template, m, IMAGE_TOKEN)
    else:
        image_processor, strategy = LlavaImageProcessorPil(**image_settings), settings["strategy"]
        processor = LlavaProcessor(image_processor, tokenizer, vision.patch_size, strategy, template, IMAGE_TOKEN, 1)
    generation_dir = next((d for d in (source_dir, base_dir) if d and (d / "generation_config.json").is_file()), None)
    generation = GenerationConfig.from_pretrained(generation_dir) if generation_dir else None
    notes.append(f"image token {IMAGE_TOKEN!r} id {image_token_id}; vocabulary {rows} -> {new_vocab}")

    @torch.no_grad()
    def references(input_ids: torch.Tensor, pixel_values: torch.Tensor):  # modules of the original tensors
        def original(prefix: str) -> dict[str, torch.Tensor]:
            return {s.key[len(prefix) :]: s.load().float() for s in sources if s.key.startswith(prefix)}

        language_model = (
            LlamaForCausalLM(text_config).float().eval()
        )  # a missing tensor stays random, and parity fails
        lm = {s.key: s.load().float() for s in sources if not s.key.startswith((TOWER, PROJECTOR))}
        language_model.load_state_dict(lm, strict=False)
        logits = language_model(input_ids=input_ids).logits
        del language_model, lm
        if has_tower:
            reference = AutoModel.from_config(vision).float().eval()
            reference.load_state_dict({rename_tower(k): v for k, v in original(TOWER).items()})
        else:
            reference = streaming.load_quietly(AutoModel, tower_dir)
            reference = reference.vision_model if dual else reference
        states = streaming.tower_states(reference, pixel_values)
        selected, weights = states[settings["layer"]][:, int(settings["strategy"] == "default") :], original(PROJECTOR)
        if ms:  # MSResampler on the original tensors, as the original code base would apply it
            resampler, grid = MSResampler(config).float().eval(), vision.image_size // vision.patch_size
            resampler.load_state_dict(weights)
            features = resampler(selected, (grid, grid), int(settings["strategy"] == "full"))
        else:  # mlp2x_gelu: nn.Sequential(Linear, GELU, Linear)
            hidden = functional.gelu(functional.linear(selected, weights["0.weight"], weights["0.bias"]))
            features = functional.linear(hidden, weights["2.weight"], weights["2.bias"])
        return logits, states, features[0]

    options = dict(overwrite=overwrite, max_shard_size=max_shard_size, check_parity=check_parity, log=log, vocab=rows)
    options["copied"] = [tokenizer_dir / "tokenizer.model"] if (tokenizer_dir / "tokenizer.model").is_file() else []
    generation = generation or GenerationConfig.from_model_config(config.text_config)
    report = streaming.Report(output, notes=notes)
    return streaming.write_checkpoint(key_map, processor, generation, references, report, options)
