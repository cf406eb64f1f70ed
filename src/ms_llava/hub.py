"""Push MS-LLaVA checkpoints to the Hugging Face Hub, with a generated model card.

`push_to_hub(checkpoint, repo_id)` uploads one commit holding the safetensors weights, the processor files, the four
remote-code modules with `auto_map` (so the repo loads with `trust_remote_code=True` where `ms_llava` is not
installed) and a model card rendered from `model_cards/ms_llava_model_card.md` (shipped in the package as
`ms_llava.model_cards`). The projector settings in the card are read from the checkpoint's `config.json`.

The card never claims training you did not declare: `training=None` (the default) marks the weights as UNTRAINED in
the card and shows the paper's recipe as the way to train them; `training="paper"` says they were trained with the
paper's two stages (Sec. 4.1); a dict records your own recipe. `results={"benchmark": score}` adds an evaluation table.

transformers' own `model.push_to_hub(repo_id)` and `processor.push_to_hub(repo_id)` also upload the modules and
`auto_map` (importing `ms_llava` registers the classes for remote code), with transformers' generic model card.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shutil
import sys
import tempfile
from importlib import resources
from numbers import Real
from pathlib import Path

logger = logging.getLogger(__name__)

MODEL_CARD_TEMPLATE = "ms_llava_model_card.md"
REMOTE_CODE_MODULES = (
    "configuration_ms_llava.py",
    "modeling_ms_llava.py",
    "processing_ms_llava.py",
    "image_processing_ms_llava.py",
)
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_ms_llava.MSLlavaProcessor"}
IMAGE_PROCESSOR_AUTO_MAP = {
    "AutoImageProcessor": "image_processing_ms_llava.MSLlavaImageProcessor",
    "AutoProcessor": "processing_ms_llava.MSLlavaProcessor",
}
CARD_TAGS = ["ms-llava", "llava", "multimodal", "image-text-to-text", "ms-resampler"]
# Files a push uploads: `upload_folder`'s allow_patterns (fnmatch, `*` crosses folders). Anything else in the
# directory (optimizer states, logs, pickled weights) stays local.
CHECKPOINT_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "additional_chat_templates/*.jinja",
    *REMOTE_CODE_MODULES,
]
# Files of the repo that a checkpoint owns: `upload_folder`'s delete_patterns, so those this push does not rewrite (the
# shards of an earlier sharded push, its pickled weights) are deleted in the same commit.
MANAGED_FILES = [*CHECKPOINT_FILES, "pytorch_model*.bin", "pytorch_model.bin.index.json", "README.md"]
# The model side of a directory, kept when a processor object is given to replace the directory's processor files.
MODEL_SIDE_FILES = [
    "config.json",
    "generation_config.json",
    "model*.safetensors*",
    "configuration_ms_llava.py",
    "modeling_ms_llava.py",
]


def paper_recipe() -> dict:
    """The paper's training recipe (Sec. 4.1) as the card shows it. The numbers come from
    `ms_llava.training.PAPER_RECIPES`, the recipe `ms-llava train` runs, so card and trainer cannot disagree."""
    from .recipes import PAPER_RECIPES

    def row(stage: str, title: str, trained: str, frozen: str, data: str) -> dict:
        recipe = PAPER_RECIPES[stage]
        return {
            "stage": title,
            "trained": trained,
            "frozen": frozen,
            "data": data,
            "learning rate": f"{recipe.learning_rate:g}".replace("e-0", "e-"),  # 1e-05 -> 1e-5
            "batch size": recipe.global_batch_size,
            "epochs": f"{recipe.num_train_epochs:g}",
        }

    return {
        "stages": [
            row(
                "pretrain",
                "1. projector pre-training",
                "MS-Resampler",
                "vision encoder, LLM",
                "LLaVA-1.5 558K image-caption pairs",
            ),
            row(
                "finetune",
                "2. instruction tuning",
                "MS-Resampler + LLM",
                "vision encoder",
                "LLaVA-1.5 665K instruction data",
            ),
        ],
        "optimizer": "AdamW",
    }


def model_card_template() -> str:
    """The card template (Jinja): `model_cards/` of the repository, installed as the package `ms_llava.model_cards`."""
    return resources.files("ms_llava.model_cards").joinpath(MODEL_CARD_TEMPLATE).read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------- checkpoint checks


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def _missing_model_files(directory: Path) -> list[str]:
    missing = [] if (directory / "config.json").is_file() else ["config.json"]
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing += [
            f"{shard} (listed in model.safetensors.index.json)"
            for shard in shards
            if not (directory / shard).is_file()
        ]
    elif not (directory / "model.safetensors").is_file():
        pickled = sorted(path.name for path in directory.glob("pytorch_model*.bin"))
        hint = f" (found {', '.join(pickled)}: re-save with safetensors)" if pickled else ""
        missing.append(f"model.safetensors{hint}")
    return missing


def _missing_processor_files(directory: Path) -> list[str]:
    missing = [name for name in ("processor_config.json", "tokenizer_config.json") if not (directory / name).is_file()]
    if not (directory / "tokenizer.json").is_file() and not (directory / "tokenizer.model").is_file():
        missing.append("tokenizer.json (or tokenizer.model)")
    return missing


def _matching(names: list[str], patterns: list[str]) -> list[str]:
    from huggingface_hub.utils import filter_repo_objects

    return list(filter_repo_objects(names, allow_patterns=patterns))


def checkpoint_files(directory: str | Path, label: str | None = None) -> list[str]:
    """Checks that `directory` is a complete MS-LLaVA checkpoint and returns the files a push uploads.

    Raises `ValueError` naming every missing file (config, safetensors weights, processor, tokenizer), a config that is
    not `ms_llava`, or a processor whose `num_image_tokens` differs from the config's `resampler_config.num_queries`.
    `label` names the checkpoint in the messages (defaults to the directory).
    """
    directory = Path(directory)
    label = label or str(directory)
    if not directory.is_dir():
        raise ValueError(f"{label} is not a directory (expected a checkpoint written by save_pretrained)")
    missing = _missing_model_files(directory) + _missing_processor_files(directory)
    if missing:
        raise ValueError(f"{label} is not a complete MS-LLaVA checkpoint: missing {', '.join(missing)}")
    config = _read_json(directory / "config.json")
    if config.get("model_type") != "ms_llava":
        raise ValueError(
            f"{label}: config.json has model_type {config.get('model_type')!r}, not 'ms_llava'; convert the "
            "checkpoint to MS-LLaVA first"
        )
    num_queries = (config.get("resampler_config") or {}).get("num_queries", 144)
    num_image_tokens = _read_json(directory / "processor_config.json").get("num_image_tokens", 144)
    if num_image_tokens != num_queries:
        raise ValueError(
            f"{label}: the processor expands each image to num_image_tokens={num_image_tokens} tokens, but the "
            f"model config has resampler_config.num_queries={num_queries}; they must agree"
        )
    names = sorted(path.relative_to(directory).as_posix() for path in directory.rglob("*") if path.is_file())
    files = _matching(names, CHECKPOINT_FILES)  # what upload_folder(allow_patterns=CHECKPOINT_FILES) uploads
    skipped = [name for name in names if name not in files]
    if skipped:
        logger.warning(
            "%s: not uploading %d file(s) that are not part of a checkpoint: %s", label, len(skipped), skipped
        )
    return files


def _add_remote_code(folder: Path, files: list[str]) -> None:
    """Makes the staged `folder` carry the four modules and `auto_map`, without which the repo does not load with
    `trust_remote_code=True`. Normally there is nothing to do: `save_pretrained` writes both whenever `ms_llava` is
    imported. Missing modules come from the installed package; missing `auto_map` entries are added."""
    package = Path(__file__).resolve().parent
    for module in REMOTE_CODE_MODULES:
        if module not in files:
            _write(folder / module, (package / module).read_bytes())
    config_auto_map = {
        "AutoConfig": "configuration_ms_llava.MSLlavaConfig",
        "AutoModel": "modeling_ms_llava.MSLlavaModel",
        "AutoModelForImageTextToText": "modeling_ms_llava.MSLlavaForConditionalGeneration",
    }
    for name, auto_map, nested in (
        ("config.json", config_auto_map, None),
        ("processor_config.json", PROCESSOR_AUTO_MAP, "image_processor"),
        ("tokenizer_config.json", PROCESSOR_AUTO_MAP, None),
    ):
        original = _read_json(folder / name)
        content = json.loads(json.dumps(original))  # a deep copy
        for key, value in auto_map.items():
            content.setdefault("auto_map", {}).setdefault(key, value)
        if nested and isinstance(content.get(nested), dict):
            for key, value in IMAGE_PROCESSOR_AUTO_MAP.items():
                content[nested].setdefault("auto_map", {}).setdefault(key, value)
        if content != original:
            _write(folder / name, (json.dumps(content, indent=2) + "\n").encode())


def _write(path: Path, content: bytes) -> None:
    """Writes a file of the staged folder. A staged file may be a link to the user's checkpoint: unlinking it first
    keeps the write from going through the link into the checkpoint."""
    path.unlink(missing_ok=True)
    path.write_bytes(content)


# --------------------------------------------------------------------------------------------- model card


def _check_results(results) -> list[tuple[str, str]]:
    if results is None:
        return []
    if isinstance(results, dict) and results.get("format") == "ms-llava-eval-results/1":  # `ms-llava eval --output`
        labels = [
            f"{row['task']} {row['metric']} ({', '.join(f'{k} {v}' for k, v in row['source'].items())}; "
            f"{row['num_samples']} samples; limit {row['limit']})"
            for row in results["rows"]
        ]
        results = {row["benchmark"] or label: row["score"] for row, label in zip(results["rows"], labels, strict=True)}
    if not isinstance(results, dict) or not results:
        raise ValueError(f"results must be a non-empty dict {{benchmark: score}}, got {results!r}")
    rows = []
    for benchmark, score in results.items():
        if not isinstance(benchmark, str) or not benchmark.strip():
            raise ValueError(f"results: benchmark names must be non-empty strings, got {benchmark!r}")
        if isinstance(score, bool) or not isinstance(score, Real) or not math.isfinite(score):
            raise ValueError(f"results: the score of {benchmark!r} must be a finite number, got {score!r}")
        rows.append((benchmark, f"{score:g}" if isinstance(score, float) else str(score)))
    return rows


def _check_training(training) -> str | dict | None:
    if training is None or training == "paper":
        return training
    if not isinstance(training, dict) or not training:
        raise ValueError(f"training must be None (untrained), 'paper' or a non-empty dict, got {training!r}")
    stages = training.get("stages", [])
    if not isinstance(stages, list) or not all(isinstance(stage, dict) and stage for stage in stages):
        raise ValueError(f"training['stages'] must be a list of non-empty dicts, got {stages!r}")
    return training


def _training_table(training) -> tuple[list[str], list[list[str]], list[tuple[str, str]]]:
    recipe = paper_recipe() if training in (None, "paper") else training
    columns = []
    for stage in recipe.get("stages", []):
        columns += [key for key in stage if key not in columns]
    rows = [[str(stage.get(column, "")) for column in columns] for stage in recipe.get("stages", [])]
    notes = [(key, str(value)) for key, value in recipe.items() if key != "stages"]
    return columns, rows, notes


def _parameter_counts(directory: Path, files: list[str]) -> tuple[int, int] | None:
    """(total, projector) parameter counts from the safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    total = projector = 0
    for name in files:
        if not name.endswith(".safetensors"):
            continue
        with safe_open(directory / name, framework="pt") as handle:
            for key in handle.keys():
                count = math.prod(handle.get_slice(key).get_shape())
                total += count
                projector += count if "multi_modal_projector" in key else 0
    return (total, projector) if total else None


def _human(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f}{unit} ({count:,})"
    return f"{count:,}"


def build_model_card(
    checkpoint_dir: str | Path,
    repo_id: str,
    *,
    base_model: str | list[str] | None = None,
    license: str = "apache-2.0",  # noqa: A002 - the Hub's field name
    results: dict | None = None,
    training: str | dict | None = None,
    files: list[str] | None = None,
):
    """Renders the model card (a `huggingface_hub.ModelCard`) of the checkpoint in `checkpoint_dir`, as it will read
    on the Hub under `repo_id` (the usage snippets load `repo_id`)."""
    from huggingface_hub import ModelCard, ModelCardData

    from .configuration_ms_llava import MSLlavaConfig

    checkpoint_dir = Path(checkpoint_dir)
    files = checkpoint_files(checkpoint_dir) if files is None else files
    result_rows = _check_results(results)
    training = _check_training(training)
    config = MSLlavaConfig.from_pretrained(checkpoint_dir)
    resampler, vision, text = config.resampler_config, config.vision_config, config.text_config
    grid_h, grid_w = config.vision_grid_size
    rows, cols = resampler.query_grid_shape
    counts = _parameter_counts(checkpoint_dir, files)
    columns, stages, notes = _training_table(training)
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        base_model=base_model,
        license=license,
        tags=list(CARD_TAGS),
    )
    card = ModelCard.from_template(
        card_data,
        template_str=model_card_template(),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        base_model=base_model if isinstance(base_model, str) else ", ".join(base_model or []),
        license=license,
        untrained=training is None,
        training_is_paper=training == "paper",
        training_columns=columns,
        training_stages=stages,
        training_notes=notes,
        results=result_rows,
        num_queries=resampler.num_queries,
        query_grid=f"{rows} x {cols}",
        scope_windows=list(resampler.scope_windows),
        num_branches=resampler.num_branches,
        scope_bias_strength=resampler.scope_bias_strength,
        scope_bias="learnable, initialised by Eq. 5" if resampler.learnable_scope_bias else "fixed (Eq. 5)",
        fusion=resampler.fusion,
        fusion_hidden_size=resampler.fusion_hidden_size,
        fusion_act=resampler.fusion_act,
        resampler_hidden_size=resampler.hidden_size,
        resampler_heads=resampler.num_attention_heads,
        grid=f"{grid_h} x {grid_w}",
        num_visual_tokens=grid_h * grid_w + (1 if config.vision_feature_select_strategy == "full" else 0),
        vision_model_type=vision.model_type,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        vision_hidden_size=vision.hidden_size,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        text_model_type=text.model_type,
        text_hidden_size=text.hidden_size,
        text_layers=text.num_hidden_layers,
        vocab_size=text.vocab_size,
        total_parameters=_human(counts[0]) if counts else None,
        projector_parameters=_human(counts[1]) if counts else None,
    )
    return ModelCard(re.sub(r"\n{3,}", "\n\n", card.content))  # the template's optional sections leave blank runs


# --------------------------------------------------------------------------------------------- push


def push_to_hub(
    checkpoint,
    repo_id: str,
    *,
    processor=None,
    base_model: str | list[str] | None = None,
    license: str = "apache-2.0",  # noqa: A002 - the Hub's field name
    results: dict | None = None,
    training: str | dict | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
):
    """Uploads an MS-LLaVA checkpoint to `repo_id` in one commit and returns its `huggingface_hub.CommitInfo`.

    Args:
        checkpoint (`str`, `Path` or `MSLlavaForConditionalGeneration`):
            A directory written by `save_pretrained` (model and processor), or a model (then `processor` is required).
        repo_id (`str`):
            `"org/name"`; the repository is created if needed (`private` applies then only).
        processor (`MSLlavaProcessor`, *optional*):
            Uploaded instead of the directory's processor files.
        base_model (`str` or `list[str]`, *optional*):
            The Hub id(s) this model was built from (e.g. the LLaVA checkpoint it was converted from): the card's
            `base_model`.
        license (`str`, defaults to `"apache-2.0"`):
            The card's `license`.
        results (`dict`, *optional*):
            `{benchmark: score}`: an evaluation table in the card.
        training (`None`, `"paper"` or `dict`, *optional*):
            `None`: the card says the weights are UNTRAINED and shows the paper's recipe as how to train them.
            `"paper"`: trained with the paper's two stages. A dict: your recipe, `{"stages": [{column: value, ...},
            ...], other_key: value, ...}`.
        revision (`str`, *optional*):
            The branch to commit to; created from `main` if it does not exist. Defaults to `main`.
        commit_message, token, endpoint:
            Passed to `huggingface_hub.HfApi` (`endpoint` defaults to `HF_ENDPOINT` / huggingface.co).

    Every argument and the checkpoint are checked before anything is sent: an incomplete checkpoint raises
    `ValueError` naming the missing files, and no repository is created. Files of the repo that a checkpoint owns
    (weights, configs, processor files, modules, README.md) but that this checkpoint no longer has, such as the
    shards of an earlier sharded upload, are deleted in the same commit.
    """
    from huggingface_hub import HfApi

    from . import __version__

    _check_results(results)
    _check_training(training)
    if not isinstance(repo_id, str) or repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise ValueError(f"repo_id must be 'org/name', got {repo_id!r}")
    card_kwargs = {"base_model": base_model, "license": license, "results": results, "training": training}
    # upload_folder uploads one folder; the card and any rewritten config must not be written into the user's
    # checkpoint, so the commit is staged in a scratch folder of links to the checkpoint's files.
    with tempfile.TemporaryDirectory(prefix="ms-llava-push-") as scratch:
        folder = Path(scratch)
        label = _stage(checkpoint, processor, folder)
        files = checkpoint_files(folder, label)
        _add_remote_code(folder, files)
        # The card reads and checks the config: build it before any request, so a bad checkpoint sends nothing.
        card = build_model_card(folder, repo_id, files=files, **card_kwargs)
        api = HfApi(endpoint=endpoint, token=token, library_name="ms-llava", library_version=__version__)
        created_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if created_id != repo_id:  # "name" becomes "user/name": the card's snippets name the full id
            repo_id, card = created_id, build_model_card(folder, created_id, files=files, **card_kwargs)
        _write(folder / "README.md", str(card).encode())
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        if commit_message is None:
            resampler = _read_json(folder / "config.json").get("resampler_config") or {}
            commit_message = (
                f"Upload MS-LLaVA (M={resampler.get('num_queries', 144)}, windows {resampler.get('scope_windows')})"
            )
        # One commit: without hf_xet (or with HF_HUB_DISABLE_XET) upload_folder makes exactly one; with it, its
        # pipeline splits a folder only past 250 files or 100 MB of regular (non-LFS) files, far above a checkpoint.
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            allow_patterns=[*CHECKPOINT_FILES, "README.md"],
            delete_patterns=MANAGED_FILES,
            revision=revision,
            commit_message=commit_message,
        )
    logger.info("pushed %s to %s at %s", label, repo_id, commit.oid)
    return commit


def _stage(checkpoint, processor, folder: Path) -> str:
    """Fills the empty `folder` with the checkpoint to upload: links to the directory's files, or the model given saved
    there; a processor given replaces the directory's processor files. Returns the checkpoint's name for messages."""
    if not isinstance(checkpoint, (str, Path)):
        if processor is None:
            raise ValueError("pushing a model object needs its processor: push_to_hub(model, repo_id, processor=...)")
        checkpoint.save_pretrained(folder)
        processor.save_pretrained(folder)
        return f"the {type(checkpoint).__name__} given"
    directory = Path(checkpoint)
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory (expected a checkpoint written by save_pretrained)")
    names = sorted(path.relative_to(directory).as_posix() for path in directory.rglob("*") if path.is_file())
    if processor is not None:
        processor.save_pretrained(folder)  # first, into the empty folder: it never writes through a link
        names = _matching(names, MODEL_SIDE_FILES)
    for name in names:
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:  # a link, not a copy: weights are gigabytes
            target.symlink_to((directory / name).resolve())
        except OSError:  # no symlinks allowed (Windows without developer mode)
            shutil.copyfile(directory / name, target)
    return str(directory) if processor is None else f"{directory} with the processor given"


# --------------------------------------------------------------------------------------------- command line


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Registers `push` on an argparse subparsers object (`ms-llava push DIR REPO_ID ...`)."""
    push = subparsers.add_parser(
        "push", help="upload a checkpoint directory to the Hugging Face Hub with a generated model card"
    )
    add_arguments(push)
    push.set_defaults(handler=_push_command)
    return push


def add_arguments(push: argparse.ArgumentParser) -> None:
    """`ms-llava push DIR REPO_ID ...` (ms_llava_cli's convention)."""
    push.description = (
        "Upload an MS-LLaVA checkpoint (safetensors weights, processor, remote-code modules) and a generated "
        "model card to the Hugging Face Hub. The card marks the weights UNTRAINED unless --training is given."
    )
    push.add_argument("directory", help="a checkpoint directory written by save_pretrained (model + processor)")
    push.add_argument("repo_id", help="the Hub repository, org/name (created if needed)")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--revision", help="branch to commit to (created from main if needed)")
    push.add_argument("--base-model", action="append", help="Hub id of the model this one was built from (repeatable)")
    push.add_argument("--license", default="apache-2.0", help="the card's license (default: apache-2.0)")
    push.add_argument("--results", help="a JSON file {benchmark: score}: the card's evaluation table")
    push.add_argument(
        "--training", help="'paper' (trained with the paper's two stages) or a JSON file with your recipe"
    )
    push.add_argument("--commit-message")


def run(args: argparse.Namespace) -> int:
    """`ms-llava push`: every `.safetensors` file must read (a truncated one would be published broken)."""
    from .checkpoints import check_safetensors

    for path in sorted(Path(args.directory).glob("*.safetensors")):
        check_safetensors(path, args.directory)
    return _push_command(args)


def _load_json_argument(value: str, flag: str):
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"{flag}: no such file: {value}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{flag}: {value} is not valid JSON: {error}") from error


def _push_command(args: argparse.Namespace) -> int:
    """Handler of `ms-llava push`: 0 on success, 2 on a bad checkpoint or argument, 1 when the Hub refuses."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        results = _load_json_argument(args.results, "--results") if args.results else None
        training = None
        if args.training:
            training = "paper" if args.training == "paper" else _load_json_argument(args.training, "--training")
        base_model = args.base_model[0] if args.base_model and len(args.base_model) == 1 else args.base_model
        commit = push_to_hub(
            args.directory,
            args.repo_id,
            base_model=base_model,
            license=args.license,
            results=results,
            training=training,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
        )
    except ValueError as error:
        print(f"ms-llava push: error: {error}", file=sys.stderr)
        return 2
    except HfHubHTTPError as error:
        print(f"ms-llava push: the Hub refused: {error}", file=sys.stderr)
        return 1
    print(f"pushed {args.directory} to {commit.repo_url.repo_id} (commit {commit.oid}): {commit.commit_url}")
    if training is None:
        print("NOTE: no --training given: the model card marks these weights as UNTRAINED.")
    return 0
