"""Checkpoint input/output shared by the conversion scripts: strict, streaming, atomic.

* **Reading.** :func:`read_checkpoint` lists the tensors of a checkpoint directory (``model.safetensors``, a sharded
  safetensors index, ``pytorch_model.bin``, a sharded ``.bin`` index) or of one weight file, *without loading them*:
  each :class:`TensorSource` knows its name, dtype and shape and loads its data on demand. Safetensors files are read
  with ``safetensors.safe_open`` (which refuses a truncated or corrupt file before anything is written), one tensor at
  a time. ``.bin`` files are read with ``torch.load(weights_only=True, map_location="cpu")``, memory-mapped when they
  are zip archives, one shard at a time.
* **Key accounting.** :class:`KeyPlan` collects ``target name -> source tensor`` pairs and raises a
  :class:`ConversionError` listing every unknown source key, unfilled target key, shape mismatch and doubly filled key.
* **Writing.** :func:`write_safetensors` plans shards of at most ``max_shard_size`` bytes with
  ``huggingface_hub.split_torch_state_dict_into_shards`` (on meta tensors: no memory) and writes each with
  ``safetensors.torch.save_file``, plus transformers' ``model.safetensors.index.json`` when there is more than one.
  Only one shard's tensors are in memory at a time, so the shard size bounds the memory. :func:`staged_output` writes
  into a temporary sibling directory that is renamed into place only when everything succeeded, so a failed
  conversion leaves no half-written output. :func:`check_output` decides what may be replaced: with ``--overwrite``,
  only a directory that looks like a checkpoint a conversion wrote, and never a filesystem root, the current working
  directory or the home directory; :func:`replace_folder` then replaces only its checkpoint files, lists those it
  removes and carries the user's other files (notes, results) into the new directory.
* **Shared by the conversions.** What to download from the Hub (:data:`HUB_ALLOW_PATTERNS`), the image token, the
  parity size limit, the steps around the writing (:class:`ConversionOutput`: write, read back, parity) and the
  reporting (:class:`ConversionReport`, :func:`run_conversion`).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.modeling_utils import str_to_torch_dtype

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
BIN_WEIGHTS_NAME = "pytorch_model.bin"
BIN_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"

# Error messages list at most this many keys per kind of problem (and say how many more there are).
MAX_LISTED_KEYS = 50

# What to download when a source is a Hub repo id: configs, safetensors weights, tokenizer files (SentencePiece,
# BPE vocabularies, tiktoken) and chat templates. Sources that may hold `.bin` weights add "*.bin".
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]
# The image placeholder of LLaVA prompts: the original code base's DEFAULT_IMAGE_TOKEN and transformers LLaVA's
# image token.
IMAGE_TOKEN = "<image>"
# Above this many parameters the parity checks (which load the source and the converted model, one after the other,
# in float32) are skipped: 1.5e9 parameters are 6 GB in float32.
PARITY_MAX_PARAMETERS = 1_500_000_000


class ConversionError(ValueError):
    """A checkpoint cannot be converted as asked; the message names the offending keys, files or settings."""


# --------------------------------------------------------------------------------------------------------------------
# Tensors known by name, dtype and shape, loaded on demand
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSource:
    """A tensor known by its name, dtype and shape; `load()` reads (or computes) its data only when called."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor] = field(repr=False, compare=False)
    origin: str = ""  # the file it comes from, or how it is made, for messages

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count

    @property
    def nbytes(self) -> int:
        return self.numel * _element_size(self.dtype)


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def tensor_source_from_tensor(name: str, tensor: torch.Tensor, origin: str) -> TensorSource:
    """Wraps a tensor already in memory (a freshly initialised or a padded one)."""
    return TensorSource(name, tensor.dtype, tuple(tensor.shape), lambda: tensor, origin)


def _safetensors_loader(path: Path, name: str) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        # One handle per tensor: safe_open memory-maps the file, and every tensor read through one handle stays in the
        # resident set until the handle closes (a 5 GB source shard would cost 5 GB of RSS).
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(name)

    return load


def read_safetensors_file(path: Path) -> list[TensorSource]:
    """The tensors of one safetensors file, validated by `safe_open`, each loaded on demand."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            views = {name: handle.get_slice(name) for name in handle.keys()}
            headers = {name: (view.get_dtype(), tuple(view.get_shape())) for name, view in views.items()}
    except Exception as error:  # SafetensorError, OSError, ...
        raise ConversionError(f"{path}: not a valid safetensors file (truncated or corrupt?): {error}") from error
    sources = []
    for name, (code, shape) in headers.items():
        if code not in str_to_torch_dtype:
            raise ConversionError(f"{path}: tensor {name!r} has dtype {code}, which this converter cannot copy")
        sources.append(TensorSource(name, str_to_torch_dtype[code], shape, _safetensors_loader(path, name), str(path)))
    return sources


def load_bin_file(path: Path) -> dict[str, torch.Tensor]:
    """`torch.load(path, weights_only=True, map_location="cpu")`, memory-mapped for zip archives; a file holding
    anything but tensors (a pickled object, code) is refused."""
    path = Path(path)
    try:
        state_dict = torch.load(path, weights_only=True, map_location="cpu", mmap=zipfile.is_zipfile(path))
    except Exception as error:  # UnpicklingError for disallowed objects, RuntimeError for corrupt archives
        raise ConversionError(
            f"{path}: cannot be read with torch.load(weights_only=True): {str(error).splitlines()[0]}"
        ) from error
    if not isinstance(state_dict, dict):
        raise ConversionError(f"{path}: expected a dict of tensors, got {type(state_dict).__name__}")
    not_tensors = sorted(name for name, value in state_dict.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise ConversionError(f"{path}: entries that are not tensors: {format_keys(not_tensors)}")
    return state_dict


class _BinShardCache:
    """Keeps the one `.bin` shard being read in memory, so that streaming shard by shard loads each shard once."""

    def __init__(self):
        self.path: Path | None = None
        self.state_dict: dict[str, torch.Tensor] = {}

    def get(self, path: Path, name: str) -> torch.Tensor:
        if self.path != path:
            self.state_dict = {}  # free the previous shard first
            self.state_dict = load_bin_file(path)
            self.path = path
        return self.state_dict[name]

    def clear(self):
        self.path, self.state_dict = None, {}


def read_bin_file(path: Path, cache: _BinShardCache | None = None) -> list[TensorSource]:
    """The tensors of one `.bin` file (read once here for the names and shapes, then again shard by shard)."""
    path = Path(path)
    cache = cache or _BinShardCache()
    state_dict = load_bin_file(path)
    sources = [
        TensorSource(name, tensor.dtype, tuple(tensor.shape), lambda p=path, n=name: cache.get(p, n), str(path))
        for name, tensor in state_dict.items()
    ]
    del state_dict
    return sources


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        with open(index_path, encoding="utf-8") as handle:
            weight_map = json.load(handle)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConversionError(f"{index_path}: not a valid shard index: {error}") from error
    return weight_map


def _read_sharded(directory: Path, index_name: str, read_file: Callable[[Path], list[TensorSource]]):
    index_path = directory / index_name
    weight_map = _read_index(index_path)
    shard_names = list(dict.fromkeys(weight_map.values()))
    missing = [name for name in shard_names if not (directory / name).is_file()]
    if missing:
        raise ConversionError(f"{index_path} lists shards that do not exist: {', '.join(missing)}")
    sources = []
    misplaced = []
    for shard_name in shard_names:
        for source in read_file(directory / shard_name):
            if weight_map.get(source.name) != shard_name:
                misplaced.append(f"{source.name} (in {shard_name}, index says {weight_map.get(source.name)})")
            sources.append(source)
    found = {source.name for source in sources}
    absent = sorted(set(weight_map) - found)
    if absent:
        raise ConversionError(f"{index_path} lists keys that no shard holds: {format_keys(absent)}")
    if misplaced:
        raise ConversionError(f"{index_path} does not match its shards: {format_keys(misplaced)}")
    return sources


def read_checkpoint(path: str | Path, bin_cache: _BinShardCache | None = None) -> list[TensorSource]:
    """Lists the tensors of a checkpoint: a weight file, or a directory holding `model.safetensors`,
    `model.safetensors.index.json` (+ shards), `pytorch_model.bin` or `pytorch_model.bin.index.json` (+ shards), in
    that order of preference. Checks that every shard exists and matches its index; loads nothing."""
    path = Path(path)
    cache = bin_cache or _BinShardCache()
    if path.is_file():
        return read_safetensors_file(path) if path.suffix == ".safetensors" else read_bin_file(path, cache)
    if not path.is_dir():
        raise ConversionError(f"{path}: no such checkpoint directory or file")
    if (path / SAFE_WEIGHTS_INDEX_NAME).is_file():
        return _read_sharded(path, SAFE_WEIGHTS_INDEX_NAME, read_safetensors_file)
    if (path / SAFE_WEIGHTS_NAME).is_file():
        return read_safetensors_file(path / SAFE_WEIGHTS_NAME)
    if (path / BIN_WEIGHTS_INDEX_NAME).is_file():
        return _read_sharded(path, BIN_WEIGHTS_INDEX_NAME, lambda file: read_bin_file(file, cache))
    if (path / BIN_WEIGHTS_NAME).is_file():
        return read_bin_file(path / BIN_WEIGHTS_NAME, cache)
    raise ConversionError(
        f"{path}: no weights found (looked for {SAFE_WEIGHTS_INDEX_NAME}, {SAFE_WEIGHTS_NAME}, "
        f"{BIN_WEIGHTS_INDEX_NAME}, {BIN_WEIGHTS_NAME})"
    )


def has_weights(directory: Path) -> bool:
    """Whether `directory` holds full model weights in one of the layouts `read_checkpoint` reads."""
    names = (SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, BIN_WEIGHTS_INDEX_NAME, BIN_WEIGHTS_NAME)
    return any((Path(directory) / name).is_file() for name in names)


# --------------------------------------------------------------------------------------------------------------------
# Strict key accounting
# --------------------------------------------------------------------------------------------------------------------


def format_keys(keys: Iterable[str], limit: int = MAX_LISTED_KEYS) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


class KeyPlan:
    """`target key -> source tensor` pairs, checked against the target model's expected keys and shapes.

    `add` records one mapped tensor, `unknown` a source key the key map does not know, `drop` a source key that is
    deliberately not carried over (with the reason, reported to the user). `check` raises a `ConversionError` listing
    every problem at once.
    """

    def __init__(self, what: str):
        self.what = what
        self.entries: dict[str, TensorSource] = {}
        self.duplicates: list[str] = []
        self.unknown_keys: list[str] = []
        self.dropped: dict[str, list[str]] = {}

    def add(self, target: str, source: TensorSource):
        if target in self.entries:
            self.duplicates.append(f"{target} (from {self.entries[target].name} and {source.name})")
            return
        self.entries[target] = source

    def unknown(self, source_key: str):
        self.unknown_keys.append(source_key)

    def drop(self, source_key: str, reason: str):
        self.dropped.setdefault(reason, []).append(source_key)

    def replace(self, target: str, source: TensorSource):
        """Swaps the tensor planned for `target` (e.g. for a padded copy); `target` must already be planned."""
        self.entries[target] = source

    def check(self, expected_shapes: dict[str, tuple[int, ...]], optional: Iterable[str] = ()):
        """Raises unless every expected key is filled exactly once with the expected shape and nothing else is."""
        optional = set(optional)
        problems = []
        if self.unknown_keys:
            problems.append(f"source keys the key map does not know: {format_keys(self.unknown_keys)}")
        unexpected = [key for key in self.entries if key not in expected_shapes]
        if unexpected:
            problems.append(f"keys the target model does not have: {format_keys(unexpected)}")
        missing = [key for key in expected_shapes if key not in self.entries and key not in optional]
        if missing:
            problems.append(f"target keys no source key fills: {format_keys(missing)}")
        mismatched = [
            f"{key} (source {source.name} {list(source.shape)}, target {list(expected_shapes[key])})"
            for key, source in self.entries.items()
            if key in expected_shapes and tuple(source.shape) != tuple(expected_shapes[key])
        ]
        if mismatched:
            problems.append(f"shape mismatches: {format_keys(mismatched)}")
        if self.duplicates:
            problems.append(f"target keys filled twice: {format_keys(self.duplicates)}")
        if problems:
            raise ConversionError(f"{self.what}: " + "; ".join(problems))

    @property
    def total_bytes(self) -> int:
        return sum(source.nbytes for source in self.entries.values())

    @property
    def total_parameters(self) -> int:
        return sum(source.numel for source in self.entries.values())


def build_on_meta(model_class, config):
    """`model_class(config)` on the meta device: every parameter's name and shape, and no memory."""
    with torch.device("meta"):
        return model_class(config)


def expected_state_dict_shapes(meta_model) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """The state-dict keys and shapes of a model, and the keys that may be absent because they are tied to another
    (e.g. `lm_head.weight` under `tie_word_embeddings`)."""
    shapes = {name: tuple(tensor.shape) for name, tensor in meta_model.state_dict().items()}
    tied = set(getattr(meta_model, "all_tied_weights_keys", None) or {})
    return shapes, tied


# --------------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------------


def parse_size(size: int | str) -> int:
    """`"5GB"` -> 5_000_000_000, `"2GiB"` -> 2 * 2**30, `"20KB"` -> 20_000, ints unchanged."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        value = convert_file_size_to_int(size)
    except ValueError as error:
        raise ConversionError(f"--max-shard-size: cannot read {size!r} as a size such as '5GB' or '500MB'") from error
    if value <= 0:
        raise ConversionError(f"--max-shard-size must be positive, got {size!r}")
    return value


def format_bytes(count: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count} B"


def _load_checked(source: TensorSource) -> torch.Tensor:
    tensor = source.load()
    if tensor.dtype != source.dtype or tuple(tensor.shape) != tuple(source.shape):
        raise ConversionError(
            f"{source.name} ({source.origin}) loaded as {tensor.dtype} {list(tensor.shape)}, "
            f"but its header says {source.dtype} {list(source.shape)}"
        )
    return tensor.contiguous()


def _load_shard(sources: dict[str, TensorSource], targets: list[str]) -> dict[str, torch.Tensor]:
    shard: dict[str, torch.Tensor] = {}
    storages = set()
    for target in targets:
        tensor = _load_checked(sources[target])
        # save_file refuses tensors that share memory (weights tied in a .bin share one storage): copy the second.
        if tensor.numel() and tensor.untyped_storage().data_ptr() in storages:
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        shard[target] = tensor
    return shard


def write_safetensors(entries: list[tuple[str, TensorSource]], directory: Path, max_shard_size: int) -> dict[str, str]:
    """Writes `(target name, source)` pairs into `model.safetensors` or, above `max_shard_size` bytes,
    `model-0000i-of-0000n.safetensors` shards with a `model.safetensors.index.json`, loading one shard's tensors at a
    time. Returns name -> file."""
    directory = Path(directory)
    sources = dict(entries)
    meta = {target: torch.empty(source.shape, dtype=source.dtype, device="meta") for target, source in entries}
    split = split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_size)
    for file_name, targets in split.filename_to_tensors.items():
        save_file(_load_shard(sources, targets), directory / file_name, metadata={"format": "pt"})
    if split.is_sharded:
        index = {
            "metadata": {"total_parameters": sum(source.numel for _, source in entries), **split.metadata},
            "weight_map": dict(sorted(split.tensor_to_filename.items())),
        }
        with open(directory / SAFE_WEIGHTS_INDEX_NAME, "w", encoding="utf-8") as handle:
            json.dump(index, handle, indent=2)
            handle.write("\n")
    return split.tensor_to_filename


def verify_written(directory: Path, entries: list[tuple[str, TensorSource]]) -> int:
    """Reads every written tensor back (through the safetensors-validated files) and checks it is bit-identical to its
    source, one tensor at a time. Returns the number of tensors checked."""
    written = {source.name: source for source in read_checkpoint(directory)}
    if set(written) != {target for target, _ in entries}:
        raise ConversionError(f"{directory}: the written keys differ from the planned ones")
    differing = []
    for target, source in entries:
        expected, actual = source.load(), written[target].load()
        same = expected.dtype == actual.dtype and expected.shape == actual.shape
        if not (same and torch.equal(_as_bytes(expected), _as_bytes(actual))):
            differing.append(target)
        del expected, actual
    if differing:
        raise ConversionError(f"written tensors differ from their sources: {format_keys(differing)}")
    return len(entries)


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else flat.to(torch.uint8)


# The model types of the checkpoints the conversions write (transformers LLaVA, MS-LLaVA, the original code base's
# LlavaLlamaForCausalLM): --overwrite replaces an existing --output only when its config.json names one of them.
OVERWRITABLE_MODEL_TYPES = ("llava", "ms_llava", "llava_llama")


def _protected_reason(output: Path) -> str | None:
    """Why `output` must never be replaced (it is a filesystem root, the current working directory, the user's home,
    or contains one of these), or None. Paths are compared with symlinks resolved (a link to the home is the home)."""
    resolved = output.resolve()
    if resolved == resolved.parent:
        return "it is a filesystem root"
    for what, where in (("the current working directory", Path.cwd), ("the home directory", Path.home)):
        try:
            place = where().resolve()
        except (OSError, KeyError, RuntimeError):  # a deleted working directory; no HOME and no passwd entry
            continue
        if resolved == place:
            return f"it is {what}"
        if resolved in place.parents:
            return f"it contains {what} ({place})"
    return None


def _not_a_checkpoint_reason(output: Path) -> str | None:
    """Why the existing directory `output` does not look like a checkpoint a conversion wrote, or None when it does:
    it must hold a `config.json` that is a JSON object whose `model_type` is one of `OVERWRITABLE_MODEL_TYPES`, and no
    subdirectory (the conversions write none)."""
    config_path = output / "config.json"
    if not config_path.is_file():
        return "it has no config.json, so it is not a checkpoint written by a conversion"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return f"its config.json cannot be read as JSON ({error})"
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in OVERWRITABLE_MODEL_TYPES:
        return (
            f"its config.json has model_type {model_type!r}, not one the conversions write "
            f"({', '.join(OVERWRITABLE_MODEL_TYPES)})"
        )
    subdirectories = sorted(path.name for path in output.iterdir() if path.is_dir())
    if subdirectories:
        return f"it has subdirectories, which the conversions never write: {format_keys(subdirectories, limit=5)}"
    return None


def check_output(output: str | Path, overwrite: bool = False, sources: Iterable[str | Path] = ()) -> Path:
    """Checks that a conversion may write `output`; returns it as an absolute path.

    Refused, with a ConversionError naming the path and the reason:

    * an `output` that is or contains one of the `sources`;
    * an existing `output` that is not a directory;
    * an existing `output` that is a filesystem root, the current working directory or the user's home, or contains
      one of them (the staged write replaces the whole directory), with or without `overwrite`;
    * an existing non-empty `output` without `overwrite`;
    * with `overwrite`, an existing non-empty `output` that does not look like a checkpoint a conversion wrote: it
      needs a top-level `config.json` whose `model_type` is `llava`, `ms_llava` or `llava_llama`, and no
      subdirectory. Anything else (a project folder, a home directory, a checkpoint of another kind) is never deleted.
    """
    output = Path(output).absolute()
    for source in sources:
        source = Path(source).absolute()
        if source == output or output in source.parents:
            raise ConversionError(f"--output {output} would overwrite the source {source}")
    if output.exists():
        if not output.is_dir():
            raise ConversionError(f"--output {output} exists and is not a directory")
        protected = _protected_reason(output)
        if protected:
            raise ConversionError(f"--output {output} cannot be written or replaced: {protected}")
        not_a_checkpoint = _not_a_checkpoint_reason(output) if any(output.iterdir()) else None
        if not_a_checkpoint:
            raise ConversionError(
                f"--output {output} exists and is not empty, and --overwrite will not replace it: "
                f"{not_a_checkpoint}; choose a new or empty directory"
            )
        if not overwrite and any(output.iterdir()):
            raise ConversionError(f"--output {output} exists and is not empty; pass --overwrite to replace it")
    return output


@contextmanager
def staged_output(
    output: str | Path,
    overwrite: bool = False,
    sources: Iterable[str | Path] = (),
    log: Callable[[str], None] | None = None,
) -> Iterator[Path]:
    """Yields a temporary directory next to `output`; on success it replaces `output` (`replace_folder`: the files of
    an existing output that are not a checkpoint's are kept, what is removed goes to `log`), on any error it is removed.

    Refuses what `check_output` refuses (conversions call that first too, to fail before reading anything).
    """
    output = check_output(output, overwrite, sources)
    with replace_folder(output, log=log) as staging:
        yield staging


def _link_or_copy(source: str | Path, target: str | Path) -> None:
    try:  # a hard link: the kept file is not copied (it may be large) and the old folder's removal leaves it intact
        os.link(source, target, follow_symlinks=False)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(source, target, follow_symlinks=False)


@contextmanager
def replace_folder(
    output: str | Path, log: Callable[[str], None] | None = None, keep_existing: bool = False
) -> Iterator[Path]:
    """Yields an empty temporary directory next to `output` to write a checkpoint into; on success the whole of it
    becomes `output` in one rename (an interrupt leaves the old folder or the new one, never a mix), on any error it is
    removed and `output` is untouched.

    When `output` exists, only its checkpoint files are replaced (`ms_llava.checkpoints.is_checkpoint_file`: weights,
    configs, processor and tokenizer files, remote-code modules): those the new write does not rewrite (the shards of
    an earlier, differently sharded save, say) are removed and listed to `log`; everything else (a notes file, results,
    logs, subfolders) is carried over into the new folder by hard link, unchanged. With `keep_existing` (a write the
    user did not ask to overwrite anything), a file of `output` that the new write would replace is refused instead: a
    `ValueError` naming them, `output` untouched.
    """
    from ..checkpoints import is_checkpoint_file

    output = Path(output).absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        yield staging
        # mkdtemp creates the directory 0o700: give the output the permissions a plain mkdir would.
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)
        if output.exists():
            written = {path.name for path in staging.iterdir()}
            entries = sorted(output.iterdir())
            replaced = [entry.name for entry in entries if entry.name in written]
            if keep_existing and replaced:
                raise ValueError(
                    f"{output} already has {format_keys(replaced, limit=10)}, which this would overwrite; choose "
                    "another folder, or pass --overwrite to replace them (other files are kept)"
                )
            protected = _protected_reason(output)
            removed, kept = [], []
            for entry in entries:
                if entry.name in written:
                    continue
                if not entry.is_symlink() and entry.is_file() and is_checkpoint_file(entry.name):
                    removed.append(entry.name)
                else:
                    kept.append(entry.name)
                    if protected:
                        continue  # replaced file by file below: the kept entries stay where they are
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.copytree(entry, staging / entry.name, symlinks=True, copy_function=_link_or_copy)
                    else:
                        _link_or_copy(entry, staging / entry.name)
            if log is not None and (replaced or removed):
                log(
                    f"replacing the checkpoint in {output}: rewritten: {format_keys(replaced, limit=10)}"
                    + (f", removed (not part of the new checkpoint): {', '.join(removed)}" if removed else "")
                    + (f"; kept: {format_keys(kept, limit=10)}" if kept else "")
                )
            if protected:
                # The current directory, the home or a root is never renamed away: its files are replaced one by one
                # (each atomically), the stale checkpoint files removed, and nothing else touched.
                for name in written:
                    os.replace(staging / name, output / name)
                for name in removed:
                    (output / name).unlink()
                return
            # os.replace cannot replace a non-empty directory: move the previous output aside, then delete it (a
            # failure between the two renames leaves it in `.<name>.previous-*`, not deleted).
            previous = Path(tempfile.mkdtemp(prefix=f".{output.name}.previous-", dir=output.parent))
            os.replace(output, previous / output.name)
            os.replace(staging, output)
            shutil.rmtree(previous)
        else:
            os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # a failed write leaves nothing half-written


# --------------------------------------------------------------------------------------------------------------------
# Sources and reporting
# --------------------------------------------------------------------------------------------------------------------


def resolve_source(source: str | Path, allow_patterns: list[str] | None = None, label: str = "--source") -> Path:
    """A local directory as is; a path that does not exist fails at once; anything else is tried as a Hub repo id
    (`huggingface_hub.snapshot_download` of `allow_patterns` only) and its local snapshot returned
    (`ms_llava.checkpoints.resolve_checkpoint`, whose errors become `ConversionError`s naming both attempts)."""
    from ..checkpoints import CheckpointError, resolve_checkpoint

    try:
        return resolve_checkpoint(source, label, allow_patterns=allow_patterns or HUB_ALLOW_PATTERNS, check=False)
    except CheckpointError as error:
        raise ConversionError(str(error)) from error


def read_json(path: Path) -> dict:
    """A JSON file's content; a missing or malformed file is a ConversionError naming it."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError as error:
        raise ConversionError(f"{path}: not found") from error
    except ValueError as error:
        raise ConversionError(f"{path}: not valid JSON: {error}") from error


def copy_files(source_dir: Path, target_dir: Path, names: Iterable[str]) -> list[str]:
    """Copies, byte for byte, those of `names` that exist in `source_dir`; returns the copied names."""
    copied = []
    for name in names:
        if (Path(source_dir) / name).is_file():
            shutil.copyfile(Path(source_dir) / name, Path(target_dir) / name)
            copied.append(name)
    return copied


@dataclass
class ConversionReport:
    """What a conversion did, printed at the end and returned to library callers."""

    output: Path
    tensors_written: int = 0
    bytes_written: int = 0
    parameters_written: int = 0
    dropped: dict[str, list[str]] = field(default_factory=dict)  # reason -> source keys
    created: dict[str, list[str]] = field(default_factory=dict)  # how -> target keys not copied from the source
    tensors_verified: int = 0
    parity: dict[str, float] = field(default_factory=dict)  # what was compared -> max |difference|
    parity_skipped: str | None = None
    notes: list[str] = field(default_factory=list)
    peak_rss: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        lines = [
            f"wrote {self.output}",
            f"  tensors: {self.tensors_written} ({self.parameters_written:,} parameters, "
            f"{format_bytes(self.bytes_written)}); {self.tensors_verified} read back bit-identical to their sources",
        ]
        for reason, keys in self.dropped.items():
            lines.append(f"  dropped: {reason}: {len(keys)} keys: {format_keys(keys, limit=8)}")
        for how, keys in self.created.items():
            lines.append(f"  created: {how}: {len(keys)} keys: {format_keys(keys, limit=8)}")
        for what, difference in self.parity.items():
            lines.append(f"  parity: {what}: max |difference| = {difference:.3g}")
        if self.parity_skipped:
            lines.append(f"  parity: skipped ({self.parity_skipped})")
        lines.extend(f"  note: {note}" for note in self.notes)
        lines.append(f"  peak resident memory (RSS): {format_bytes(self.peak_rss)}; time: {self.seconds:.1f} s")
        return lines

    def check_parity_results(self, message: str = "parity check failed") -> None:
        """Raises a ConversionError (`message: {what: difference}`) unless every parity difference is exactly 0."""
        failed = {what: difference for what, difference in self.parity.items() if difference != 0}
        if failed:
            raise ConversionError(f"{message}: {failed}")

    def finish(self, plan: KeyPlan, started: float) -> ConversionReport:
        """Fills in what `plan` wrote, the peak RSS so far and the time since `started` (`time.perf_counter()`)."""
        self.tensors_written = len(plan.entries)
        self.bytes_written = plan.total_bytes
        self.parameters_written = plan.total_parameters
        self.peak_rss = peak_rss_bytes()
        self.seconds = time.perf_counter() - started
        return self


def parity_skip_reason(check_parity: bool, parameters: int) -> str | None:
    """Why the parity check is skipped (`--no-parity`, or more than `PARITY_MAX_PARAMETERS` parameters), or None."""
    if not check_parity:
        return "--no-parity"
    if parameters > PARITY_MAX_PARAMETERS:
        return f"{parameters:,} parameters > {PARITY_MAX_PARAMETERS:,}: too large to build both models"
    return None


@dataclass
class ConversionOutput:
    """Where and how a conversion writes, and the steps every conversion shares around that: `start` at the beginning
    (the clock, the shard size read, `output` checked), `write` at the end."""

    output: Path  # absolute
    max_shard_size: int  # bytes
    overwrite: bool
    check_parity: bool
    log: Callable[[str], None]
    started: float  # time.perf_counter()

    @classmethod
    def start(
        cls,
        output: str | Path,
        max_shard_size: int | str,
        overwrite: bool,
        check_parity: bool,
        log: Callable[[str], None],
    ) -> ConversionOutput:
        """Starts the clock, reads `max_shard_size` (`parse_size`) and checks that `output` may be written
        (`check_output`, before anything is read); raises a ConversionError otherwise."""
        started = time.perf_counter()
        shard_bytes = parse_size(max_shard_size)
        return cls(check_output(output, overwrite), shard_bytes, overwrite, check_parity, log, started)

    def write(
        self,
        plan: KeyPlan,
        report: ConversionReport,
        sources: Iterable[str | Path],
        write_files: Callable[[Path], None],
        parity: Callable[[Path], dict[str, float]],
        parity_what: str,
        parity_failure: str = "parity check failed",
    ) -> ConversionReport:
        """Writes the conversion into a staged folder (`staged_output`: nothing is left in `output` on an error): the
        planned tensors (`write_safetensors`), the other files (`write_files(staging)`), the tensors read back
        (`verify_written`); then, unless `parity_skip_reason` gives a reason, logs `checking parity ({parity_what})`,
        stores `parity(staging)` in the report and raises unless every difference is 0
        (`ConversionReport.check_parity_results(parity_failure)`). Returns the finished report."""
        entries = list(plan.entries.items())
        with staged_output(self.output, overwrite=self.overwrite, sources=sources, log=self.log) as staging:
            self.log(f"writing {len(entries)} tensors ({plan.total_parameters:,} parameters) to {report.output}")
            write_safetensors(entries, staging, self.max_shard_size)
            write_files(staging)
            report.tensors_verified = verify_written(staging, entries)
            report.parity_skipped = parity_skip_reason(self.check_parity, plan.total_parameters)
            if report.parity_skipped is None:
                self.log(f"checking parity ({parity_what})")
                report.parity = parity(staging)
                report.check_parity_results(parity_failure)
        return report.finish(plan, self.started)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silences transformers' warnings and progress bars while it loads what we already checked (loading reports,
    deprecation notes about transformers 4.x config fields such as `rope_scaling`)."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logging.set_verbosity(verbosity)
        logging.enable_progress_bar()


def max_abs_difference(expected: torch.Tensor, actual: torch.Tensor) -> float:
    """max |expected - actual| in float64 (inf if the shapes differ)."""
    if expected.shape != actual.shape:
        return float("inf")
    if expected.numel() == 0:
        return 0.0
    return (expected.double() - actual.double()).abs().max().item()


def peak_rss_bytes() -> int:
    """The peak resident set size of this process so far (`resource.getrusage`), in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def run_conversion(convert: Callable[[], ConversionReport]) -> int:
    """Runs a conversion for the command line: its report on success (exit 0), `error: ...` on stderr for a
    `ConversionError` (exit 1), no traceback."""
    try:
        report = convert()
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print("\n".join(report.lines()))
    return 0


__all__ = [
    "HUB_ALLOW_PATTERNS",
    "IMAGE_TOKEN",
    "OVERWRITABLE_MODEL_TYPES",
    "PARITY_MAX_PARAMETERS",
    "ConversionError",
    "ConversionOutput",
    "ConversionReport",
    "KeyPlan",
    "TensorSource",
    "build_on_meta",
    "check_output",
    "copy_files",
    "expected_state_dict_shapes",
    "format_bytes",
    "format_keys",
    "has_weights",
    "load_bin_file",
    "max_abs_difference",
    "parity_skip_reason",
    "parse_size",
    "peak_rss_bytes",
    "quiet_transformers",
    "read_checkpoint",
    "read_json",
    "replace_folder",
    "resolve_source",
    "run_conversion",
    "staged_output",
    "tensor_source_from_tensor",
    "verify_written",
    "write_safetensors",
]
