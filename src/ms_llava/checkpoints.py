"""Where a checkpoint argument points, decided in one place for every command (`--checkpoint`, `--model`, `--source`).

`resolve_checkpoint(value)` returns a local folder:

* an existing folder is taken as is (and, for a model checkpoint, checked: `config.json`, the weights its index lists,
  and every `.safetensors` file's header, so that a truncated download is named before anything loads);
* a value that can only be a path (it starts with `.`, `/` or `~`, is no valid Hub repo id, or names a folder inside
  an existing one, such as `runs/stage2` when `runs/` exists) and does not exist fails at once, naming it;
* anything else is tried as a Hugging Face Hub repo id with one `snapshot_download` (a short timeout, no retry loop;
  `HF_HUB_OFFLINE` makes it look in the local Hub cache only), and when that fails too the error says that both the
  local folder and the Hub were tried.

Errors are `CheckpointError` (a `ValueError`) with the argument, the value and what to do. Light to import: the Hub
client and safetensors are imported when needed.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

# What a Hub checkpoint downloads for inference and training (configs, safetensors weights, tokenizer, chat template,
# demo samples); pickled `.bin` weights are not fetched.
MODEL_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken", "*.png", "*.jpg"]
# The files a saved checkpoint owns (transformers' save_pretrained of a model and its processor, the remote-code
# modules, the original LLaVA code base's layout). `--overwrite` replaces or removes these and nothing else: a notes
# file, results or logs in the same folder are kept.
CHECKPOINT_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "*.bin",
    "*.bin.index.json",
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "configuration_ms_llava.py",
    "modeling_ms_llava.py",
    "processing_ms_llava.py",
    "image_processing_ms_llava.py",
)
_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")
# A Hub repo id: "name" or "owner/name" (huggingface_hub's validate_repo_id, without its length limits).
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class CheckpointError(ValueError):
    """A checkpoint argument names nothing usable; the message names the argument, the value and what to do."""


def is_checkpoint_file(name: str) -> bool:
    """Whether the file `name` (a top-level name in a folder) is one a saved checkpoint owns."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in CHECKPOINT_FILE_PATTERNS)


def checkpoint_files_in(directory: str | Path) -> list[str]:
    """The top-level files of `directory` that a saved checkpoint owns (sorted); [] for a missing folder."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(path.name for path in directory.iterdir() if path.is_file() and is_checkpoint_file(path.name))


def holds_checkpoint(directory: str | Path) -> bool:
    """Whether `directory` holds a checkpoint: a `config.json` or weights (safetensors, `.bin`, an index)."""
    return any(
        name == "config.json" or any(fnmatch.fnmatchcase(name, pattern) for pattern in _WEIGHT_PATTERNS)
        for name in checkpoint_files_in(directory)
    )


def looks_like_path(value: str) -> bool:
    """Whether `value` can only mean a local path, never a Hub repo id: it starts with `.`, `/` or `~` (or is absolute
    on this system), it is no valid repo id (`name` or `owner/name`), or its parent folder exists here (`runs/stage2`
    when `runs/` exists)."""
    text = str(value)
    if text.startswith((".", "/", "~", "\\")) or Path(text).is_absolute() or not _REPO_ID.match(text):
        return True
    parent = Path(text).parent
    return parent != Path(".") and parent.is_dir()


def check_safetensors(path: str | Path, label: str | None = None) -> None:
    """Opens `path` with `safetensors.safe_open` (reads the header and checks that the file covers every tensor it
    declares); a truncated or corrupt file raises `CheckpointError` naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception as error:  # SafetensorError (not an OSError) for a bad header or a short file, OSError to read
        what = f"{label}: " if label else ""
        raise CheckpointError(
            f"{what}{path} is not a readable safetensors file (truncated or corrupt: {error}); download or save the "
            "checkpoint again"
        ) from error


def _missing_processor_files(directory: Path) -> list[str]:
    missing = []
    if not any((directory / name).is_file() for name in ("processor_config.json", "preprocessor_config.json")):
        missing.append("processor_config.json (or preprocessor_config.json)")
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        missing.append("tokenizer.json (or tokenizer.model)")
    return missing


def check_checkpoint_folder(directory: str | Path, label: str = "checkpoint", processor: bool = False) -> Path:
    """Checks that `directory` holds a loadable model checkpoint: a `config.json` that is JSON, weights
    (`model.safetensors`, a safetensors or `.bin` index whose shards all exist, or `pytorch_model.bin`), safetensors
    files whose headers read, and with `processor`, the processor's and tokenizer's files. Raises `CheckpointError`
    naming what is missing or broken; returns the folder."""
    import json

    directory = Path(directory)
    hint = "expected a folder written by save_pretrained"
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{label} {directory}: no config.json, so not a checkpoint ({hint})")
    try:
        json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(
            f"{label} {directory}: config.json is not valid JSON ({error}); save or download the checkpoint again"
        ) from error
    shards: list[Path] = []
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                names = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                raise CheckpointError(
                    f"{label} {directory}: {index} is not a valid shard index ({error!r:.200})"
                ) from error
            missing = [name for name in names if not (directory / name).is_file()]
            if missing:
                raise CheckpointError(
                    f"{label} {directory}: {index.name} lists shards that are missing: {', '.join(missing)}; download "
                    "or copy them"
                )
            shards = [directory / name for name in names]
            break
    else:
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (directory / name).is_file():
                shards = [directory / name]
                break
    if not shards:
        raise CheckpointError(
            f"{label} {directory}: no weights (model.safetensors, a model.safetensors.index.json with its shards, or "
            f"pytorch_model.bin); {hint}"
        )
    for shard in shards:
        if shard.suffix == ".safetensors":
            check_safetensors(shard, f"{label} {directory}")
    missing = _missing_processor_files(directory) if processor else []
    if missing:
        raise CheckpointError(
            f"{label} {directory}: the processor's files are missing: {', '.join(missing)} (save the processor too: "
            "processor.save_pretrained(folder))"
        )
    if processor:
        check_processor_agrees(directory, label)
    return directory


def check_processor_agrees(directory: str | Path, label: str = "checkpoint") -> None:
    """The one check that a saved processor and model agree on M and on the image token: the processor expands each
    image to `num_image_tokens` placeholders with id `image_token_id`, the model fills `resampler_config.num_queries`
    of them at `image_token_id`. Raises `CheckpointError` naming both values."""
    import json

    from transformers import AutoProcessor

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
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
    """The local folder of the checkpoint `value` names: an existing folder, or a Hub repo's snapshot.

    Args:
        value: a folder, or a Hub repo id (`owner/name`).
        label: how the messages name the argument (`"--checkpoint"`, `"--model"`, `"--source"`).
        allow_patterns: the files to download from the Hub (default `MODEL_ALLOW_PATTERNS`).
        check: also check the folder as a model checkpoint (`check_checkpoint_folder`).
        processor: the checkpoint must also hold its processor (config, tokenizer files).

    Raises:
        CheckpointError: a path that does not exist (at once, with no Hub request), a file where a folder is
            expected, a bare name that neither exists here nor on the Hub (both named), or a folder that is not a
            complete checkpoint.
    """
    text = str(value)
    path = Path(text).expanduser()
    if path.is_dir():
        return check_checkpoint_folder(path, label, processor) if check else path
    if path.exists():
        raise CheckpointError(f"{label} {text}: is a file; give the checkpoint's folder (written by save_pretrained)")
    if looks_like_path(text):
        raise CheckpointError(f"{label} {text}: no such folder ({path.absolute()}); check the path")
    folder = _download(text, label, allow_patterns or MODEL_ALLOW_PATTERNS, path)
    return check_checkpoint_folder(folder, f"{label} {text}: the Hub's snapshot", processor) if check else folder


def _download(repo_id: str, label: str, allow_patterns: list[str], local: Path) -> Path:
    from huggingface_hub import constants, snapshot_download

    try:  # one call: huggingface_hub does not retry a refused or failed connection here (transformers' loaders do)
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=allow_patterns))
    except Exception as error:  # network, HTTP (404, 401 for a gated or private repo), cache or validation errors
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if constants.HF_HUB_OFFLINE:
            reason = f"HF_HUB_OFFLINE is set, and the local Hub cache does not have it ({reason})"
        else:
            reason = f"{reason} ({type(error).__name__} from {constants.ENDPOINT})"
        raise CheckpointError(
            f"{label} {repo_id}: not a local folder ({local.absolute()} does not exist), and downloading it from the "
            f"Hub failed: {reason:.400}; give an existing checkpoint folder, or a Hub repo id you can reach"
        ) from error


__all__ = [
    "CHECKPOINT_FILE_PATTERNS",
    "CheckpointError",
    "check_checkpoint_folder",
    "check_safetensors",
    "checkpoint_files_in",
    "holds_checkpoint",
    "is_checkpoint_file",
    "looks_like_path",
    "resolve_checkpoint",
]
