"""`train()` and `ms-llava train`: one stage of the paper's two-stage recipe (Sec. 4.1) on transformers' `Trainer`.

    from ms_llava.training import train

    stage1 = train("ms-llava-init", "pretrain", "blip_laion_cc_sbu_558k.json", image_folder="images", output_dir="s1")
    stage2 = train("s1", "finetune", "llava_v1_5_mix665k.json", image_folder="data", output_dir="s2")

Options: `ms_llava.training.arguments`; what trains (stage, LoRA, QLoRA, ScAle): `ms_llava.training.adapters`; data
and the pre-pass that names bad records: `ms_llava.training.data`. `train()` checks the records before the model
loads, resumes from the last complete checkpoint (refusing settings that would change the loss curve) and logs the
per-step loss to `OUTPUT_DIR/loss_log.csv`. docs/training.md documents every default and choice.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoProcessor, Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..recipes import PAPER_RECIPES, PROJECTOR
from .adapters import configure_trainable, load_model, merge_lora_adapter, require_qlora_support
from .arguments import TrainingConfig, launched_world_size, train_argument_parser
from .data import (
    BadRecordsError,
    DataCheck,
    RightPaddingCollator,
    SupervisedDataset,
    check_records,
    load_training_records,
    pad_token_id,
)
from .feature_cache import FeatureCache, vision_features_input

logger = logging.getLogger(__name__)

LOSS_LOG = "loss_log.csv"
RUN_RECORD = "ms_llava_training.json"
SKIPPED_RECORDS = "skipped_records.jsonl"
# The final save is written here (inside OUTPUT_DIR), then its files are moved into OUTPUT_DIR (`save_final_model`).
FINAL_SAVE_STAGING = ".ms_llava_final_save"
STAGED_COMPLETE = ".complete"  # written into the staging folder once every file of the save is in it


@dataclass
class TrainResult:
    """What `train` did. `losses` holds `(step, loss)` for every logged step of the run, including the steps before
    a resume; `train_loss` is the mean loss of the steps this call ran."""

    output_dir: Path
    stage: str
    global_step: int
    losses: list[tuple[int, float]]
    train_loss: float
    wall_time_s: float
    num_examples: int
    skipped: list  # RecordProblem of every skipped record
    resumed_from: Path | None
    adapter: bool  # True: output_dir holds an adapter (LoRA or ScAle, + processor), not a full model
    merged_dir: Path | None
    adapter_type: str | None = None  # "lora", "scale" or None


# --------------------------------------------------------------------------------------------- trainer pieces


class MSLlavaTrainer(Trainer):
    """transformers' `Trainer` with an optional learning rate for the projector."""

    def __init__(self, *args, projector_learning_rate: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.projector_learning_rate = projector_learning_rate

    def create_optimizer(self, model=None):
        """AdamW as `Trainer` builds it, with the projector's parameters in their own groups when
        `projector_learning_rate` is set (LLaVA's `mm_projector_lr`)."""
        if self.projector_learning_rate is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[bool, bool], list] = {}
        for name, param in opt_model.named_parameters():
            if param.requires_grad:
                groups.setdefault((PROJECTOR in name, name in decay), []).append(param)
        param_groups = [
            {
                "params": params,
                "weight_decay": self.args.weight_decay if decays else 0.0,
                **({"lr": self.projector_learning_rate} if is_projector else {}),
            }
            for (is_projector, decays), params in groups.items()
        ]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer


def checkpoint_directories(output_dir: str | Path) -> list[Path]:
    """Every `checkpoint-N` directory of `output_dir`, by N."""
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    found = []
    if Path(output_dir).is_dir():
        for path in Path(output_dir).iterdir():
            match = pattern.match(path.name)
            if match and path.is_dir():
                found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """`checkpoint-N` directories of `output_dir` holding a trainer state, by N.

    transformers 5.23's `Trainer` writes `checkpoint-N` in place (weights, optimizer, scheduler, RNG state, then
    `trainer_state.json`, last) and its own `resume_from_checkpoint=True` takes the highest-numbered directory, complete
    or not. Resuming from one a crash left half-written would load weights without their optimizer state, or fail; so
    `--resume` takes the last directory holding the file `Trainer` writes last.
    """
    return [path for path in checkpoint_directories(output_dir) if (path / TRAINER_STATE_NAME).is_file()]


class LossLogCallback(TrainerCallback):
    """Appends every logged training loss to `OUTPUT_DIR/loss_log.csv` (main process). At the end of the run's first
    step (before its loss is logged) the file is rewritten from the trainer state, so after a resume it holds the steps
    up to the checkpoint, then the new ones; a run that fails before its first step leaves the file as it was."""

    FIELDS = ("step", "epoch", "loss", "learning_rate", "grad_norm")

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.started = False

    def on_step_end(self, args, state, control, **kwargs):
        if self.started:
            return
        self.started = True
        if state.is_world_process_zero:
            with open(self.path, "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, self.FIELDS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(entry for entry in state.log_history if "loss" in entry)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.started and state.is_world_process_zero and logs and "loss" in logs:
            with open(self.path, "a", newline="", encoding="utf-8") as handle:
                row = {**logs, "step": state.global_step}
                csv.DictWriter(handle, self.FIELDS, extrasaction="ignore").writerow(row)


class RunStartCallback(TrainerCallback):
    """Calls `start()` once, at the end of the run's first optimizer step: after the step, before `Trainer` can save
    a checkpoint or log its loss. `train` writes the run record and the skipped-records list there, so that a run that
    fails before its first step (a record that fails to load in the first batch, an option the model refuses, Ctrl-C)
    leaves the output folder as it found it."""

    def __init__(self, start=None):
        self.start = start  # set once the data are checked
        self.started = False

    def on_step_end(self, args, state, control, **kwargs):
        self.fire()

    def fire(self) -> None:
        if not self.started:
            self.started = True
            self.start()


# --------------------------------------------------------------------------------------------- final save


@contextlib.contextmanager
def signals_deferred(signals=(signal.SIGINT, signal.SIGTERM)):
    """Ctrl-C (SIGINT) and SIGTERM received inside the block take effect when it ends (the default handlers then act
    as usual: KeyboardInterrupt, termination). Outside the main thread, where Python cannot set handlers, a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {number: signal.signal(number, lambda number, frame: received.append(number)) for number in signals}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(received):
            signal.raise_signal(number)


def _fsync(path: Path) -> None:
    """Flushes a file (or a folder's entries) to disk, so that a rename after it never exposes unwritten data."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # a folder cannot be opened on some systems (Windows)
        return
    try:
        os.fsync(descriptor)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(descriptor)


def commit_staged_save(output_dir: str | Path) -> list[str]:
    """Moves the files of a complete staged save (`OUTPUT_DIR/.ms_llava_final_save`, marked complete) into
    `output_dir`, each with one `os.replace` (atomic: a reader sees the old file or the new one, never part of
    one), with Ctrl-C and SIGTERM held until the last one is in; then removes the staging folder. Returns the names
    moved. Also completes a commit that a kill (SIGKILL, power loss) cut short (`recover_final_save`, which `train`
    runs at the end of its first step)."""
    output_dir = Path(output_dir)
    staging = output_dir / FINAL_SAVE_STAGING
    moved = []
    with signals_deferred():
        for entry in sorted(staging.iterdir()):
            if entry.name == STAGED_COMPLETE:
                continue
            target = output_dir / entry.name
            if entry.is_dir() and target.is_dir():
                shutil.rmtree(target)  # os.replace does not replace a non-empty folder
            os.replace(entry, target)
            moved.append(entry.name)
        _fsync(output_dir)
        shutil.rmtree(staging)
    return moved


def recover_final_save(output_dir: str | Path) -> None:
    """What an interrupted final save left in `output_dir`: a complete staged save (killed while its files were moved
    in) is moved in; an incomplete one (killed while it was written) is removed, `output_dir` keeping the old state."""
    staging = Path(output_dir) / FINAL_SAVE_STAGING
    if not staging.is_dir():
        return
    if (staging / STAGED_COMPLETE).is_file():
        logger.warning("completing the final save that an interrupted run left in %s", staging)
        commit_staged_save(output_dir)
    else:
        logger.warning("removing %s: an incomplete final save left by an interrupted run", staging)
        shutil.rmtree(staging)


def save_final_model(trainer: Trainer, output_dir: str | Path, state) -> list[str]:
    """`trainer.save_model` and the trainer state, saved atomically into `output_dir`: written into the staging
    folder `OUTPUT_DIR/.ms_llava_final_save` (every process takes part, the main process writes), flushed to disk,
    marked complete, then moved in by `commit_staged_save`. An interrupt while the files are written leaves
    `output_dir` as it was (the staging folder is removed; after a kill the next run removes it); Ctrl-C while they
    are moved in waits until the move is done. Without this, Ctrl-C during `save_pretrained` left a 0-byte
    `config.json` that later loads failed on."""
    output_dir = Path(output_dir)
    staging = output_dir / FINAL_SAVE_STAGING
    if state.is_main_process and staging.exists():
        shutil.rmtree(staging)
    state.wait_for_everyone()
    try:
        trainer.save_model(str(staging))  # model or adapter, with the processor
        if state.is_main_process:
            trainer.state.save_to_json(str(staging / TRAINER_STATE_NAME))  # the whole log history
            for path in staging.rglob("*"):
                if path.is_file():
                    _fsync(path)
    except BaseException:
        if state.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    moved = []
    if state.is_main_process:
        with signals_deferred():
            (staging / STAGED_COMPLETE).touch()
            _fsync(staging)
            moved = commit_staged_save(output_dir)
    state.wait_for_everyone()
    return moved


# --------------------------------------------------------------------------------------------- train


def require_training_extra(lora: bool = False):
    """Raises an ImportError naming the install command when a package of the `train` extra is missing."""
    needed = ["accelerate"] + (["peft"] if lora else [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"ms-llava train needs {', '.join(missing)}: install the training extra, pip install -e '.[train]' "
            "(accelerate, peft, datasets)"
        )


def train(
    model_name_or_path: str | Path,
    stage: str,
    data_path,
    image_folder: str | Path | None = None,
    output_dir: str | Path = "ms-llava-output",
    *,
    callbacks: list[TrainerCallback] | None = None,
    feature_cache: FeatureCache | None = None,
    **overrides,
) -> TrainResult:
    """Runs one stage of the recipe and saves the result in `output_dir` (HF layout: model or LoRA adapter, with the
    processor).

    Args:
        model_name_or_path: an MS-LLaVA checkpoint (a directory written by `save_pretrained`, or a Hub id).
        stage: `"pretrain"` or `"finetune"` (`PAPER_RECIPES`).
        data_path: LLaVA JSON, a `messages` + `images` data set or file (see `ms_llava.training.data.load_training_records`).
        image_folder: the folder image paths are relative to (default: the data file's folder).
        output_dir: where checkpoints, logs and the final model go.
        callbacks: extra `TrainerCallback`s.
        feature_cache: with `cache_vision_features=True`, a cache from `feature_cache.build_cache` to use (shared
            between runs) rather than one built for this run.
        **overrides: any option of `MSLlavaTrainingArguments` (`learning_rate=...`, `lora=True`, `resume=True`,
            `optim=...`); options left out take the stage recipe's value.

    Raises:
        ValueError: a bad setting, a global batch that the per-device batch and processes do not divide, an output
            directory holding checkpoints without `resume=True`, or bad records (`BadRecordsError`) without
            `skip_bad_records=True`.
    """
    output_dir = Path(output_dir)
    created = _first_missing(output_dir)  # what this call creates, and removes again when it fails before starting
    adapted = overrides.get("lora") or overrides.get("qlora") or overrides.get("adapter") is not None
    require_training_extra(lora=adapted)
    config = TrainingConfig.for_stage(stage, output_dir=str(output_dir), **overrides)
    from accelerate import PartialState

    if config.qlora:
        require_qlora_support()
    world_size = launched_world_size()
    model_name_or_path = (
        str(Path(model_name_or_path).resolve()) if Path(model_name_or_path).is_dir() else str(model_name_or_path)
    )
    state = PartialState()  # set up by TrainingArguments (gloo on CPU, NCCL on GPUs)
    resume_from = _checkpoint_to_resume(output_dir, config, state)
    if state.num_processes != world_size:
        raise ValueError(
            f"the launcher started {world_size} processes but the process group has {state.num_processes}"
        )
    run_start = RunStartCallback()
    try:
        return _train(
            model_name_or_path, data_path, image_folder, output_dir, config, state, resume_from, run_start,
            callbacks, feature_cache,
        )  # fmt: skip
    except BaseException:
        if not run_start.started and created is not None and state.is_main_process and created.exists():
            logger.warning("removing %s: this run created it and failed before its first step", created)
            shutil.rmtree(created, ignore_errors=True)
        raise


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` (itself included) that does not exist yet; None when `path` exists."""
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def _train(
    model_name_or_path, data_path, image_folder, output_dir, config, state, resume_from, run_start, callbacks,
    feature_cache,
) -> TrainResult:  # fmt: skip
    """`train` from loading the data on; `run_start` fires at the end of the first step."""
    world_size = state.num_processes
    processor = AutoProcessor.from_pretrained(model_name_or_path)
    records = load_training_records(data_path, image_folder)
    data_check = _pre_pass(records, processor, config, state)
    if data_check.problems and not config.skip_bad_records:
        raise BadRecordsError(data_check.problems, data_check.num_records)
    if not data_check.kept:
        raise ValueError(f"{records.description}: no record left to train on ({data_check.summary()})")
    _check_run_record(output_dir, config, data_check, resume_from, state)
    run_start.start = lambda: _record_run_start(output_dir, config, data_check, state)
    if data_check.problems and state.is_main_process:
        logger.warning(
            "skipping %d bad record(s) (%s); they are listed in %s once training starts",
            len(data_check.problems),
            ", ".join(str(problem) for problem in data_check.problems[:3])
            + (" ..." if len(data_check.problems) > 3 else ""),
            output_dir / SKIPPED_RECORDS,
        )
    _log_main(state, "data: %s: %s", records.description, data_check.summary())
    # A batch of text-only records leaves the projector unused: DDP must then look for unused parameters.
    config.ddp_find_unused_parameters = data_check.num_text_only > 0

    model = configure_trainable(load_model(model_name_or_path, config), config)
    trainable = sum(param.numel() for param in model.parameters() if param.requires_grad)
    _log_main(
        state,
        "stage %s: %s trainable parameters; global batch %d = %d per device x %d accumulation x %d process(es); "
        "lr %g%s",
        config.stage,
        f"{trainable:,}",
        config.global_batch_size,
        config.per_device_train_batch_size,
        config.gradient_accumulation_steps,
        world_size,
        config.learning_rate,
        f" (projector {config.projector_learning_rate:g})" if config.projector_learning_rate else "",
    )
    if feature_cache is not None and not config.cache_vision_features:
        raise ValueError("feature_cache is used with cache_vision_features=True only")
    if config.cache_vision_features:
        feature_cache = _build_feature_cache(model, processor, records, data_check.kept, state, feature_cache)
    trainer = MSLlavaTrainer(
        model=model,
        args=config,
        train_dataset=SupervisedDataset(records, data_check.kept, processor, config.max_length, feature_cache),
        data_collator=RightPaddingCollator(pad_token_id(processor.tokenizer)),
        processing_class=processor,
        callbacks=[run_start, LossLogCallback(output_dir / LOSS_LOG), *(callbacks or [])],
        projector_learning_rate=config.projector_learning_rate,
    )
    started = time.perf_counter()
    with vision_features_input(model) if feature_cache else contextlib.nullcontext():
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    run_start.fire()  # a resumed run whose checkpoint is at the last step runs no step
    save_final_model(trainer, output_dir, state)  # model or adapter, processor, trainer_state.json: atomically
    wall_time = time.perf_counter() - started

    merged_dir = None
    if state.is_main_process and config.lora and (config.merge_lora or config.hub_model_id):
        merged_dir = output_dir / "merged"
        merge_lora_adapter(output_dir, merged_dir)
    if state.is_main_process and config.hub_model_id:
        _push(merged_dir or output_dir, config, model_name_or_path, data_path, trainer.state.global_step)
    state.wait_for_everyone()
    losses = [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    _log_main(state, "done: %d steps in %.1f s; final model in %s", trainer.state.global_step, wall_time, output_dir)
    return TrainResult(
        output_dir=output_dir,
        stage=config.stage,
        global_step=trainer.state.global_step,
        losses=losses,
        train_loss=output.training_loss,
        wall_time_s=wall_time,
        num_examples=len(data_check.kept),
        skipped=list(data_check.problems),
        resumed_from=resume_from,
        adapter=config.adapter is not None,
        merged_dir=merged_dir,
        adapter_type=config.adapter,
    )


def _build_feature_cache(model, processor, records, kept: list[int], state, reuse: FeatureCache | None):
    """The frozen tower's features of every distinct image of the kept records (`ms_llava.training.feature_cache`),
    `reuse` when given."""
    from .feature_cache import build_cache, check_cacheable

    check_cacheable(model)
    images = [image for index in kept for image in records[index].images]
    if not images:
        _log_main(state, "vision feature cache: the kept records hold no image, nothing to cache")
        return None
    started = time.perf_counter()
    cache = build_cache(
        model, processor, images, log=lambda message, *args: _log_main(state, message, *args), reuse=reuse
    )
    _log_main(state, "vision feature cache ready in %.1f s", time.perf_counter() - started)
    return cache


def _log_main(state, message: str, *args) -> None:
    if state.is_main_process:
        logger.info(message, *args)


def _checkpoint_to_resume(output_dir: Path, config: TrainingConfig, state) -> Path | None:
    """The checkpoint `--resume` continues from (logged with its step), or None (logged with the reason)."""
    checkpoints = complete_checkpoints(output_dir)
    if config.resume:
        incomplete = [path.name for path in checkpoint_directories(output_dir) if path not in checkpoints]
        if not checkpoints:
            if not output_dir.is_dir():
                why = f"{output_dir} does not exist"
            elif incomplete:
                why = f"{output_dir} holds only incomplete checkpoints ({', '.join(incomplete)}: no {TRAINER_STATE_NAME})"
            else:
                why = f"{output_dir} holds no checkpoint-N folder"
            if state.is_main_process:
                logger.warning("resume: starting from the beginning (step 0): %s", why)
            return None
        newer = [
            name for name in incomplete if int(name.rsplit("-", 1)[1]) > int(checkpoints[-1].name.rsplit("-", 1)[1])
        ]
        _log_main(
            state,
            "resume: continuing from %s at step %s%s",
            checkpoints[-1],
            _checkpoint_step(checkpoints[-1]),
            f" (skipping the incomplete {', '.join(newer)})" if newer else "",
        )
        return checkpoints[-1]
    if checkpoints:
        raise ValueError(
            f"{output_dir} already holds checkpoints ({', '.join(path.name for path in checkpoints)}): pass --resume "
            f"(resume=True) to continue from {checkpoints[-1].name}, or choose another output directory"
        )
    return None


def _checkpoint_step(checkpoint: Path) -> str:
    """The global step a checkpoint's trainer state records ("?" when the file cannot be read)."""
    try:
        return str(json.loads((checkpoint / TRAINER_STATE_NAME).read_text(encoding="utf-8"))["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return "?"


@dataclass(frozen=True)
class _PrePassFailure:
    """What the other processes receive when the main process's pre-pass raised."""

    error_type: str
    message: str
    value_error: bool


def _pre_pass(records, processor, config: TrainingConfig, state) -> DataCheck:
    """`check_records` on the main process only, its result (or its error) broadcast to the others, which raise the
    same message when it failed (rather than waiting forever for a result)."""
    if state.num_processes == 1:
        return _check_records_logged(records, processor, config, state)
    from accelerate.utils import broadcast_object_list

    payload, error = [None], None
    if state.is_main_process:
        try:
            payload = [_check_records_logged(records, processor, config, state)]
        except Exception as caught:
            error = caught
            payload = [_PrePassFailure(type(caught).__name__, str(caught), isinstance(caught, ValueError))]
    broadcast_object_list(payload, from_process=0)
    if error is not None:
        raise error
    result = payload[0]
    if isinstance(result, _PrePassFailure):
        message = f"the pre-pass on the main process failed: {result.error_type}: {result.message}"
        raise ValueError(message) if result.value_error else RuntimeError(message)
    return result


def _check_records_logged(records, processor, config: TrainingConfig, state) -> DataCheck:
    logger.info(
        "pre-pass (process %d): checking %d records of %s", state.process_index, len(records), records.description
    )
    return check_records(records, processor, config.max_length, config.verify_images)


def _run_record(config, data_check: DataCheck) -> dict:
    return {
        **config.curve_settings(),
        "num_examples": len(data_check.kept),
        "data_fingerprint": data_check.fingerprint,
    }


def _check_run_record(output_dir: Path, config, data_check: DataCheck, resume_from: Path | None, state) -> None:
    """Checks that a resumed run keeps the settings that shape the loss curve and the same data (every process raises
    alike). Reads only: `_record_run_start` writes, once the run has started."""
    record = _run_record(config, data_check)
    record_path = output_dir / RUN_RECORD
    if resume_from is not None and record_path.is_file():
        previous = json.loads(record_path.read_text(encoding="utf-8"))
        unrecorded = sorted(key for key in record if key not in previous)
        if unrecorded and state.is_main_process:  # a run record written by an earlier version of this code
            logger.warning("resume: %s records no %s; not compared", record_path, ", ".join(unrecorded))
        changed = [
            f"{key} {previous[key]!r} -> {value!r}"
            + (" (the training data differ)" if key == "data_fingerprint" else "")
            for key, value in record.items()
            if key in previous and previous[key] != value
        ]
        if changed:
            raise ValueError(
                f"resuming {resume_from} with settings that change the loss curve: {'; '.join(changed)}; keep them, "
                "or start a new output directory"
            )


def _record_run_start(output_dir: Path, config, data_check: DataCheck, state) -> None:
    """At the end of the first step (main process): removes what an interrupted save left, records the run's settings
    and lists the skipped records (or removes the list an earlier run left when there are none)."""
    if not state.is_main_process:
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    # A save that writes into a directory an interrupted save left would mix its files with the stale ones (an
    # adapter run's and a full run's weights, say) and then mark the mixture complete.
    for incomplete in set(checkpoint_directories(output_dir)) - set(complete_checkpoints(output_dir)):
        logger.warning("removing %s: an incomplete checkpoint left by an interrupted save", incomplete)
        shutil.rmtree(incomplete)
    recover_final_save(output_dir)
    record = _run_record(config, data_check)
    _write_atomically(output_dir / RUN_RECORD, json.dumps(record, indent=2) + "\n")
    if not data_check.problems:
        (output_dir / SKIPPED_RECORDS).unlink(missing_ok=True)  # an earlier run's list would mislead
    else:
        lines = "".join(json.dumps(problem.to_dict()) + "\n" for problem in data_check.problems)
        _write_atomically(output_dir / SKIPPED_RECORDS, lines)


def _write_atomically(path: Path, text: str) -> None:
    """`path` gets `text` whole or keeps its old content: written to a sibling, then renamed over it."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def _push(checkpoint_dir: Path, config: TrainingConfig, model_name_or_path: str, data_path, steps: int) -> None:
    """Uploads the trained checkpoint with `ms_llava.hub.push_to_hub`; the model card records this run's recipe."""
    from ..hub import push_to_hub

    recipe = PAPER_RECIPES[config.stage]
    trained = {"pretrain": "MS-Resampler", "finetune": "MS-Resampler + LLM"}[config.stage]
    if config.lora:
        trained = f"MS-Resampler + {'QLoRA' if config.qlora else 'LoRA'} (r={config.lora_r}) on the LLM, merged"
    data_name = Path(data_path).name if isinstance(data_path, (str, Path)) else type(data_path).__name__
    training = {
        "stages": [
            {
                "stage": f"{config.stage}: {recipe.description}",
                "trained": trained,
                "data": data_name,
                "learning rate": f"{config.learning_rate:g}",
                "global batch size": config.global_batch_size,
                "epochs": f"{config.num_train_epochs:g}",
                "steps": steps,
            }
        ],
        "optimizer": "AdamW",
        "schedule": f"{config.lr_scheduler_type}, warmup {config.warmup_ratio:g} of the steps",
        "trained with": "ms-llava train",
    }
    base_model = None if Path(model_name_or_path).exists() else model_name_or_path
    commit = push_to_hub(checkpoint_dir, config.hub_model_id, base_model=base_model, training=training)
    logger.info("pushed %s to %s (commit %s)", checkpoint_dir, config.hub_model_id, commit.oid)


# --------------------------------------------------------------------------------------------- command line

_DESCRIPTION = (
    "Train MS-LLaVA with the paper's two-stage recipe (Sec. 4.1). pretrain: only the projector trains (AdamW, lr "
    "1e-3, global batch 32, 1 epoch); finetune: projector and LLM train, vision tower frozen (lr 1e-5, global batch "
    "16, 1 epoch). Every option overrides the recipe. Runs under `accelerate launch` for several processes. The other "
    "options of transformers' TrainingArguments (--optim, --report_to, ...) are taken too; they are not listed here."
)


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Registers `train` on an argparse subparsers object (`ms-llava train --stage ... --model ... ...`); the parsed
    arguments' `handler(args)` runs it and returns the exit status."""
    parser = subparsers.add_parser(
        "train",
        help="train with the paper's two-stage recipe",
        description=_DESCRIPTION,
        parents=[train_argument_parser(add_help=False)],
    )
    parser.set_defaults(handler=_train_command)
    return parser


def _train_command(args: argparse.Namespace) -> int:
    """Handler of `ms-llava train`: 0 on success, 2 on a bad setting or bad data."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    options = {item.name for item in dataclasses.fields(TrainingConfig) if item.init} - {"stage", "output_dir"}
    overrides = {name: value for name, value in vars(args).items() if name in options and value is not None}
    try:
        result = train(
            args.model, args.stage, args.data, image_folder=args.image_folder, output_dir=args.output_dir, **overrides
        )
    except ValueError as error:
        print(f"ms-llava train: error: {error}", file=sys.stderr)
        return 2
    from accelerate import PartialState

    if PartialState().is_main_process:
        what = {"lora": "LoRA adapter", "scale": "ScAle adapter"}.get(result.adapter_type, "model")
        final_loss = f"final loss {result.losses[-1][1]:.4f}, " if result.losses else ""
        print(
            f"trained {result.stage}: {result.global_step} steps, {result.num_examples} examples "
            f"({len(result.skipped)} skipped), {final_loss}{result.wall_time_s:.1f} s"
            + (f", resumed from {result.resumed_from}" if result.resumed_from else "")
            + f"; {what} and processor in {result.output_dir}"
            + (f", merged model in {result.merged_dir}" if result.merged_dir else "")
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m ms_llava.training --stage ... ` (the same options as `ms-llava train`)."""
    parser = train_argument_parser(
        prog="python -m ms_llava.training", description=_DESCRIPTION, formatter_class=argparse.HelpFormatter
    )
    parser.set_defaults(handler=_train_command)
    args = parser.parse_args(argv)
    return args.handler(args)
