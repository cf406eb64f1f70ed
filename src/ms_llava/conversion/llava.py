"""Convert a transformers LLaVA checkpoint (`LlavaForConditionalGeneration`) into an MS-LLaVA checkpoint.

The vision tower, the language model (with `lm_head`), the tokenizer and the chat template are carried over bit for
bit; LLaVA's MLP projector (`multi_modal_projector.*`) is dropped and replaced by a freshly initialised MS-Resampler
(the initialisation of `MSLlavaForConditionalGeneration._init_weights`, seeded); the processor expands each image to M
tokens. This is how stage-1 (projector) training of MS-LLaVA starts from a LLaVA checkpoint.

The conversion streams: it reads the source's safetensors headers, checks every key against the MS-LLaVA model built
on the meta device, then writes the output one shard at a time (`--max-shard-size`). It never builds the source model,
so a 7B checkpoint converts in about one output shard of RAM beyond the imports (see docs/conversion.md for the
measured peak).

    python conversion_scripts/convert_llava_to_ms_llava.py --source llava-hf/llava-1.5-7b-hf --output ms-llava-7b \\
        --num-queries 144 --scope-windows 2 6 24 --scope-bias-strength 5 --fusion channel_mlp
"""

from __future__ import annotations

import argparse
import gc
import typing
from collections.abc import Callable, Container
from pathlib import Path

import torch

from ..configuration_ms_llava import MSLlavaConfig, MSResamplerConfig
from ..image_processing_ms_llava import MSLlavaImageProcessor
from ..modeling_ms_llava import MSLlavaForConditionalGeneration, MSResampler, query_anchors
from ..processing_ms_llava import MSLlavaProcessor
from .checkpoint_io import (
    HUB_ALLOW_PATTERNS,
    IMAGE_TOKEN,
    PARITY_MAX_PARAMETERS,
    ConversionError,
    ConversionOutput,
    ConversionReport,
    KeyPlan,
    TensorSource,
    build_on_meta,
    copy_files,
    expected_state_dict_shapes,
    max_abs_difference,
    quiet_transformers,
    read_checkpoint,
    read_json,
    resolve_source,
    run_conversion,
    tensor_source_from_tensor,
)

# PARITY_MAX_PARAMETERS (the parity check's size limit) and HUB_ALLOW_PATTERNS (what a Hub source downloads) are
# shared with convert_original and live in checkpoint_io.
# safetensors' save_file holds a whole shard in memory: 500 MB keeps a 7B conversion's peak RSS under 1 GiB
# (measured with benchmarks/conversion_memory.py, see docs/conversion.md).
DEFAULT_MAX_SHARD_SIZE = "500MB"
# What a failed parity check of a conversion that carries the tower and the LLM over says (llava-to-ms-llava, compose).
PARITY_FAILURE = "parity check failed, the carried-over parts differ"
# Tokenizer files copied byte for byte from the source (they hold the vocabulary; tokenizer_config.json is rewritten by
# the processor, which records its own class there).
TOKENIZER_DATA_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
# --overwrite's help, shared by the three conversions (the rule is checkpoint_io.check_output's).
OVERWRITE_HELP = (
    "replace a non-empty --output, only if it is a checkpoint a conversion could have written (a config.json with "
    "model_type llava, ms_llava or llava_llama, no subdirectory); never the current directory, the home directory "
    "or a filesystem root"
)

# Key layouts. transformers' in-memory names (and what MS-LLaVA saves) are the "new" layout; checkpoints written by
# transformers < 4.52 (e.g. llava-hf/llava-1.5-7b-hf) and by transformers 5's save_pretrained use the "old" one.
OLD_TO_NEW_PREFIXES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)
NESTED_CLIP_PREFIX = "model.vision_tower.vision_model."  # CLIPVisionModel before transformers 5 nested its weights
PROJECTOR_PREFIX = "model.multi_modal_projector."
EMBED_KEY = "model.language_model.embed_tokens.weight"
# Buffers some older checkpoints saved; transformers recomputes them, so they are dropped.
RECOMPUTED_BUFFER_SUFFIXES = (".rotary_emb.inv_freq", "embeddings.position_ids")

FUSIONS = typing.get_args(MSResamplerConfig.__annotations__["fusion"])  # the config's Literal


def canonical_llava_key(key: str, expected: Container[str]) -> str:
    """The state-dict name (new layout) of a LLaVA checkpoint key in the old or the new layout.

    `language_model.model.X` -> `model.language_model.X`, `language_model.lm_head.X` -> `lm_head.X`,
    `vision_tower.X` -> `model.vision_tower.X`, `multi_modal_projector.X` -> `model.multi_modal_projector.X`; then
    `model.vision_tower.vision_model.X` -> `model.vision_tower.X` when the target tower has no `vision_model` level.
    """
    for old, new in OLD_TO_NEW_PREFIXES:
        if key.startswith(old):
            key = new + key[len(old) :]
            break
    if key.startswith(NESTED_CLIP_PREFIX) and key not in expected:
        key = "model.vision_tower." + key[len(NESTED_CLIP_PREFIX) :]
    return key


def is_recomputed_buffer(key: str) -> bool:
    return key.endswith(RECOMPUTED_BUFFER_SUFFIXES)


def plan_tensor(plan: KeyPlan, key: str, source: TensorSource, expected: Container[str], unknown: str = "") -> None:
    """Plans `source` as `key` when the target model has that key, drops it when `key` is a buffer transformers
    recomputes, and records it as an unknown key otherwise (named `unknown`, by default its own name)."""
    if key in expected:
        plan.add(key, source)
    elif is_recomputed_buffer(key):
        plan.drop(source.name, "buffer recomputed by transformers")
    else:
        plan.unknown(unknown or source.name)


def plan_llava_tensors(
    sources: list[TensorSource], expected: Container[str], plan: KeyPlan, keep_projector: bool
) -> None:
    """Adds every tensor of a transformers LLaVA checkpoint to `plan` under its new-layout name. The MLP projector is
    kept (`keep_projector`) or dropped; known recomputed buffers are dropped; anything else the model lacks is
    unknown."""
    for source in sources:
        key = canonical_llava_key(source.name, expected)
        if key.startswith(PROJECTOR_PREFIX) and not keep_projector:
            plan.drop(source.name, "MLP projector replaced by MS-Resampler")
        else:
            plan_tensor(plan, key, source, expected)


def build_ms_llava_config(
    llava_config,
    num_queries: int,
    scope_windows: list[int] | None,
    scope_bias_strength: float | None,
    fusion: str | None,
    resampler_kwargs: dict | None,
) -> MSLlavaConfig:
    """MSLlavaConfig with the LlavaConfig's vision and text configs, image token, feature layer and select strategy,
    and an MS-Resampler with the given hyper-parameters (MSResamplerConfig's defaults for the rest)."""
    resampler = {"num_queries": num_queries, **(resampler_kwargs or {})}
    for name, value in (("scope_windows", scope_windows), ("scope_bias_strength", scope_bias_strength)):
        if value is not None:
            resampler[name] = value
    if fusion is not None:
        resampler["fusion"] = fusion
    try:
        config = MSLlavaConfig(
            vision_config=llava_config.vision_config.to_dict(),
            text_config=llava_config.text_config.to_dict(),
            resampler_config=resampler,
            image_token_id=llava_config.image_token_id,
            vision_feature_layer=llava_config.vision_feature_layer,
            vision_feature_select_strategy=llava_config.vision_feature_select_strategy,
            tie_word_embeddings=llava_config.tie_word_embeddings,
        )
        rows, cols = config.resampler_config.query_grid_shape
        query_anchors(rows, cols, *config.vision_grid_size)  # raises if the query grid is finer than the token grid
    except ValueError as error:
        raise ConversionError(f"invalid MS-Resampler settings: {error}") from error
    return config


def initial_resampler_tensors(config: MSLlavaConfig, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A freshly initialised MS-Resampler's tensors (new-layout names), cast to `dtype`.

    `MSResampler.__init__` runs `reset_parameters`, the very initialisation `MSLlavaForConditionalGeneration`'s
    `_init_weights` applies; the global random state is forked, so callers' random streams are unchanged."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        resampler = MSResampler(config)
        resampler.reset_parameters()  # the constructor leaves it to the enclosing model's post_init
    return {PROJECTOR_PREFIX + name: tensor.detach().to(dtype) for name, tensor in resampler.state_dict().items()}


def plan_initial_resampler(
    plan: KeyPlan, config: MSLlavaConfig, seed: int
) -> tuple[torch.dtype, dict[str, list[str]]]:
    """Adds a freshly initialised MS-Resampler (`initial_resampler_tensors`) to `plan`, in the dtype of the planned
    language-model embedding (float32 when there is none). Returns that dtype and the report's `created` entry."""
    dtype = plan.entries[EMBED_KEY].dtype if EMBED_KEY in plan.entries else torch.float32
    resampler_tensors = initial_resampler_tensors(config, seed, dtype)
    for name, tensor in resampler_tensors.items():
        plan.add(name, tensor_source_from_tensor(name, tensor, f"MS-Resampler initialisation (seed {seed})"))
    return dtype, {f"MS-Resampler, freshly initialised (seed {seed}, {dtype})": list(resampler_tensors)}


def build_ms_llava_processor(source_dir: Path, config: MSLlavaConfig) -> tuple[MSLlavaProcessor, list[str]]:
    """MSLlavaProcessor from a LLaVA checkpoint's processor: its tokenizer and chat template as they are, an
    MSLlavaImageProcessor with its size, crop size, mean, std and resampling, and M = the resampler's num_queries."""
    from transformers import AutoProcessor

    notes = []
    try:
        with quiet_transformers():
            source_processor = AutoProcessor.from_pretrained(source_dir)
    except Exception as error:
        raise ConversionError(
            f"{source_dir}: cannot load the LLaVA processor (tokenizer + image processor): {error}"
        ) from error
    tokenizer = getattr(source_processor, "tokenizer", None)
    image_processor = getattr(source_processor, "image_processor", None)
    if tokenizer is None or image_processor is None:
        raise ConversionError(f"{source_dir}: expected a processor with a tokenizer and an image processor")
    image_token = getattr(source_processor, "image_token", None) or IMAGE_TOKEN
    token_ids = tokenizer.encode(image_token, add_special_tokens=False)
    if token_ids != [config.image_token_id]:
        raise ConversionError(
            f"{source_dir}: the tokenizer encodes the image token {image_token!r} as {token_ids}, but the config's "
            f"image_token_id is {config.image_token_id}"
        )
    settings = {}
    for name in ("size", "crop_size", "image_mean", "image_std", "resample", "do_center_crop"):
        value = getattr(image_processor, name, None)
        if value is not None:
            settings[name] = dict(value) if isinstance(value, dict) else value
    chat_template = getattr(source_processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    if chat_template is None:
        notes.append("the source has no chat template; the processor uses LLaVA-1.5's (LLAVA_1_5_CHAT_TEMPLATE)")
    processor = MSLlavaProcessor(
        image_processor=MSLlavaImageProcessor(**settings),
        tokenizer=tokenizer,
        chat_template=chat_template,
        num_image_tokens=config.resampler_config.num_queries,
        image_token=image_token,
    )
    return processor, notes


def save_config_files(meta_model, config, dtype: torch.dtype, directory: Path, generation_source: Path | None) -> None:
    """config.json (with `architectures`, `dtype` and, for remote code, `auto_map` + the module files) and
    generation_config.json (copied byte for byte from `generation_source` when it has one), as save_pretrained
    writes them."""
    from transformers import GenerationConfig
    from transformers.dynamic_module_utils import custom_object_save

    config.architectures = [type(meta_model).__name__]
    config.dtype = str(dtype).removeprefix("torch.")
    if meta_model.is_remote_code():
        custom_object_save(meta_model, directory, config=config)
    config.save_pretrained(directory)
    if not (generation_source and copy_files(generation_source, directory, ["generation_config.json"])):
        GenerationConfig.from_model_config(config).save_pretrained(directory)


def check_new_resampler(model: MSLlavaForConditionalGeneration, pixel_values: torch.Tensor, config) -> None:
    """Runs the freshly initialised MS-Resampler of the written `model` once on one image: a ConversionError unless it
    gives M finite tokens of the language model's width."""
    with torch.no_grad():
        image_tokens = model.model.get_image_features(pixel_values=pixel_values).pooler_output[0]
    expected_shape = (config.resampler_config.num_queries, config.text_config.hidden_size)
    if tuple(image_tokens.shape) != expected_shape or not torch.isfinite(image_tokens).all():
        raise ConversionError(
            f"the new MS-Resampler gave image tokens of shape {tuple(image_tokens.shape)} (expected {expected_shape}) "
            "or non-finite values"
        )


def check_llava_parity(source_dir: Path, converted_dir: Path, config: MSLlavaConfig) -> dict[str, float]:
    """Loads the source LLaVA, then the converted MS-LLaVA (float32, one after the other), and compares the language
    model's logits on a text-only prompt and every hidden state of the vision tower on a random image. Also runs the
    new MS-Resampler once to check it produces M finite tokens per image."""
    from transformers import LlavaForConditionalGeneration

    generator = torch.Generator().manual_seed(0)
    vocab_size = config.text_config.vocab_size
    input_ids = torch.randint(0, vocab_size, (1, 12), generator=generator)
    input_ids[input_ids == config.image_token_id] = 0 if config.image_token_id != 0 else 1
    image_size = config.vision_config.image_size
    pixel_values = torch.randn(1, 3, image_size, image_size, generator=generator)

    def run(model):
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits
            hidden_states = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        return logits, torch.stack(hidden_states)

    with quiet_transformers():
        source = LlavaForConditionalGeneration.from_pretrained(source_dir, dtype=torch.float32).eval()
        source_logits, source_hidden = run(source)
        del source
        gc.collect()  # free the first model before loading the second
        converted = MSLlavaForConditionalGeneration.from_pretrained(converted_dir, dtype=torch.float32).eval()
        converted_logits, converted_hidden = run(converted)
        check_new_resampler(converted, pixel_values, config)
    return {
        "language model logits (text-only prompt)": max_abs_difference(source_logits, converted_logits),
        "vision tower hidden states (random image)": max_abs_difference(source_hidden, converted_hidden),
    }


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
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    check_parity: bool = True,
    log: Callable[[str], None] = print,
) -> ConversionReport:
    """Converts the transformers LLaVA checkpoint `source` (a directory or a Hub repo id) into an MS-LLaVA checkpoint
    in `output`.

    Args:
        source: A `LlavaForConditionalGeneration` checkpoint directory (safetensors, sharded or not, old or new key
            layout, with its processor), or a Hub repo id to download.
        output: The directory to write. Refused when it exists and is not empty, unless `overwrite`; even then only a
            checkpoint a conversion could have written is replaced (see `checkpoint_io.check_output`).
        num_queries: M, the visual tokens per image.
        scope_windows, scope_bias_strength, fusion: k^(e), beta and the fusion; `None` keeps MSResamplerConfig's
            defaults.
        resampler_kwargs: Further MSResamplerConfig fields (e.g. `hidden_size`, `learnable_scope_bias`).
        seed: Seed of the MS-Resampler's initialisation.
        max_shard_size: Output shards hold at most this many bytes (`"5GB"`, `"500MB"` or an int).
        check_parity: Compare the outputs of the source and the converted model (skipped above
            `PARITY_MAX_PARAMETERS`); a difference raises.
        log: Where progress lines go.

    Raises:
        ConversionError: On any unknown, missing or mis-shaped key, corrupt file, or parity failure. Nothing is
            left in `output` then.
    """
    job = ConversionOutput.start(output, max_shard_size, overwrite, check_parity, log)
    source_dir = resolve_source(source, HUB_ALLOW_PATTERNS)
    source_config = read_json(source_dir / "config.json")
    if source_config.get("model_type") != "llava":
        raise ConversionError(
            f"{source_dir}: expected a transformers LLaVA checkpoint (model_type 'llava'), "
            f"got model_type {source_config.get('model_type')!r}"
        )
    from transformers import LlavaConfig

    llava_config = LlavaConfig.from_pretrained(source_dir)
    config = build_ms_llava_config(
        llava_config, num_queries, scope_windows, scope_bias_strength, fusion, resampler_kwargs
    )
    meta_model = build_on_meta(MSLlavaForConditionalGeneration, config)
    expected_shapes, tied_keys = expected_state_dict_shapes(meta_model)

    log(f"reading {source_dir}")
    sources = read_checkpoint(source_dir)
    plan = KeyPlan(f"{source_dir} -> MS-LLaVA")
    plan_llava_tensors(sources, expected_shapes, plan, keep_projector=False)
    dtype, created = plan_initial_resampler(plan, config, seed)
    plan.check(expected_shapes, optional=tied_keys)
    processor, notes = build_ms_llava_processor(source_dir, config)

    report = ConversionReport(output=job.output, notes=notes)
    report.dropped = plan.dropped
    report.created = created

    def write_files(staging: Path) -> None:
        save_config_files(meta_model, config, dtype, staging, generation_source=source_dir)
        processor.save_pretrained(staging)
        copy_files(source_dir, staging, TOKENIZER_DATA_FILES)

    def parity(staging: Path) -> dict[str, float]:
        return check_llava_parity(source_dir, staging, config)

    what = "source LLaVA vs converted MS-LLaVA"
    return job.write(plan, report, [source_dir], write_files, parity, what, PARITY_FAILURE)


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, help="a transformers LLaVA checkpoint directory, or a Hub repo id")
    parser.add_argument("--output", required=True, help="the MS-LLaVA checkpoint directory to write")
    parser.add_argument("--num-queries", type=int, default=144, metavar="M", help="visual tokens per image (144)")
    parser.add_argument(
        "--scope-windows", type=int, nargs="+", metavar="K", help="window size k of each branch (default 2 6 24)"
    )
    parser.add_argument("--scope-bias-strength", type=float, metavar="BETA", help="beta, the scope prior (default 5)")
    parser.add_argument("--fusion", choices=FUSIONS, help="how the branches are fused (default channel_mlp)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the MS-Resampler initialisation (0)")
    parser.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help=f"largest output shard, e.g. 2GB or 200MB ({DEFAULT_MAX_SHARD_SIZE}; each is held in memory to write it)",
    )
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    parser.add_argument("--no-parity", action="store_true", help="skip the output parity check")


def resampler_and_output_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of `convert_llava_to_ms_llava` given by the options `_add_arguments` defines besides
    `--source` and `--output` (`compose` takes the same options and arguments)."""
    return {
        "num_queries": args.num_queries,
        "scope_windows": args.scope_windows,
        "scope_bias_strength": args.scope_bias_strength,
        "fusion": args.fusion,
        "seed": args.seed,
        "max_shard_size": args.max_shard_size,
        "overwrite": args.overwrite,
        "check_parity": not args.no_parity,
    }


def _handle(args: argparse.Namespace) -> int:
    return run_conversion(
        lambda: convert_llava_to_ms_llava(args.source, args.output, **resampler_and_output_options(args))
    )


def add_command(
    subparsers, name: str, help_text: str, description: str, add_arguments, handle
) -> argparse.ArgumentParser:
    """Registers the command `name` on an argparse subparsers object, its options defined by `add_arguments(parser)`;
    `args.handler(args)` runs `handle(args)` (exit code)."""
    parser = subparsers.add_parser(name, help=help_text, description=description)
    add_arguments(parser)
    parser.set_defaults(handler=handle)
    return parser


def run_command(argv: list[str] | None, prog: str, description: str, add_arguments, handle) -> int:
    """Runs a conversion as its own program `prog` on `argv` (default `sys.argv[1:]`); returns the exit code."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser)
    return handle(parser.parse_args(argv))


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Registers `llava-to-ms-llava` on an argparse subparsers object; `args.handler(args)` runs it (exit code)."""
    help_text = "a transformers LLaVA checkpoint -> an MS-LLaVA checkpoint (new MS-Resampler, the rest bit-exact)"
    return add_command(subparsers, "llava-to-ms-llava", help_text, __doc__.split("\n\n")[0], _add_arguments, _handle)


def main(argv: list[str] | None = None) -> int:
    description = __doc__.split("\n\n")[0]
    return run_command(argv, "convert_llava_to_ms_llava.py", description, _add_arguments, _handle)


__all__ = [
    "PARITY_MAX_PARAMETERS",
    "add_cli",
    "canonical_llava_key",
    "convert_llava_to_ms_llava",
    "main",
]
