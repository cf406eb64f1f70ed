"""`ms-llava push`: a checkpoint folder uploaded to the Hugging Face Hub in one commit (`upload_folder`: weights,
processor, remote-code modules, card), or with `dry_run=OUT` written into OUT without contacting anyone; and the model
card (`build_model_card`, `write_model_card`), built from what the folder holds, its training record and `ms-llava
eval`'s results record. Hand-given recipes and scores are marked as the uploader's statement; the paper's recipe or
benchmark appears only where a record matches it; no record and no statement mean UNTRAINED."""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shutil
import tempfile
from importlib import resources
from numbers import Real
from pathlib import Path
from urllib.parse import urlsplit

from .checkpoints import (
    CHECKPOINT_FILES,
    DOWNLOAD_PATTERNS,
    CheckpointError,
    check_checkpoint_folder,
    check_processor_agrees,
    load_config,
    read_json,
    tensor_headers,
)

logger = logging.getLogger(__name__)

MODEL_CARD_TEMPLATE = "ms_llava_model_card.md"
TRAINING_RECORD = "ms_llava_training.json"
RESULTS_FORMAT = "ms-llava-eval-results/1"
REMOTE_CODE_MODULES = sorted(path.name for path in Path(__file__).parent.glob("*_ms_llava.py"))
PROCESSOR = {"AutoProcessor": "processing_ms_llava.MSLlavaProcessor"}
MODEL = {
    "AutoConfig": "configuration_ms_llava.MSLlavaConfig",
    "AutoModel": "modeling_ms_llava.MSLlavaModel",
    "AutoModelForImageTextToText": "modeling_ms_llava.MSLlavaForConditionalGeneration",
}
AUTO_MAP = {"config.json": MODEL, "processor_config.json": PROCESSOR, "tokenizer_config.json": PROCESSOR}
IMAGE_PROCESSOR = {"AutoImageProcessor": "image_processing_ms_llava.MSLlavaImageProcessor", **PROCESSOR}
CARD_TAGS = ["ms-llava", "llava", "multimodal", "image-text-to-text", "ms-resampler"]
STATED = "as stated by the uploader, not from a record"


def model_card_template() -> str:
    """The card template (Jinja): `model_cards/` of the repository, installed as the package `ms_llava.model_cards`."""
    return resources.files("ms_llava.model_cards").joinpath(MODEL_CARD_TEMPLATE).read_text(encoding="utf-8")


def _table(columns: list[str], rows: list[list]) -> str:
    lines = ["|" + "|".join(f" {cell} " if str(cell) else " " for cell in cells) + "|" for cells in [columns, *rows]]
    return "\n".join([lines[0], "|" + "---|" * len(columns), *lines[1:]])


def _number(value) -> str:
    return f"{value:g}".replace("e-0", "e-") if isinstance(value, float) else str(value)  # 1e-05 -> 1e-5


def _human(count: int) -> str:
    scale = next(((unit, size) for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)) if count >= size), None)
    return f"{count / scale[1]:.2f}{scale[0]} ({count:,})" if scale else f"{count:,}"


def _finite(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def read_results(results, label: str = "--results") -> dict | None:
    """The evaluation for the card: `ms-llava eval`'s results record (a dict with `"format"`) or a hand-given
    `{name: score}` dict, as a dict, a JSON file or JSON text. Anything else is a `ValueError` naming it."""
    if isinstance(results, str) and results.lstrip().startswith("{"):
        try:
            results = json.loads(results)
        except ValueError as error:
            raise ValueError(f"{label}: not valid JSON text ({error}): {results:.100}") from error
    elif isinstance(results, (str, Path)):
        if not Path(results).is_file():
            raise ValueError(f"{label}: no such file: {results}")
        results = read_json(Path(results), f"{label} ")
    if results is None:
        return None
    if isinstance(results, dict) and "format" in results:
        rows = results.get("rows")
        if results["format"] != RESULTS_FORMAT or not isinstance(rows, list) or not rows:
            raise ValueError(f"{label}: expected a non-empty {RESULTS_FORMAT} record, got {results['format']!r}")
        for row in rows:
            missing = [key for key in ("task", "metric", "score", "source", "num_samples") if key not in row]
            if missing or not _finite(row["score"]):
                raise ValueError(f"{label}: the row {row!r} lacks {missing or 'a finite score'}")
        return results
    if not isinstance(results, dict) or not results:
        raise ValueError(f"{label}: results must be a non-empty dict {{benchmark: score}}, got {results!r}")
    for name, score in results.items():
        if not isinstance(name, str) or not name.strip() or not _finite(score):
            raise ValueError(f"{label}: the score of {name!r} must be a finite number, got {score!r}")
    return results


def read_training(training, label: str = "--training") -> str | dict | None:
    """The uploader's statement of the training: None, `"paper"` (the paper's two stages), or a dict (or its JSON
    file) `{"stages": [{column: value}, ...], other: value}`."""
    if isinstance(training, (str, Path)) and training != "paper":
        if not Path(training).is_file():
            raise ValueError(f"{label}: no such file: {training} (or give 'paper')")
        training = read_json(Path(training), f"{label} ")
    stages = training.get("stages", []) if isinstance(training, dict) else []
    if training not in (None, "paper") and (
        not training or not isinstance(stages, list) or not all(isinstance(stage, dict) for stage in stages)
    ):
        raise ValueError(f"{label}: training must be None (untrained), 'paper' or a dict with a 'stages' list")
    return training


def _paper_table() -> str:
    """The paper's recipe (Sec. 4.1) as a card table; the numbers are `recipes.PAPER_RECIPES`, what `train` runs."""
    from .recipes import PAPER_RECIPES

    stages = [
        ("1. projector pre-training", "MS-Resampler", "vision encoder, LLM", "LLaVA-1.5 558K image-caption pairs"),
        ("2. instruction tuning", "MS-Resampler + LLM", "vision encoder", "LLaVA-1.5 665K instruction data"),
    ]
    rows = [
        [*stage, _number(recipe.learning_rate), recipe.global_batch_size, _number(recipe.num_train_epochs)]
        for stage, recipe in zip(stages, PAPER_RECIPES.values(), strict=True)
    ]
    return _table(["stage", "trained", "frozen", "data", "learning rate", "batch size", "epochs"], rows)


def _stated_table(stages: list[dict]) -> str:
    columns = list(dict.fromkeys(key for stage in stages for key in stage))
    return _table(columns, [[stage.get(column, "") for column in columns] for stage in stages])


def _paper_matches(record: dict, label: str) -> list[int]:
    """The numbers of a training record's stages that ran the paper's hyper-parameters (Sec. 4.1: learning rate,
    global batch, epochs) for their stage."""
    from .recipes import PAPER_RECIPES

    if not isinstance(record.get("stages"), list):
        raise CheckpointError(f"{label}: not a training record of this version (no 'stages' list)")
    names = ("learning_rate", "global_batch_size", "num_train_epochs")
    return [
        number
        for number, stage in enumerate(record["stages"], start=1)
        if (paper := PAPER_RECIPES.get(stage.get("stage"))) and all(stage.get(n) == getattr(paper, n) for n in names)
    ]


def _training_section(statement, recorded: bool) -> str:
    if statement == "paper":
        return f"Trained with the paper's recipe (Sec. 4.1, LLaVA-1.5 data), {STATED}:\n\n{_paper_table()}\n\n- AdamW"
    if statement:
        notes = "".join(f"\n- {key}: {value}" for key, value in statement.items() if key != "stages")
        return f"Training {STATED}:\n\n{_stated_table(statement.get('stages', []))}\n{notes}"
    paper = f"No training record was given. The paper's recipe (Sec. 4.1, LLaVA-1.5 data):\n\n{_paper_table()}"
    return "" if recorded else paper


def _evaluation_section(results: dict | None) -> str:
    if not results:
        return "No evaluation results were given for this checkpoint."
    if "format" not in results:
        return f"Scores {STATED}:\n\n" + _table(["benchmark", "score"], [[k, _number(v)] for k, v in results.items()])
    rows = []
    for row in results["rows"]:
        source, limit = row["source"] or {}, row.get("limit")
        local = "local" in source
        why = f"--limit {limit}" if limit else "local data" if local else "not its official form"
        revision = source.get("revision") or "unpinned"
        where = f"`{source['local']}` (a local copy)" if local else f"`{source.get('dataset')}` @ {revision}"
        unreadable = f" ({row['unreadable_samples']} unreadable)" if row.get("unreadable_samples") else ""
        benchmark = row.get("benchmark") or f"not the paper's benchmark ({why})"
        samples = f"{row['num_samples']}{unreadable}"
        rows.append([row["task"], row["metric"], _number(row["score"]), benchmark, where, samples, limit or "none"])
    columns = ["task", "metric", "score", "paper's Table 1 column", "data", "samples scored", "--limit"]
    head = f"lmms-eval {results.get('lmms_eval_version')}, {results.get('date')}; model `{results.get('model')}`"
    return f"From `ms-llava eval` ({head}):\n\n{_table(columns, rows)}"


def build_model_card(
    folder: str | Path,
    repo_id: str | None = None,
    *,
    base_model: str | list[str] | None = None,
    license: str = "apache-2.0",  # noqa: A002 - the Hub's field name
    results=None,
    training=None,
):
    """The model card (`huggingface_hub.ModelCard`) of the checkpoint or PEFT adapter in `folder`, as it reads on the
    Hub under `repo_id` (default: the folder's name). `results`: `ms-llava eval`'s results record or a `{name: score}`
    dict (or its JSON file); `training`: the uploader's statement (`"paper"` or a dict), shown besides the folder's
    own training record. `base_model` (the card's Hub ids) defaults to an adapter's base when that is a Hub id."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    results, training = read_results(results), read_training(training)
    record = read_json(folder / TRAINING_RECORD) if (folder / TRAINING_RECORD).is_file() else None
    adapter = read_json(folder / "adapter_config.json") if (folder / "adapter_config.json").is_file() else None
    config_folder = folder
    if adapter:
        base = Path(base_name := adapter.get("base_model_name_or_path") or "").expanduser()
        local = base.is_absolute() or base.exists()  # a local path is never the card's base_model
        base_model = base_model or (None if local or not base_name else base_name)
        config_folder = base if local and (base / "config.json").is_file() else None
    counts = [  # the parameters, from the safetensors headers (no tensor read)
        (math.prod(shape), "multi_modal_projector" in key)
        for path in sorted(folder.glob("*.safetensors"))
        for key, (_, shape) in tensor_headers(path, str(folder)).items()
    ]
    total, projector = sum(n for n, _ in counts), sum(n for n, in_projector in counts if in_projector)
    names = ("r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save")
    settings = ", ".join(f"{name} {adapter[name]}" for name in names if (adapter or {}).get(name) is not None)
    fields = {"adapter_settings": settings, "parameters": _human(total), "projector_parameters": _human(projector)}
    fields["settings_of"] = None if config_folder in (None, folder) else config_folder.name
    fields["config"] = config = None if config_folder is None else load_config(config_folder)
    if config is not None:  # the MS-Resampler, the tower and the LLM
        (grid_h, grid_w), rows_cols = config.vision_grid_size, config.resampler_config.query_grid_shape
        fields.update(grid=f"{grid_h} x {grid_w}", query_grid="{} x {}".format(*rows_cols))
        fields["num_visual_tokens"] = grid_h * grid_w + (config.vision_feature_select_strategy == "full")
    card_data = ModelCardData(
        library_name="peft" if adapter else "transformers",
        pipeline_tag="image-text-to-text",
        base_model=base_model,
        license=license,
        tags=CARD_TAGS + (["lora"] if adapter else []),
    )
    card = ModelCard.from_template(
        card_data,
        template_str=model_card_template(),
        repo_id=repo_id or folder.name,
        untrained=record is None and training is None,
        base_model=", ".join([base_model] if isinstance(base_model, str) else base_model or []),
        adapter=adapter and adapter.get("peft_type", "PEFT"),
        evaluation=_evaluation_section(results),
        record=record,
        paper_matches=_paper_matches(record, str(folder / TRAINING_RECORD)) if record else [],
        training=_training_section(training, record is not None),
        **fields,
    )
    return ModelCard(re.sub(r"\n{3,}", "\n\n", card.content))  # the template's optional parts leave blank runs


def write_model_card(folder: str | Path, repo_id: str | None = None, **card) -> Path:
    """Writes `folder/README.md`, the card `build_model_card(folder, repo_id, **card)` renders (for a PEFT adapter
    folder too: `ms-llava train` calls this for LoRA outputs). Returns its path."""
    path = Path(folder) / "README.md"
    path.write_text(str(build_model_card(folder, repo_id, **card)), encoding="utf-8")
    return path


def push_to_hub(
    checkpoint,
    repo_id: str,
    *,
    processor=None,
    base_model: str | list[str] | None = None,
    license: str = "apache-2.0",  # noqa: A002 - the Hub's field name
    results=None,
    training=None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    dry_run: str | Path | None = None,
):
    """Uploads an MS-LLaVA checkpoint to `repo_id` (`"org/name"`, created if needed, `private` then) in one commit on
    `revision` (a branch, created from `main` when missing) and returns its `huggingface_hub.CommitInfo`; with
    `dry_run`, writes what would be uploaded into that folder instead, contacting nobody, and returns the folder.
    `checkpoint`: a folder written by `save_pretrained`, or a model (then `processor` too; a `processor` given replaces
    the folder's processor files). `base_model`, `license`, `results`, `training`: the card's (`build_model_card`);
    `commit_message`, `token`, `endpoint`: `huggingface_hub.HfApi`'s. Everything is checked before the first request:
    a bad argument or an incomplete checkpoint raises `ValueError` and sends nothing. A failing Hub (unreachable,
    refused, timed out, an HTTP error) raises `ConnectionError` at its first request, naming the host and `--dry-run`."""
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)
    card = {"base_model": base_model, "license": license, "results": read_results(results)}
    card["training"] = read_training(training)
    with tempfile.TemporaryDirectory(prefix="ms-llava-push-") as scratch:
        folder = Path(scratch)
        label = _stage(checkpoint, processor, folder)
        # the user's folder is checked, so that messages name its files; a model or processor given is complete
        check_checkpoint_folder(
            checkpoint if isinstance(checkpoint, (str, Path)) else folder, processor=processor is None
        )
        if (model_type := read_json(folder / "config.json").get("model_type")) != "ms_llava":
            raise CheckpointError(f"{label}: config.json has model_type {model_type!r}, not 'ms_llava'; convert it")
        if processor is not None:
            check_processor_agrees(folder, label)
        files = _add_remote_code(folder)
        write_model_card(folder, repo_id, **card)
        if dry_run is None:
            return _upload(folder, files, repo_id, card, private, revision, commit_message, token, endpoint, label)
        from .outputs import check_writable, writing

        if (out := check_writable(dry_run)).exists() and (not out.is_dir() or any(out.iterdir())):
            raise ValueError(f"--dry-run {out}: not a new or empty folder; it gets exactly what would be uploaded")
        with writing(out):
            for name in [*files, "README.md"]:
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(folder / name, out / name)
        return out


def _upload(folder, files, repo_id, card, private, revision, commit_message, token, endpoint, label):
    from huggingface_hub import HfApi, constants

    from . import __version__

    api = HfApi(endpoint=endpoint, token=token, library_name="ms-llava", library_version=__version__)
    try:
        created = api.create_repo(repo_id, private=private, exist_ok=True).repo_id  # the first request
        if created != repo_id:  # "name" became "user/name": the card's snippets name the full id
            write_model_card(folder, created, **card)
        if revision is not None:
            api.create_branch(created, branch=revision, exist_ok=True)
        resampler = read_json(folder / "config.json").get("resampler_config") or {}
        message = f"Upload MS-LLaVA (M={resampler.get('num_queries', 144)}, windows {resampler.get('scope_windows')})"
        commit = api.upload_folder(
            repo_id=created,
            folder_path=folder,
            allow_patterns=[*files, "README.md"],
            revision=revision,
            delete_patterns=[*CHECKPOINT_FILES, "README.md"],
            commit_message=commit_message or message,
        )
    except Exception as error:
        if (failure := _network_error(error, urlsplit(endpoint or constants.ENDPOINT).netloc)) is error:
            raise
        raise failure from error
    logger.info("pushed %s to %s at %s", label, created, commit.oid)
    return commit


def _network_error(error: Exception, host: str) -> Exception:
    """A failure of the Hub as one `ConnectionError` naming the host and what to do instead; anything else as is."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    client_error = HfHubHTTPError.__mro__[1]  # the HTTP client's base error (httpx's; httpx2's in huggingface_hub 2)
    if isinstance(error, OfflineModeIsEnabled):
        cause = "HF_HUB_OFFLINE is set, and pushing needs the Hub"
    elif isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else "?"
        cause = f"the Hub at {host} answered HTTP {status}: {str(error).splitlines()[0]}"
    elif isinstance(error, (client_error, OSError)):
        cause = f"cannot reach the Hub at {host} ({type(error).__name__}: {error})"
    else:
        return error
    return ConnectionError(
        f"{cause}; nothing was committed. To prepare the upload without the Hub, run with --dry-run OUT (it writes "
        "what would be uploaded, card included, into OUT); set HF_HUB_OFFLINE=1 to keep other commands off the network"
    )


def _stage(checkpoint, processor, folder: Path) -> str:
    """Fills the empty `folder` with what to upload: links to the checkpoint folder's files (weights are gigabytes),
    or the model given, saved; a processor given is saved first and replaces the folder's processor files. Returns
    the checkpoint's name for messages."""
    if not isinstance(checkpoint, (str, Path)):
        if processor is None:
            raise ValueError("pushing a model object needs its processor: push_to_hub(model, repo_id, processor=...)")
        checkpoint.save_pretrained(folder)
        processor.save_pretrained(folder)
        return f"the {type(checkpoint).__name__} given"
    if not Path(checkpoint).is_dir():
        raise ValueError(f"{checkpoint} is not a directory (expected a checkpoint written by save_pretrained)")
    if processor is not None:
        processor.save_pretrained(folder)
    for path in sorted(Path(checkpoint).rglob("*")):
        if path.is_file() and not (target := folder / path.relative_to(checkpoint)).exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path.resolve())
    return str(checkpoint) + (" with the processor given" if processor is not None else "")


def _add_remote_code(folder: Path) -> list[str]:
    """Makes the staged `folder` carry the remote-code modules and `auto_map`, without which the repo does not load
    with `trust_remote_code=True` (save_pretrained writes both whenever `ms_llava` is imported; a folder saved
    otherwise gets them here). Returns the files to upload, relative to `folder`."""
    from huggingface_hub.utils import filter_repo_objects

    for module in REMOTE_CODE_MODULES:
        if not (folder / module).is_file():
            shutil.copyfile(Path(__file__).parent / module, folder / module)
    for name, auto_map in AUTO_MAP.items():
        content = read_json(folder / name)
        updated = {**content, "auto_map": {**auto_map, **content.get("auto_map", {})}}
        if name == "processor_config.json" and isinstance(image := content.get("image_processor"), dict):
            updated["image_processor"] = {**image, "auto_map": {**IMAGE_PROCESSOR, **image.get("auto_map", {})}}
        if updated != content:
            (folder / name).unlink()  # a link to the user's file: never write through it
            (folder / name).write_text(json.dumps(updated, indent=2) + "\n", encoding="utf-8")
    names = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    # a checkpoint's files are top-level, but for extra chat templates: a training run's checkpoint-N/ stays local
    files = [name for name in filter_repo_objects(names, allow_patterns=DOWNLOAD_PATTERNS) if "/" not in name]
    files += [name for name in names if name.startswith("additional_chat_templates/") and name.endswith(".jinja")]
    if skipped := sorted(set(names) - set(files) - {"README.md", TRAINING_RECORD}):  # the record stays local
        logger.warning("not uploading %d file(s) that are not part of a checkpoint: %s", len(skipped), skipped)
    return files


def run(args: argparse.Namespace) -> int:
    base_model = args.base_model[0] if args.base_model and len(args.base_model) == 1 else args.base_model
    names = ("license", "results", "training", "private", "revision", "commit_message", "dry_run")
    options = {name: getattr(args, name) for name in names}
    pushed = push_to_hub(args.directory, args.repo_id, base_model=base_model, **options)
    if args.dry_run:
        print(f"dry run: wrote what would be uploaded to {args.repo_id} into {pushed} (card: {pushed / 'README.md'})")
    else:
        print(f"pushed {args.directory} to {pushed.repo_url.repo_id} (commit {pushed.oid}): {pushed.commit_url}")
    if not args.training and not (Path(args.directory) / TRAINING_RECORD).is_file():
        print(f"NOTE: no {TRAINING_RECORD} and no --training: the model card marks these weights as UNTRAINED.")
    return 0
