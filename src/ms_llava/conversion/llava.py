"""LLaVA -> MS-LLaVA: a transformers LLaVA checkpoint (`llava-hf/llava-1.5-7b-hf`'s layout, old or new key names)
becomes an MS-LLaVA checkpoint whose vision tower, language model (with `lm_head`), tokenizer and chat template are
carried over bit for bit, whose MLP projector is dropped and whose MS-Resampler is freshly initialised (seeded): the
start of stage-1 training. The key map is transformers' own loader renames for LLaVA; the copy streams
(`conversion.streaming`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoProcessor, GenerationConfig, LlavaConfig, LlavaForConditionalGeneration

from ..checkpoints import read_json, resolve_checkpoint
from ..image_processing_ms_llava import MSLlavaImageProcessor
from ..modeling_ms_llava import MSLlavaForConditionalGeneration
from ..processing_ms_llava import MSLlavaProcessor
from . import streaming

# Copied byte for byte (they hold the vocabulary); tokenizer_config.json is the processor's to write.
TOKENIZER_DATA_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


def convert_llava_to_ms_llava(
    source: str | Path,
    output: str | Path,
    num_queries: int = 144,
    scope_windows: list[int] | None = None,
    scope_bias_strength: float | None = None,
    fusion: str | None = None,
    *,
    resampler_kwargs: dict | None = None,
    seed: int = 0,
    max_shard_size: int | str = streaming.DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    check_parity: bool = True,
    log: Callable[[str], None] = print,
) -> streaming.Report:
    """Converts the transformers LLaVA checkpoint `source` (a folder or a Hub repo id) into an MS-LLaVA in `output`
    and returns the `Report`. `num_queries`, `scope_windows`, `scope_bias_strength`, `fusion`: M, k^(e), beta and the
    fusion (None: `MSResamplerConfig`'s default); `resampler_kwargs`: its other fields (`hidden_size`, ...); `seed`:
    the MS-Resampler's. Output shards hold at most `max_shard_size`; `overwrite` replaces the checkpoint files of a
    folder holding one (`check_output`); `check_parity` compares source and output (below
    `PARITY_MAX_PARAMETERS`). An unknown, missing or mis-shaped key (with its file), bad settings, unreadable weights
    or a parity difference raise `ValueError` (`ConversionError`, `CheckpointError`); nothing is left in `output`."""
    output = streaming.check_output(output, overwrite)
    source_dir = resolve_checkpoint(source, "--source", check=False)
    report = streaming.Report(output=streaming.prepare_output(output, [source_dir]))
    if (model_type := read_json(source_dir / "config.json", f"--source {source_dir}: ").get("model_type")) != "llava":
        raise streaming.ConversionError(
            f"{source_dir}: expected a transformers LLaVA checkpoint (model_type 'llava'), got {model_type!r}"
        )
    llava = LlavaConfig.from_pretrained(source_dir)
    resampler = streaming.resampler_settings(num_queries, scope_windows, scope_bias_strength, fusion, resampler_kwargs)
    names = ("image_token_id", "vision_feature_layer", "vision_feature_select_strategy", "tie_word_embeddings")
    fields = {name: getattr(llava, name) for name in names}
    config = streaming.ms_llava_config(llava.vision_config, llava.text_config, resampler, **fields)
    log(f"reading {source_dir}")
    key_map = streaming.KeyMap(streaming.build_on_meta(MSLlavaForConditionalGeneration, config))
    rename = streaming.loader_renames(streaming.build_on_meta(LlavaForConditionalGeneration, llava))
    dropped = "MLP projector replaced by MS-Resampler"
    key_map.map(
        streaming.read_sources(source_dir, "--source"), rename, lambda k: dropped if "projector" in k else None
    )
    key_map.create(streaming.fresh_resampler(config, seed), f"MS-Resampler, freshly initialised (seed {seed})")
    key_map.check(f"{source_dir} -> MS-LLaVA")
    processor = ms_llava_processor(source_dir, config, report.notes)

    def sources(input_ids: torch.Tensor, pixel_values: torch.Tensor):  # the source LLaVA's logits and tower states
        model = streaming.load_quietly(LlavaForConditionalGeneration, source_dir)
        return model(input_ids=input_ids).logits, streaming.tower_states(model.model.vision_tower, pixel_values)

    copied = [source_dir / name for name in ("generation_config.json", *TOKENIZER_DATA_FILES)]
    options = dict(overwrite=overwrite, max_shard_size=max_shard_size, check_parity=check_parity, log=log)
    options["copied"] = [path for path in copied if path.is_file()]
    generation = GenerationConfig.from_model_config(config.text_config)
    return streaming.write_checkpoint(key_map, processor, generation, sources, report, options)


def ms_llava_processor(source_dir: Path, config, notes: list[str]) -> MSLlavaProcessor:
    """MSLlavaProcessor from a LLaVA checkpoint's processor: its tokenizer, chat template and image token, an
    MSLlavaImageProcessor with its size, crop, mean, std and resampling, and M = the resampler's num_queries."""
    source = AutoProcessor.from_pretrained(source_dir)
    names = ("size", "crop_size", "image_mean", "image_std", "resample", "do_center_crop")
    settings = {name: getattr(source.image_processor, name, None) for name in names}
    settings = {k: dict(v) if isinstance(v, dict) else v for k, v in settings.items() if v is not None}
    if not source.chat_template:
        notes.append("the source has no chat template: the processor uses LLaVA-1.5's")
    image_processor, m = MSLlavaImageProcessor(**settings), config.resampler_config.num_queries
    processor = MSLlavaProcessor(image_processor, source.tokenizer, source.chat_template, m, source.image_token)
    if processor.image_token_id != config.image_token_id:
        raise streaming.ConversionError(
            f"{source_dir}: the tokenizer's image token {source.image_token!r} has id {processor.image_token_id}, but "
            f"config.json's image_token_id is {config.image_token_id}"
        )
    return processor
