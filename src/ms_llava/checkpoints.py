"""Checkpoint folders: the one list of the files a checkpoint owns, the one check of a folder before anything loads
it (`check_checkpoint_folder`: truncated or pickled weights, missing shards, a config that does not fit the weights),
and where a checkpoint argument (`--checkpoint`, `--model`, `--source`) points, decided once (`resolve_checkpoint`).
Errors are `CheckpointError` (a `ValueError`) naming the argument and the file. Light to import: torch, transformers,
safetensors and the Hub client are imported where needed."""

from __future__ import annotations

import fnmatch
import functools
import json
import pickle
import re
import zipfile
from pathlib import Path

# The files a checkpoint owns: what save_pretrained writes for a model, a PEFT adapter, its processor and tokenizer,
# and the remote-code modules. `--overwrite` replaces these and nothing else; push uploads them and Hub downloads fetch
# them, less pickled weights.
PICKLED_WEIGHTS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
DOWNLOAD_PATTERNS = [
    *("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", "adapter_config.json"),
    *("processor_config.json", "preprocessor_config.json", "chat_template.jinja", "chat_template.json"),
    *("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"),
    *("vocab.json", "merges.txt", "*.tiktoken", "additional_chat_templates/*.jinja", "*_ms_llava.py"),
]
CHECKPOINT_FILES = (*DOWNLOAD_PATTERNS, *PICKLED_WEIGHTS)
SAFE, PICKLE = "model.safetensors", "pytorch_model.bin"
WEIGHT_FILES = (f"{SAFE}.index.json", f"{PICKLE}.index.json", SAFE, PICKLE)  # indexes first, safetensors first


class CheckpointError(ValueError):
    """A checkpoint argument names nothing usable; the message names the argument, the file and what to do."""


def is_checkpoint_file(name: str) -> bool:
    """Whether the file `name` (a top-level name in a folder) is one a checkpoint owns."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in CHECKPOINT_FILES)


def checkpoint_files_in(directory: str | Path) -> list[str]:
    """The top-level files of `directory` that a checkpoint owns (sorted); [] for a missing folder."""
    paths = Path(directory).iterdir() if Path(directory).is_dir() else []
    return sorted(path.name for path in paths if path.is_file() and is_checkpoint_file(path.name))


def looks_like_path(value: str) -> bool:
    """Whether `value` can only mean a local path, never a Hub repo id: it starts with `.`, `/` or `~` (or is absolute
    here), huggingface_hub's `validate_repo_id` refuses it, or its parent folder exists (`runs/stage2`, `runs/`)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text, parent = str(value), Path(value).parent
    try:
        validate_repo_id(text)
    except HFValidationError:
        return True
    return (
        text.startswith((".", "/", "~", "\\")) or Path(text).is_absolute() or parent != Path(".") and parent.is_dir()
    )


def read_json(path: Path, label: str = "") -> dict:
    """A JSON object from `path`; anything else is a `CheckpointError` naming the file."""
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{label}{path.name if label else path} is not valid JSON ({error})") from error
    if not isinstance(content, dict):
        raise CheckpointError(f"{label}{path.name if label else path} is not a JSON object")
    return content


def tensor_headers(path: str | Path, label: str | None = None) -> dict[str, tuple]:
    """`{key: (dtype, shape)}` of a weight file, reading no tensor data: a safetensors header (`safe_open`), or a
    `.bin` opened with `torch.load(weights_only=True, mmap=True)`, which refuses pickled objects. A file that is not
    readable, or a `.bin` that is not a plain state dict of tensors, raises `CheckpointError` naming it."""
    path, what = Path(path), f"{label}: " if label else ""
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from transformers.modeling_utils import str_to_torch_dtype

        try:
            with safe_open(str(path), framework="pt") as handle:
                slices = {key: handle.get_slice(key) for key in handle.keys()}
                return {key: (str_to_torch_dtype[s.get_dtype()], tuple(s.get_shape())) for key, s in slices.items()}
        except Exception as error:  # SafetensorError (not an OSError) for a bad header or a short file
            raise CheckpointError(
                f"{what}{path} is not a readable safetensors file (truncated or corrupt: {error}); download or save "
                "the checkpoint again"
            ) from error
    state_dict = load_bin(path, label)
    return {key: (tensor.dtype, tuple(tensor.shape)) for key, tensor in state_dict.items()}


check_safetensors = tensor_headers  # what the command line calls to name a truncated or corrupt file


def load_bin(path: Path, label: str | None = None) -> dict:
    """A `.bin` state dict, memory-mapped, with `torch.load(weights_only=True)`; `CheckpointError` naming the file
    when it holds anything but tensors by name (a pickled model or training state would run code to unpickle)."""
    import torch

    what = f"{label}: " if label else ""
    try:
        state_dict = torch.load(path, weights_only=True, map_location="cpu", mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:  # what torch's weights-only unpickler refuses, before it runs anything
        refused = re.search(r"Unsupported global: GLOBAL [\w.]+", str(error))
        raise CheckpointError(
            f"{what}{path} is not a plain state dict: it holds pickled objects ({refused[0] if refused else 'not tensors'}"
            "), and unpickling them could run code, so torch.load(weights_only=True) refused it; if you trust it, "
            "load it yourself and save the weights with save_pretrained (safetensors)"
        ) from error
    except RuntimeError as error:  # a corrupt or truncated archive
        raise CheckpointError(
            f"{what}{path} is not a readable .bin file ({error}); save or download it again"
        ) from error
    if not isinstance(state_dict, dict) or not all(isinstance(t, torch.Tensor) for t in state_dict.values()):
        raise CheckpointError(
            f"{what}{path} is not a plain state dict of tensors by name (it holds {type(state_dict).__name__} "
            "entries of other kinds); save the weights with save_pretrained (safetensors)"
        )
    return state_dict


def weight_files(directory: Path, label: str = "checkpoint") -> list[Path]:
    """The weight files of a checkpoint folder: the shards its index lists (the index read and every shard checked to
    exist), else `model.safetensors` or `pytorch_model.bin`; [] when it has none."""
    found = [directory / name for name in WEIGHT_FILES if (directory / name).is_file()]
    if not found or not (index := found[0]).name.endswith(".index.json"):
        return found[:1]
    try:
        names = sorted(set(read_json(index)["weight_map"].values()))
    except (KeyError, TypeError, AttributeError, CheckpointError) as error:
        raise CheckpointError(f"{label} {directory}: {index} is not a valid shard index ({error!r:.200})") from error
    if missing := [name for name in names if not (directory / name).is_file()]:
        raise CheckpointError(
            f"{label} {directory}: {index.name} lists shards that are missing: {', '.join(missing)}; download or "
            "copy them"
        )
    return [directory / name for name in names]


def check_checkpoint_folder(directory: str | Path, label: str = "checkpoint", processor: bool = False) -> Path:
    """Checks, before anything loads it, that `directory` holds a loadable model checkpoint: a `config.json` that is
    JSON, weights (`model.safetensors`, a safetensors or `.bin` index whose shards all exist, or `pytorch_model.bin`)
    that read (headers, plain state dicts) and whose shapes are those the config builds, and with `processor`, the
    processor's and tokenizer's files, agreeing with the config on M and the image token. Raises `CheckpointError`
    naming what is missing or broken; returns the folder."""
    directory = Path(directory)
    hint = "expected a folder written by save_pretrained"
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{label} {directory}: no config.json, so not a checkpoint ({hint})")
    read_json(directory / "config.json", f"{label} {directory}: ")
    files = weight_files(directory, label)
    if not files:
        raise CheckpointError(
            f"{label} {directory}: no weights (model.safetensors, a model.safetensors.index.json with its shards, or "
            f"pytorch_model.bin); {hint}"
        )
    wanted = [
        ("processor_config.json", "preprocessor_config.json"),
        ("tokenizer.json", "tokenizer.model", "vocab.json"),
    ]
    missing = [f"{names[0]} (or {names[1]})" for names in wanted if not any((directory / n).is_file() for n in names)]
    if processor and missing:
        raise CheckpointError(
            f"{label} {directory}: the processor's files are missing: {', '.join(missing)} (save the processor too: "
            "processor.save_pretrained(folder))"
        )
    check_weights_fit_config(directory, files, f"{label} {directory}")
    if processor:
        check_processor_agrees(directory, label)
    return directory


def load_config(directory: Path, label: str = ""):
    """`AutoConfig.from_pretrained(directory)`; a config transformers refuses (an invalid value, an unknown
    model_type) is a `CheckpointError` naming the file."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(directory)
    except Exception as error:  # ValueError, KeyError, huggingface_hub's StrictDataclassError (not a ValueError)
        reason, where = " ".join(str(error).split()), Path(directory) / "config.json"
        raise CheckpointError(f"{label}{': ' if label else ''}{where}: {reason:.400}") from error


def check_weights_fit_config(directory: Path, files: list[Path], label: str) -> None:
    """Every weight file reads (`tensor_headers`), and every tensor the model built from `config.json` expects has the
    shape the config gives it (after transformers' own key renames, as `from_pretrained` applies them)."""
    import torch
    from transformers import AutoModel, AutoModelForImageTextToText
    from transformers.conversion_mapping import get_model_conversion_mapping

    headers = {file: tensor_headers(file, label) for file in files}
    config = load_config(directory, label)
    auto = AutoModelForImageTextToText if config.model_type == "ms_llava" else AutoModel
    try:
        with torch.device("meta"):
            model = auto.from_config(config)
    except Exception:  # a model transformers cannot build here: from_pretrained will say why
        return
    expected = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    renames = get_model_conversion_mapping(model)
    for file, tensors in headers.items():
        for key, (_, shape) in tensors.items():
            target = functools.reduce(lambda name, rename: rename.rename_source_key(name)[0], renames, key)
            if target in expected and expected[target] != shape:
                raise CheckpointError(
                    f"{label}: {file.name} holds {key} with shape {list(shape)}, but config.json builds "
                    f"{list(expected[target])}: the config and the weights disagree (save them together again)"
                )


def check_processor_agrees(directory: str | Path, label: str = "checkpoint") -> None:
    """The one check that a saved processor and model agree on M and on the image token: the processor expands each
    image to `num_image_tokens` placeholders with id `image_token_id`, the model fills `resampler_config.num_queries`
    of them at `image_token_id`. Raises `CheckpointError` naming both values."""
    from transformers import AutoProcessor

    directory = Path(directory)
    config = read_json(directory / "config.json")
    if config.get("model_type") != "ms_llava":
        return
    saved = AutoProcessor.from_pretrained(directory)
    num_queries = (config.get("resampler_config") or {}).get("num_queries", 144)
    if saved.num_image_tokens != num_queries:
        raise CheckpointError(
            f"{label} {directory}: the processor expands each image to num_image_tokens={saved.num_image_tokens} "
            f"tokens, but the model config has resampler_config.num_queries={num_queries}; they must agree"
        )
    image_token_id = config.get("image_token_id", config.get("image_token_index", 32000))
    if saved.image_token_id != image_token_id:
        raise CheckpointError(
            f"{label} {directory}: the processor's image token {saved.image_token!r} has id {saved.image_token_id}, "
            f"but the model config has image_token_id={image_token_id}"
        )


def resolve_checkpoint(
    value: str | Path,
    label: str = "--checkpoint",
    *,
    allow_patterns: list[str] | None = None,
    check: bool = True,
    processor: bool = False,
) -> Path:
    """The local folder of the checkpoint `value` (`label` in messages) names: an existing folder, else, unless it can
    only be a path (`looks_like_path`: then it fails at once), a Hub repo's snapshot of `allow_patterns` (default
    `DOWNLOAD_PATTERNS`), fetched with one `snapshot_download` (no retry loop; `HF_HUB_OFFLINE` respected); a failure
    names both attempts. With `check`, the folder is checked (`check_checkpoint_folder`, with its `processor`)."""
    text = str(value)
    path = Path(text).expanduser()
    if path.is_dir():
        return check_checkpoint_folder(path, label, processor) if check else path
    if path.exists():
        raise CheckpointError(f"{label} {text}: is a file; give the checkpoint's folder (written by save_pretrained)")
    if looks_like_path(text):
        raise CheckpointError(f"{label} {text}: no such folder ({path.absolute()}); check the path")
    from huggingface_hub import constants, snapshot_download

    try:  # one call: huggingface_hub does not retry a refused or failed connection here (transformers' loaders do)
        folder = Path(snapshot_download(repo_id=text, allow_patterns=allow_patterns or DOWNLOAD_PATTERNS))
    except Exception as error:  # network, HTTP (404, 401 for a gated or private repo), cache or validation errors
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if constants.HF_HUB_OFFLINE:
            reason = f"HF_HUB_OFFLINE is set, and the local Hub cache does not have it ({reason})"
        else:
            reason = f"{reason} ({type(error).__name__} from {constants.ENDPOINT})"
        raise CheckpointError(
            f"{label} {text}: not a local folder ({path.absolute()} does not exist), and downloading it from the "
            f"Hub failed: {reason:.400}; give an existing checkpoint folder, or a Hub repo id you can reach"
        ) from error
    return check_checkpoint_folder(folder, f"{label} {text}: the Hub's snapshot", processor) if check else folder
