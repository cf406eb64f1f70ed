"""What `convert` and `compose` share: the parts' folders, tokenizer and image settings, a strict key map from source
checkpoints onto the target model built on the meta device, and a streamed write into a staged folder renamed into place only when everything passed. No model is built
for the copy: tensors are read one at a time (`safe_open`; `.bin` one memory-mapped shard at a time) and written one
output shard at a time, so memory is about one shard (`--max-shard-size`) beyond the imports (docs/conversion.md)."""

from __future__ import annotations

import copy
import functools
import json
import os
import resource
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import AddedToken
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from ..checkpoints import (
    DOWNLOAD_PATTERNS,
    CheckpointError,
    checkpoint_files_in,
    is_checkpoint_file,
    load_bin,
    read_json,
    resolve_checkpoint,
    tensor_headers,
    weight_files,
)
from ..outputs import check_writable, writing

DEFAULT_MAX_SHARD_SIZE = "500MB"  # save_file holds a whole shard in memory: this bounds the peak
PARITY_MAX_PARAMETERS = 1_500_000_000  # parity loads source and output in float32, one after the other: 6 GB each
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"  # added only when the LLM has neither a pad nor an unk token
RECOMPUTED_BUFFERS = (".rotary_emb.inv_freq", "embeddings.position_ids")  # saved by old checkpoints, recomputed now
EMBED, HEAD = "model.language_model.embed_tokens.weight", "lm_head.weight"


class ConversionError(ValueError):
    """A checkpoint cannot be converted as asked; the message names the offending keys, files or settings."""


@dataclass(frozen=True)
class Source:
    """A tensor of a weight file, known by its header; `load()` reads it."""

    file: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    def load(self) -> torch.Tensor:
        # a handle per tensor: what one handle reads stays resident while it lives
        if self.file.suffix == ".safetensors":
            with safe_open(str(self.file), framework="pt") as handle:
                return handle.get_tensor(self.key)
        return _bin_shard(self.file)[self.key]


@functools.lru_cache(maxsize=1)  # one memory-mapped .bin shard at a time
def _bin_shard(path: Path) -> dict:
    return load_bin(path)


def read_sources(folder: Path, label: str) -> list[Source]:
    """The tensors of a checkpoint folder (its index and every shard checked), by their headers."""
    if not (files := weight_files(folder, label)):
        raise CheckpointError(f"{label} {folder}: no weights (model.safetensors, pytorch_model.bin or an index)")
    return [Source(file, key, *header) for file in files for key, header in tensor_headers(file, label).items()]


def loader_renames(model) -> Callable[[str], str]:
    """The key renames transformers' `from_pretrained` applies for `model` (its conversion mapping: LLaVA's old layout,
    CLIP's `vision_model.` level, ...). Renames only: a mapping that merges or splits tensors cannot stream."""
    from transformers.conversion_mapping import WeightRenaming, get_model_conversion_mapping

    transforms = get_model_conversion_mapping(model)
    if others := sorted({type(t).__name__ for t in transforms if not isinstance(t, WeightRenaming)}):
        raise ConversionError(f"{type(model).__name__}'s checkpoints need weight conversions {others}, not renames")

    def rename(key: str) -> str:
        for transform in transforms:
            key = transform.rename_source_key(key)[0]
        return key

    return rename


def build_on_meta(build: Callable, config):
    """`build(config)` on the meta device: every parameter's name and shape, and no memory."""
    with torch.device("meta"):
        return build(config)


class KeyMap:
    """`target key -> tensor` for the model `meta_model`, strict: `check` raises unless every source key is used or
    dropped for a stated reason, every target key is filled once (tied ones may be absent) and every shape fits."""

    def __init__(self, meta_model):
        self.model = meta_model
        self.expected = {key: tuple(tensor.shape) for key, tensor in meta_model.state_dict().items()}
        self.optional = set(getattr(meta_model, "all_tied_weights_keys", None) or ())
        self.entries: dict[str, Source | torch.Tensor] = {}
        self.dropped: dict[str, list[str]] = {}
        self.created: dict[str, list[str]] = {}
        self.unknown, self.twice = [], []

    def map(self, sources: list[Source], rename: Callable[[str], str], drop: Callable[[str], str | None] = None):
        """Adds every source tensor as `rename(key)`; `drop(key)` may give a reason to leave it out instead."""
        for source in sources:
            target, reason = rename(source.key), drop(source.key) if drop else None
            if target not in self.expected and target.endswith(RECOMPUTED_BUFFERS):
                reason = "buffer recomputed by transformers"
            if reason:
                self.dropped.setdefault(reason, []).append(source.key)
            elif target not in self.expected:
                self.unknown.append(f"{source.key} ({source.file.name})")
            elif target in self.entries:
                self.twice.append(f"{target} ({source.key} in {source.file.name})")
            else:
                self.entries[target] = source

    def create(self, tensors: dict[str, torch.Tensor], how: str) -> None:
        self.entries.update(tensors)
        self.created[how] = list(tensors)

    def check(self, what: str) -> None:
        missing = [key for key in self.expected if key not in self.entries and key not in self.optional]
        mismatched = [
            f"{key} ({f'{e.key} in {e.file.name}: ' if isinstance(e, Source) else ''}{list(e.shape)}, target "
            f"{list(self.expected[key])})"
            for key, e in self.entries.items()
            if tuple(e.shape) != self.expected[key]
        ]
        problems = {
            "source keys the key map does not know": self.unknown,
            "target keys no source key fills": missing,
            "shape mismatches": mismatched,
            "target keys filled twice": self.twice,
        }
        if problems := [f"{name}: {listed(keys)}" for name, keys in problems.items() if keys]:
            raise ConversionError(f"{what}: " + "; ".join(problems))


def listed(keys: list[str], limit: int = 50) -> str:
    return ", ".join(keys[:limit]) + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


def fresh_resampler(config, seed: int) -> dict[str, torch.Tensor]:
    """A freshly initialised MS-Resampler: `_init_weights`' initialisation under `seed` (the caller's random state
    untouched), float32 (what the model's `_keep_in_fp32_modules` keeps it in)."""
    from ..modeling_ms_llava import MSResampler

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        resampler = MSResampler(config)
        resampler.reset_parameters()
    return {f"model.multi_modal_projector.{key}": value.detach() for key, value in resampler.state_dict().items()}


def grow_embeddings(key_map: KeyMap, text_config, vocab_size: int, seed: int, added: list[str]) -> None:
    """Grows the mapped input embedding (and an untied `lm_head`) to `vocab_size` rows for the `added` tokens with
    transformers' `resize_token_embeddings(mean_resizing=True)` (new rows drawn around the mean of the old ones,
    seeded), on a language model whose other weights stay on the meta device; `text_config` is left as it is."""
    from transformers import AutoModelForCausalLM

    model = build_on_meta(AutoModelForCausalLM.from_config, copy.deepcopy(text_config))  # resizing sets vocab_size
    keys = [key for key in (EMBED, HEAD) if isinstance(key_map.entries.get(key), Source)]
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    inputs.weight = torch.nn.Parameter(key_map.entries[EMBED].load(), requires_grad=False)
    outputs.weight = torch.nn.Parameter(key_map.entries[HEAD].load(), False) if HEAD in keys else inputs.weight
    rows = vocab_size - inputs.weight.shape[0]
    with torch.random.fork_rng(devices=[]), quiet_transformers():
        torch.manual_seed(seed)
        model.resize_token_embeddings(vocab_size, mean_resizing=True)
    grown = {EMBED: model.get_input_embeddings().weight.detach(), HEAD: model.get_output_embeddings().weight.detach()}
    key_map.entries.update({key: grown[key] for key in keys})
    key_map.created[f"{rows} new row(s) ({', '.join(added)}) by mean resizing"] = keys


def resolve_part(value: str | Path, label: str) -> Path:
    """A part's folder, or its Hub snapshot: safetensors weights, else `.bin` ones (lmsys/vicuna-7b-v1.5 has only)."""
    folder = resolve_checkpoint(value, label, check=False)
    if not weight_files(folder) and not Path(value).expanduser().exists():
        folder = resolve_checkpoint(value, label, allow_patterns=[*DOWNLOAD_PATTERNS, "*.bin"], check=False)
    return folder


def image_processor_settings(tower_dir: Path, vision_config) -> tuple[dict, list[str]]:
    """The tower's image size (short side, centre crop, after LLaVA-1.5's pad to square), and the mean, std and
    resampling of its `preprocessor_config.json`; without one, CLIP's mean and std for CLIP, 0.5 for the others."""
    size, path = vision_config.image_size, tower_dir / "preprocessor_config.json"
    settings = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
    stored = read_json(path) if path.is_file() else {}
    settings.update({k: stored[k] for k in ("image_mean", "image_std", "resample", "rescale_factor") if k in stored})
    if "image_mean" in settings and "image_std" in settings:
        return settings, []
    clip = vision_config.model_type.startswith("clip")
    settings.update(image_mean=list(OPENAI_CLIP_MEAN if clip else IMAGENET_STANDARD_MEAN))
    settings.update(image_std=list(OPENAI_CLIP_STD if clip else IMAGENET_STANDARD_STD))
    return settings, [f"the tower has no preprocessor_config.json mean/std: using {'CLIP' if clip else '0.5'}'s"]


def tokenizer_surgery(tokenizer) -> tuple[list[str], list[str]]:
    """Adds the image token (special, never split) and, without a pad token, pads with the unk token (as LLaVA-1.5)
    or a new `<pad>`; left padding for batched generation. Returns `(added tokens, notes)`."""
    added, notes = [], []
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
        added.append(IMAGE_TOKEN)
    if tokenizer.pad_token is None and tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
        notes.append(f"the LLM has no pad token: padding with its unk token {tokenizer.unk_token!r}, as LLaVA-1.5")
    elif tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": AddedToken(PAD_TOKEN, special=True, normalized=False)})
        added.append(PAD_TOKEN)
    if len(tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)) != 1:
        raise ConversionError(f"the tokenizer splits {IMAGE_TOKEN!r} even after adding it")
    tokenizer.padding_side = "left"
    return added, notes


@contextmanager
def quiet_transformers():
    """transformers' notices and progress bars off (mean resizing, the loading reports of checked checkpoints)."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        logging.enable_progress_bar()


def load_quietly(auto_class, folder):  # in float32, for the parity checks
    with quiet_transformers():
        return auto_class.from_pretrained(folder, dtype=torch.float32).eval()


def max_abs_difference(expected: torch.Tensor, actual: torch.Tensor) -> float:
    if expected.shape != actual.shape:
        return float("inf")
    return (expected.double() - actual.double()).abs().max().item() if expected.numel() else 0.0


def write_weights(entries: dict, folder: Path, max_shard_size: int | str) -> int:
    """Writes `entries` as `model.safetensors`, or shards of at most `max_shard_size` with transformers' index, one
    shard's tensors in memory at a time, each shard read back and compared bit for bit. Returns the bytes written."""
    meta = {key: torch.empty(entry.shape, dtype=entry.dtype, device="meta") for key, entry in entries.items()}
    split = split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_size)
    for name, keys in split.filename_to_tensors.items():
        save_file(_load_shard(entries, keys), folder / name, metadata={"format": "pt"})  # freed before the read-back
        if differing := [key for key in keys if not _written_as(folder / name, key, entries[key])]:
            raise ConversionError(f"{folder / name}: read back unlike what was written: {listed(differing)}")
    if split.is_sharded:
        metadata = {"total_parameters": sum(t.numel() for t in meta.values()), **split.metadata}
        index = {"metadata": metadata, "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return sum(t.numel() * t.element_size() for t in meta.values())


def _load(entry) -> torch.Tensor:
    return entry.load() if hasattr(entry, "load") else entry  # a Source, or a tensor in memory


def _load_shard(entries: dict, keys: list[str]) -> dict[str, torch.Tensor]:
    shard, storages = {}, set()
    for key in keys:
        tensor = _load(entries[key])
        if tensor.numel() and tensor.untyped_storage().data_ptr() in storages:  # tied in a .bin: save_file refuses
            tensor = tensor.clone()  # tensors that share memory
        storages.add(tensor.untyped_storage().data_ptr())
        shard[key] = tensor.contiguous()
    return shard


def _written_as(file: Path, key: str, entry) -> bool:
    """Whether `file` holds `key` bit for bit as `entry` (re-read: two tensors in memory, not a shard and one)."""
    a, b = Source(file, key, None, ()).load(), _load(entry)
    same = a.dtype == b.dtype and a.shape == b.shape
    return same and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _protected(output: Path) -> str | None:
    """Why `output` is never written: a root, the working directory, the home, or one holding them (links resolved)."""
    resolved = output.resolve()
    if resolved == resolved.parent:
        return "it is a filesystem root"
    for what, where in (("the current working directory", Path.cwd), ("the home directory", Path.home)):
        try:
            place = where().resolve()
        except (OSError, KeyError, RuntimeError):  # a deleted working directory; no HOME and no passwd entry
            continue
        if resolved == place or resolved in place.parents:
            return f"it is {what}" if resolved == place else f"it contains {what} ({place})"
    return None


def check_output(output: str | Path, overwrite: bool = False) -> Path:
    """Checks, before anything is read or downloaded, that a checkpoint may be written into `output`; returns it
    absolute. Refused, naming the folder and why: a file; a root, the working directory or the home (or one holding
    them), always; a folder that already holds a checkpoint, unless `overwrite` (which replaces its checkpoint files
    only: `replace_folder`)."""
    output = Path(output).absolute()
    if output.exists() and not output.is_dir():
        raise ConversionError(f"{output} exists and is not a folder; give a new or existing folder")
    if output.exists() and (protected := _protected(output)):
        raise ConversionError(f"{output} cannot be written or replaced: {protected}; choose a folder of its own")
    owned, weights = checkpoint_files_in(output), (".safetensors", ".bin", ".index.json")
    if not overwrite and any(n in ("config.json", "adapter_config.json") or n.endswith(weights) for n in owned):
        raise ConversionError(  # a config.json, an adapter_config.json or weights: a checkpoint
            f"{output} already holds a checkpoint ({listed(owned, 6)}); choose another folder, "
            "or pass --overwrite to replace its checkpoint files (other files are kept)"
        )
    return output


def _link_or_copy(source, target) -> None:
    try:  # a hard link: a kept file is not copied, and removing the old folder leaves it intact
        os.link(source, target, follow_symlinks=False)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(source, target, follow_symlinks=False)


@contextmanager
def replace_folder(output: str | Path, log: Callable[[str], None] | None = None, keep_existing: bool = False):
    """Yields an empty folder next to `output` to write a checkpoint into, renamed into `output` on success and removed
    on any error. Of an existing `output` only the checkpoint's files (`checkpoints.CHECKPOINT_FILES`) are replaced;
    those not rewritten are removed and listed to `log`, the rest is carried over by hard link. `keep_existing` (no
    --overwrite) refuses, naming them, to replace files `output` has. Call `check_output` first."""
    output = Path(output).absolute()
    unique = f"{os.getpid()}-{time.time_ns()}"
    staging, previous = (output.with_name(f".{output.name}.{what}-{unique}") for what in ("partial", "previous"))
    try:
        with writing(output):
            staging.mkdir(parents=True)  # a plain mkdir: the permissions the umask gives
            yield staging
        if not output.exists():
            os.replace(staging, output)
            return
        written = {path.name for path in staging.iterdir()}
        entries = sorted(output.iterdir())
        replaced = [entry.name for entry in entries if entry.name in written]
        if keep_existing and replaced:
            raise ValueError(
                f"{output} already has {listed(replaced, 10)}, which this would overwrite; choose another folder, or "
                "pass --overwrite to replace them (other files are kept)"
            )
        rest = [entry for entry in entries if entry.name not in written]
        removed = [e.name for e in rest if e.is_file() and not e.is_symlink() and is_checkpoint_file(e.name)]
        kept = [entry for entry in rest if entry.name not in removed]
        if log is not None and (replaced or removed):
            log(
                f"replacing the checkpoint in {output}: rewritten: {listed(replaced, 10)}"
                + (f", removed (not part of the new checkpoint): {', '.join(removed)}" if removed else "")
                + (f"; kept: {listed([entry.name for entry in kept], 10)}" if kept else "")
            )
        for entry in kept:
            if entry.is_dir() and not entry.is_symlink():
                shutil.copytree(entry, staging / entry.name, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(entry, staging / entry.name)
        os.replace(output, previous)  # os.replace cannot replace a non-empty folder: move it aside first
        os.replace(staging, output)
        shutil.rmtree(previous)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@dataclass
class Report:
    """What a conversion did: printed at the end, returned to library callers."""

    output: Path
    tensors_written: int = 0
    bytes_written: int = 0
    dropped: dict[str, list[str]] = field(default_factory=dict)
    created: dict[str, list[str]] = field(default_factory=dict)
    parity: dict[str, float] = field(default_factory=dict)
    parity_skipped: str | None = None
    notes: list[str] = field(default_factory=list)
    peak_rss: int = 0
    seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter, repr=False)

    def lines(self) -> list[str]:
        written = f"{self.tensors_written} ({self.bytes_written / 2**20:,.1f} MiB), each read back bit-identical"
        lines = [f"wrote {self.output}", f"  tensors: {written} to its source"]
        lines += [f"  dropped: {why}: {len(keys)} keys: {listed(keys, 8)}" for why, keys in self.dropped.items()]
        lines += [f"  created: {how}: {len(keys)} keys: {listed(keys, 8)}" for how, keys in self.created.items()]
        lines += [f"  parity: {what}: max |difference| = {value:.3g}" for what, value in self.parity.items()]
        lines += [f"  parity: skipped ({self.parity_skipped})"] if self.parity_skipped else []
        lines += [f"  note: {note}" for note in self.notes]
        return lines + [f"  peak resident memory (RSS): {self.peak_rss / 2**20:.2f} MiB; time: {self.seconds:.1f} s"]


def prepare_output(output: Path, sources: list[Path]) -> Path:
    """The checks once the sources are found, before any of their weights is read: `output` may not be or hold one,
    and its disk must have room for as many bytes as their weights take (`outputs.check_writable`)."""
    for source in sources:
        if source.absolute() == output or output in source.absolute().parents:
            raise ConversionError(f"{output} would overwrite the source {source.absolute()}")
    check_writable(output, need_bytes=sum(file.stat().st_size for folder in sources for file in weight_files(folder)))
    return output


def write_checkpoint(key_map: KeyMap, processor, generation, sources, report: Report, options: dict) -> Report:
    """Writes into a staged folder the mapped tensors, config.json (with `auto_map` and the modules for remote code),
    the `generation` config, the processor and then the files `options["copied"]` (byte for byte); checks `parity`
    there against `sources` (on ids below `options["vocab"]`, default the config's) unless `check_parity` is off or
    the model is too large; and renames the folder into `report.output`."""
    from transformers.dynamic_module_utils import custom_object_save

    model, log = key_map.model, options["log"]
    parameters = sum(torch.Size(entry.shape).numel() for entry in key_map.entries.values())
    if not options["check_parity"] or parameters > PARITY_MAX_PARAMETERS:
        limit = f"{parameters:,} parameters > {PARITY_MAX_PARAMETERS:,}: too large to build both models"
        report.parity_skipped = limit if options["check_parity"] else "--no-parity"
    log(f"writing {len(key_map.entries)} tensors ({parameters:,} parameters) to {report.output}")
    with replace_folder(report.output, log=log, keep_existing=not options["overwrite"]) as staging:
        report.bytes_written = write_weights(key_map.entries, staging, options["max_shard_size"])
        model.config.architectures = [type(model).__name__]
        model.config.dtype = str(key_map.entries[EMBED].dtype).removeprefix("torch.")
        if type(model)._auto_class:  # MS-LLaVA's remote code; a transformers model needs none
            custom_object_save(model, staging, config=model.config)
        model.config.save_pretrained(staging)
        generation.save_pretrained(staging)
        processor.save_pretrained(staging)
        for file in options.get("copied", ()):
            shutil.copyfile(file, staging / file.name)
        if report.parity_skipped is None:
            log("checking parity")
            vocab = options.get("vocab", model.config.text_config.vocab_size)
            report.parity = parity(staging, model.config, vocab, sources, type(model))
            if failed := {what: value for what, value in report.parity.items() if value != 0}:
                raise ConversionError(f"parity check failed, the carried-over parts differ: {failed}")
    report.tensors_written, report.dropped, report.created = len(key_map.entries), key_map.dropped, key_map.created
    report.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report.seconds = time.perf_counter() - report.started
    return report


def ms_llava_config(vision_config, text_config, resampler: dict, **fields):
    """`MSLlavaConfig` of these parts and MS-Resampler settings; invalid settings (a query grid finer than the tower's
    patch grid too) are a `ConversionError` naming them."""
    from huggingface_hub.errors import StrictDataclassError

    from ..configuration_ms_llava import MSLlavaConfig
    from ..modeling_ms_llava import query_anchors

    try:
        parts = {"vision_config": vision_config.to_dict(), "text_config": text_config.to_dict()}
        config = MSLlavaConfig(**parts, resampler_config=resampler, **fields)
        query_anchors(*config.resampler_config.query_grid_shape, *config.vision_grid_size)
    except (ValueError, StrictDataclassError) as error:
        raise ConversionError(f"invalid MS-Resampler settings: {' '.join(str(error).split())}") from error
    return config


def resampler_settings(num_queries, scope_windows, scope_bias_strength, fusion, resampler_kwargs) -> dict:
    """MSResamplerConfig fields from the conversions' arguments (None: the config's default)."""
    given = {"scope_windows": scope_windows, "scope_bias_strength": scope_bias_strength, "fusion": fusion}
    return {"num_queries": num_queries} | {k: v for k, v in given.items() if v is not None} | (resampler_kwargs or {})


@torch.no_grad()
def parity(folder: Path, config, vocab: int, sources: Callable, model_class) -> dict[str, float]:
    """The written `model_class` against its sources (`sources(input_ids, pixel_values)`: their logits and tower hidden
    states, one model at a time, and optionally their image features) on a seeded random text-only prompt (ids below
    `vocab`, no image token) and a random image of the tower's size; without reference image features, its fresh
    MS-Resampler must give M finite tokens of the LLM's width."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (1, 12), generator=generator)
    input_ids[input_ids == config.image_token_id] = int(config.image_token_id == 0)
    size = config.vision_config.image_size
    pixel_values = torch.randn(1, 3, size, size, generator=generator)
    logits, states, *reference = sources(input_ids, pixel_values)
    model = load_quietly(model_class, folder)
    features = model.model.get_image_features(pixel_values=pixel_values).pooler_output[0]
    expected = (config.resampler_config.num_queries, config.text_config.hidden_size) if not reference else None
    if expected and (tuple(features.shape) != expected or not torch.isfinite(features).all()):
        raise ConversionError(f"the new MS-Resampler gave {tuple(features.shape)} tokens (expected {expected}) or NaN")
    written = model(input_ids=input_ids).logits[..., :vocab], tower_states(model.model.vision_tower, pixel_values)
    results = {
        "language model logits (text-only prompt)": max_abs_difference(logits, written[0]),
        "vision tower hidden states (random image)": max_abs_difference(states, written[1]),
    }
    if reference:
        results["image features (tower, selection, projector)"] = max_abs_difference(reference[0], features)
    return results


def tower_states(tower, pixel_values: torch.Tensor) -> torch.Tensor:
    return torch.stack(tower(pixel_values, output_hidden_states=True).hidden_states)
