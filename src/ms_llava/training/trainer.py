"""`train()` and `ms-llava train`: one stage of the paper's two-stage recipe (Sec. 4.1) on transformers' `Trainer`.

    stage1 = train("ms-llava-init", "pretrain", "blip_laion_cc_sbu_558k.json", image_folder="images", output_dir="s1")
    stage2 = train("s1", "finetune", "llava_v1_5_mix665k.json", image_folder="data", output_dir="s2")

A run checks its output folder can be written and its records before the model loads, owns the folder while it runs
(`ms_llava.outputs`), resumes from the last complete checkpoint (refusing settings that change the loss curve), logs
the loss to `loss_log.csv`, records what ran in `ms_llava_training.json` and saves the final model atomically.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from accelerate import PartialState
from transformers import AutoProcessor, Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import SchedulerType, sort_checkpoints

from ..outputs import check_writable, command_line, own_folder, writing
from ..recipes import PROJECTOR
from . import arguments
from .adapters import configure_trainable, load_model, merge_lora_adapter, require_qlora_support
from .arguments import MSLlavaTrainingArguments
from .data import BadRecordsError, RightPaddingCollator, SupervisedDataset, check_records, load_training_records
from .data import pad_token_id as find_pad_token_id
from .feature_cache import build_cache, check_cacheable, vision_features_input

logger = logging.getLogger(__name__)
LOSS_LOG, RUN_RECORD, SKIPPED_RECORDS = "loss_log.csv", "ms_llava_training.json", "skipped_records.jsonl"
# The final save is written here (inside OUTPUT_DIR), marked complete, then its files are moved into OUTPUT_DIR.
FINAL_SAVE_STAGING, STAGED_COMPLETE = ".ms_llava_final_save", ".complete"
# Stage-record keys that shape the loss curve: a resumed run must keep them.
CURVE_KEYS = (
    "stage learning_rate projector_learning_rate global_batch_size num_train_epochs max_steps lr_scheduler_type "
    "warmup_ratio weight_decay optim adam_beta1 adam_beta2 adam_epsilon max_grad_norm max_length seed bf16 adapter "
    "data_fingerprint"
).split()
# The stage record's settings copied from the options as they are.
RECORDED_OPTIONS = (
    "learning_rate projector_learning_rate warmup_ratio weight_decay optim adam_beta1 adam_beta2 adam_epsilon "
    "max_grad_norm per_device_train_batch_size max_length bf16 gradient_accumulation_steps global_batch_size "
    "num_train_epochs seed"
).split()


@dataclass
class TrainResult:
    """What `train` did: `losses` is `(step, loss)` of every logged step (those before a resume included),
    `train_loss` the mean loss of this call's steps, `skipped` the bad records' `RecordProblem`s."""

    output_dir: Path
    stage: str
    global_step: int
    losses: list[tuple[int, float]]
    train_loss: float
    wall_time_s: float
    num_examples: int
    skipped: list
    resumed_from: Path | None
    adapter_type: str | None  # "lora", "scale" or None (the output is then a full model)
    adapter: bool
    merged_dir: Path | None


class MSLlavaTrainer(Trainer):
    """`Trainer` with the options' learning rate for the projector (LLaVA's `mm_projector_lr`), where one is given."""

    def create_optimizer(self, model=None):
        if self.args.projector_learning_rate is None or self.optimizer is not None:
            return super().create_optimizer(model)
        model = self.model if model is None else model
        decay, groups = set(self.get_decay_parameter_names(model)), {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                groups.setdefault((PROJECTOR in name, name in decay), []).append(param)
        param_groups = [
            {"params": params, "weight_decay": self.args.weight_decay if decays else 0.0}
            | ({"lr": self.args.projector_learning_rate} if projector else {})
            for (projector, decays), params in groups.items()
        ]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    def save_model(self, output_dir=None, _internal_call=False):
        # FSDP2's fully_shard gives the model a class `FSDP<Name>` defined in torch: save_pretrained would record that
        # name as the architecture and copy torch's module as remote code. Saved under the model's own class.
        model, saved_class = self.model, type(self.model)
        if saved_class.__name__.startswith("FSDP") and saved_class.__module__.startswith("torch."):
            model.__class__ = saved_class.__bases__[-1]
        try:
            return super().save_model(output_dir, _internal_call)
        finally:
            model.__class__ = saved_class


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """`checkpoint-N` folders holding `trainer_state.json`, by N (`Trainer`'s sorting). `Trainer` writes that file
    last, and its own resume (`get_last_checkpoint`) would take a half-written checkpoint a crash left."""
    return [Path(path) for path in sort_checkpoints(str(output_dir)) if (Path(path) / TRAINER_STATE_NAME).is_file()]


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


@dataclass(eq=False)
class RunFiles(TrainerCallback):
    """The run's own files in OUTPUT_DIR (main process). At the end of the first step (before `Trainer` saves or logs)
    it clears what an interrupted save left, writes the training record and the skipped-records list, and rewrites
    `loss_log.csv` from the trainer state (a resume keeps the earlier steps); then it appends each logged loss, and
    each checkpoint updates the record's `steps_run`. A run that fails before its first step leaves the folder as it
    was."""

    output_dir: Path
    record: dict
    problems: list
    main: bool
    started: bool = False
    FIELDS = ("step", "epoch", "loss", "learning_rate", "grad_norm")

    def on_step_end(self, args, state, control, **kwargs):
        self.start(state)

    def start(self, state) -> None:
        started, self.started = self.started, True
        if started or not self.main:
            return
        for path in sort_checkpoints(str(self.output_dir)):  # a save into one would mix its files with stale ones
            if not (Path(path) / TRAINER_STATE_NAME).is_file():
                logger.warning("removing %s: an incomplete checkpoint left by an interrupted save", path)
                shutil.rmtree(path)
        recover_final_save(self.output_dir)
        self.write_record()
        (self.output_dir / SKIPPED_RECORDS).unlink(missing_ok=True)  # an earlier run's list would mislead
        if self.problems:
            lines = "".join(json.dumps(problem.to_dict()) + "\n" for problem in self.problems)
            _write_atomically(self.output_dir / SKIPPED_RECORDS, lines)
        self._log("w", [entry for entry in state.log_history if "loss" in entry])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.started and self.main and logs and "loss" in logs:
            self._log("a", [{**logs, "step": state.global_step}])

    def on_save(self, args, state, control, **kwargs):
        self.record["stages"][-1]["steps_run"] = state.global_step
        self.write_record()

    def write_record(self) -> None:
        if self.main:
            _write_atomically(self.output_dir / RUN_RECORD, json.dumps(self.record, indent=2) + "\n")

    def _log(self, mode: str, rows: list[dict]) -> None:
        with open(self.output_dir / LOSS_LOG, mode, newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, self.FIELDS, extrasaction="ignore")
            if mode == "w":
                writer.writeheader()
            writer.writerows(rows)


@contextlib.contextmanager
def signals_deferred():
    """Ctrl-C and SIGTERM received in the block are blocked, and take effect when it ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _fsync(path: Path) -> None:
    """Flushes a file or a folder's entries to disk, so that a rename after it never exposes unwritten data."""
    with contextlib.suppress(OSError):  # some systems cannot open or fsync a folder
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def commit_staged_save(output_dir: str | Path) -> None:
    """Moves a complete staged save's files into `output_dir`, each by one `os.replace` (a reader sees the old file or
    the new one), Ctrl-C and SIGTERM held until the last is in; then removes the staging folder."""
    output_dir, staging = Path(output_dir), Path(output_dir) / FINAL_SAVE_STAGING
    with signals_deferred():
        for entry in sorted(staging.iterdir()):
            if entry.name != STAGED_COMPLETE:
                if entry.is_dir() and (output_dir / entry.name).is_dir():
                    shutil.rmtree(output_dir / entry.name)  # os.replace does not replace a non-empty folder
                os.replace(entry, output_dir / entry.name)
        _fsync(output_dir)
        shutil.rmtree(staging)


def recover_final_save(output_dir: str | Path) -> None:
    """A staged save an interrupted run left: moved in when marked complete (killed while moving), else removed."""
    staging = Path(output_dir) / FINAL_SAVE_STAGING
    if (staging / STAGED_COMPLETE).is_file():
        logger.warning("completing the final save that an interrupted run left in %s", staging)
        commit_staged_save(output_dir)
    elif staging.is_dir():
        logger.warning("removing %s: an incomplete final save left by an interrupted run", staging)
        shutil.rmtree(staging)


def save_final_model(trainer, output_dir: str | Path, state, files: dict[str, str] | None = None) -> None:
    """`trainer.save_model` (model or adapter, processor), the trainer state and `files` (name: text), written into the
    staging folder (every process takes part, the main one writes), flushed, marked complete and moved in. An interrupt
    while writing leaves `output_dir` as it was; one while moving takes effect when the move is done."""
    staging = Path(output_dir) / FINAL_SAVE_STAGING
    if state.is_main_process and staging.exists():
        shutil.rmtree(staging)
    state.wait_for_everyone()
    try:
        trainer.save_model(str(staging))
        if state.is_main_process:
            trainer.state.save_to_json(str(staging / TRAINER_STATE_NAME))
            for name, text in (files or {}).items():
                (staging / name).write_text(text, encoding="utf-8")
            for path in staging.rglob("*"):
                _fsync(path)
    except BaseException:
        if state.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if state.is_main_process:
        with signals_deferred():
            (staging / STAGED_COMPLETE).touch()
            _fsync(staging)
            commit_staged_save(output_dir)
    state.wait_for_everyone()


def require_training_extra(lora: bool = False) -> None:
    """ImportError naming the install command when peft, which adapters need, is missing (accelerate is imported
    above)."""
    if lora and importlib.util.find_spec("peft") is None:
        raise ImportError("ms-llava train needs peft: install the training extra, pip install -e '.[train]'")


def train(
    model_name_or_path,
    stage: str,
    data_path,
    image_folder=None,
    output_dir="ms-llava-output",
    *,
    callbacks: list | None = None,
    feature_cache=None,
    **overrides,
) -> TrainResult:
    """Runs one stage of the recipe on `data_path` (`data.load_training_records`; images relative to `image_folder`)
    from the checkpoint `model_name_or_path` (folder or Hub id) and saves the model or adapter, with the processor, in
    `output_dir`. `overrides`: options of `MSLlavaTrainingArguments` (the recipe's value otherwise); `callbacks`: extra
    `TrainerCallback`s; `feature_cache`: a `feature_cache.build_cache` result to reuse with `cache_vision_features`.

    Raises ValueError for bad settings, bad records (`BadRecordsError`) or an output folder holding checkpoints
    (without `resume=True`), OSError naming `output_dir` when it cannot be written, `FolderInUseError` when a run
    holds it.
    """
    output_dir = Path(output_dir)
    adapted = overrides.get("lora") or overrides.get("qlora") or overrides.get("adapter") is not None
    weights = sum(path.stat().st_size for path in Path(model_name_or_path).glob("*.safetensors"))
    check_writable(output_dir, 0 if adapted else weights)  # the final save needs about the weights' size
    require_training_extra(lora=adapted)
    config = MSLlavaTrainingArguments.for_stage(stage, output_dir=str(output_dir), **overrides)
    if config.qlora:
        require_qlora_support()
    if feature_cache is not None and not config.cache_vision_features:
        raise ValueError("feature_cache is used with cache_vision_features=True only")
    state, launched = PartialState(), arguments.launched_world_size()  # set up by TrainingArguments (gloo or NCCL)
    if state.num_processes != launched:
        raise ValueError(f"the launcher started {launched} processes but the process group has {state.num_processes}")
    log = logger.info if state.is_main_process else logger.debug  # the other processes' copies stay quiet
    if Path(model_name_or_path).is_dir():
        model_name_or_path = Path(model_name_or_path).resolve()
    model_name_or_path = str(model_name_or_path)
    created = next((path for path in (*reversed(output_dir.parents), output_dir) if not path.exists()), None)
    files = None
    try:
        with own_folder(output_dir, command_line()) if state.is_main_process else contextlib.nullcontext():
            resume_from = _checkpoint_to_resume(output_dir, config, state, existed=created is None)
            processor = AutoProcessor.from_pretrained(model_name_or_path)
            records = load_training_records(data_path, image_folder)
            data_check = _pre_pass(records, processor, config, state)
            problems, kept = data_check.problems, data_check.kept
            if problems and not config.skip_bad_records:
                raise BadRecordsError(problems, data_check.num_records)
            if not kept:
                raise ValueError(f"{records.description}: no record left to train on ({data_check.summary()})")
            if problems and state.is_main_process:
                shown = ", ".join(map(str, problems[:3])) + " ..." * (len(problems) > 3)
                logger.warning(
                    f"skipping {len(problems)} bad record(s) ({shown}); they are listed in "
                    f"{output_dir / SKIPPED_RECORDS} once training starts"
                )
            log("data: %s: %s", records.description, data_check.summary())
            if config.auto_num_workers:
                workers = arguments.default_num_workers(len(kept), config.global_batch_size, launched)
                config.dataloader_num_workers = workers
            # A batch of text-only records leaves the projector unused: DDP must then look for unused parameters.
            config.ddp_find_unused_parameters = data_check.num_text_only > 0
            stage_record = _stage_record(config, model_name_or_path, data_path, data_check, launched)
            _check_resume(output_dir, stage_record, resume_from)

            model = configure_trainable(load_model(model_name_or_path, config), config)
            parts = {}  # the model's parts (model.vision_tower, ..., lm_head): does a parameter of each train?
            for name, param in model.named_parameters():
                name = name.removeprefix("base_model.model.")
                part = ".".join(name.split(".")[: 2 if name.startswith("model.") else 1])
                parts[part] = parts.get(part, False) or param.requires_grad
            stage_record["trained"] = sorted(part for part, trains in parts.items() if trains)
            stage_record["frozen"] = sorted(part for part, trains in parts.items() if not trains)
            trainable = sum(param.numel() for param in model.parameters() if param.requires_grad)
            projector_lr = f" (projector {config.projector_learning_rate:g})" if config.projector_learning_rate else ""
            log(
                f"stage {config.stage}: {trainable:,} trainable parameters; global batch {config.global_batch_size} = "
                f"{config.per_device_train_batch_size} per device x {config.gradient_accumulation_steps} accumulation"
                f" x {launched} process(es); lr {config.learning_rate:g}{projector_lr}; "
                f"{config.dataloader_num_workers} data-loader worker(s)",
            )
            images = [image for index in kept for image in records[index].images]
            if config.cache_vision_features and not images:
                log("vision feature cache: the kept records hold no image, nothing to cache")
            elif config.cache_vision_features:
                check_cacheable(model)
                feature_cache = build_cache(model, processor, images, log=log, reuse=feature_cache)
            record = {"stages": [*_earlier_stages(model_name_or_path), stage_record]}
            files = RunFiles(output_dir, record, problems, state.is_main_process)
            trainer = MSLlavaTrainer(
                model=model,
                args=config,
                train_dataset=SupervisedDataset(records, kept, processor, config.max_length, feature_cache),
                data_collator=RightPaddingCollator(find_pad_token_id(processor.tokenizer)),
                processing_class=processor,
                callbacks=[files, *(callbacks or [])],
            )
            started = time.perf_counter()
            with writing(output_dir):
                with vision_features_input(model, feature_cache) if feature_cache else contextlib.nullcontext():
                    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
                files.start(trainer.state)  # a resumed run whose checkpoint is at the last step runs no step
                stage_record.update(steps_run=trainer.state.global_step, completed=True)
                save_final_model(trainer, output_dir, state, {RUN_RECORD: json.dumps(record, indent=2) + "\n"})
                wall_time, merged_dir = time.perf_counter() - started, None
                if state.is_main_process and config.lora and (config.merge_lora or config.hub_model_id):
                    merged_dir = output_dir / "merged"
                    merge_lora_adapter(output_dir, merged_dir)
    except BaseException:
        if not (files and files.started) and created is not None and state.is_main_process and created.exists():
            logger.warning("removing %s: this run created it and failed before its first step", created)
            shutil.rmtree(created, ignore_errors=True)
        raise
    if state.is_main_process and config.hub_model_id:
        from ..hub import push_to_hub

        base_model = None if Path(model_name_or_path).exists() else model_name_or_path
        if merged_dir is not None:  # the card is built from the pushed folder's own training record
            shutil.copy(output_dir / RUN_RECORD, merged_dir / RUN_RECORD)
        commit = push_to_hub(merged_dir or output_dir, config.hub_model_id, base_model=base_model)
        logger.info("pushed %s to %s (commit %s)", merged_dir or output_dir, config.hub_model_id, commit.oid)
    state.wait_for_everyone()
    log("done: %d steps in %.1f s; final model in %s", trainer.state.global_step, wall_time, output_dir)
    return TrainResult(
        output_dir=output_dir,
        stage=config.stage,
        global_step=trainer.state.global_step,
        losses=[(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry],
        train_loss=output.training_loss,
        wall_time_s=wall_time,
        num_examples=len(kept),
        skipped=list(problems),
        resumed_from=resume_from,
        adapter_type=config.adapter,
        adapter=config.adapter is not None,
        merged_dir=merged_dir,
    )


def _stage_record(config, model_name_or_path: str, data_path, data_check, world_size: int) -> dict:
    """This run's entry in the training record (`trained` / `frozen`, `steps_run` and `completed` follow later)."""
    adapter = None
    if config.lora:
        adapter = {"type": "qlora" if config.qlora else "lora", "r": config.lora_r, "alpha": config.lora_alpha}
        adapter.update(dropout=config.lora_dropout, target="language model", modules_to_save=[PROJECTOR])
    elif config.adapter == "scale":
        adapter = {"type": "scale", "bound": config.scale_bound, "token_scope": config.scale_token_scope}
        adapter["layers"] = config.scale_layers
    return {
        "stage": config.stage,
        "base_model": model_name_or_path,
        "data": str(data_path) if isinstance(data_path, (str, Path)) else f"a {type(data_path).__name__} in memory",
        "num_examples": len(data_check.kept),
        "skipped_records": len(data_check.problems),
        "adapter": adapter,
        "lr_scheduler_type": SchedulerType(config.lr_scheduler_type).value,
        **{name: getattr(config, name) for name in RECORDED_OPTIONS},
        "world_size": world_size,
        "max_steps": None if config.max_steps == -1 else config.max_steps,
        "steps_run": 0,
        "completed": False,
        "data_fingerprint": data_check.fingerprint,
    }


def _earlier_stages(model_name_or_path: str) -> list[dict]:
    """The stages recorded in the `--model` folder's own training record (none for a Hub id or a folder without)."""
    path = Path(model_name_or_path) / RUN_RECORD
    try:
        return list(json.loads(path.read_text(encoding="utf-8"))["stages"]) if path.is_file() else []
    except (ValueError, KeyError, TypeError) as error:
        logger.warning("%s cannot be read (%s); the record of this run starts with this stage", path, error)
        return []


def _checkpoint_to_resume(output_dir: Path, config, state, existed: bool) -> Path | None:
    """The checkpoint `--resume` continues from (logged with its step), or None (logged with the reason)."""
    every, checkpoints = [Path(path) for path in sort_checkpoints(str(output_dir))], complete_checkpoints(output_dir)
    if checkpoints and not config.resume:
        raise ValueError(
            f"{output_dir} already holds checkpoints ({', '.join(path.name for path in checkpoints)}): pass "
            f"--resume (resume=True) to continue from {checkpoints[-1].name}, or choose another output directory"
        )
    if not checkpoints:
        why = f"{output_dir} holds no checkpoint-N folder" if existed else f"{output_dir} does not exist"
        if every:
            names = ", ".join(path.name for path in every)
            why = f"{output_dir} holds only incomplete checkpoints ({names}: no {TRAINER_STATE_NAME})"
        if config.resume and state.is_main_process:
            logger.warning("resume: starting from the beginning (step 0): %s", why)
        return None
    newer = [path.name for path in every[every.index(checkpoints[-1]) + 1 :]]
    step = json.loads((checkpoints[-1] / TRAINER_STATE_NAME).read_text(encoding="utf-8")).get("global_step", "?")
    skipping = f" (skipping the incomplete {', '.join(newer)})" if newer else ""
    if state.is_main_process:
        logger.info("resume: continuing from %s at step %s%s", checkpoints[-1], step, skipping)
    return checkpoints[-1]


def _check_resume(output_dir: Path, stage_record: dict, resume_from: Path | None) -> None:
    """A resumed run keeps the settings that shape the loss curve and the same data (every process raises alike)."""
    path = output_dir / RUN_RECORD
    if resume_from is None or not path.is_file():
        return
    previous = (json.loads(path.read_text(encoding="utf-8")).get("stages") or [{}])[-1]
    if any(key not in previous for key in CURVE_KEYS):
        logger.warning("resume: %s records no %s; not compared", path, [k for k in CURVE_KEYS if k not in previous])
    changed = [
        f"{key} {previous[key]!r} -> {stage_record[key]!r}"
        + " (the training data differ)" * (key == "data_fingerprint")
        for key in CURVE_KEYS
        if key in previous and previous[key] != stage_record[key]
    ]
    if changed:
        raise ValueError(
            f"resuming {resume_from} with settings that change the loss curve: {'; '.join(changed)}; "
            "keep them, or start a new output directory"
        )


def _pre_pass(records, processor, config, state):
    """`check_records` on the main process only; its result or failure broadcast to the others (which raise the same
    message rather than wait forever)."""
    from accelerate.utils import broadcast_object_list

    payload, failure = [None], None
    if state.is_main_process:
        logger.info("pre-pass (process 0): checking %d records of %s", len(records), records.description)
        try:
            payload = [check_records(records, processor, config.max_length, config.verify_images)]
        except Exception as error:
            failure, payload = error, [(isinstance(error, ValueError), f"{type(error).__name__}: {error}")]
    if state.num_processes > 1:
        broadcast_object_list(payload, from_process=0)
    if failure is not None:
        raise failure
    if isinstance(payload[0], tuple):
        value_error, message = payload[0]
        raise (ValueError if value_error else RuntimeError)(f"the pre-pass on the main process failed: {message}")
    return payload[0]


def run(args) -> int:
    """`ms-llava train`: trains, prints one summary line (main process), returns 0; errors propagate."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # if not set up
    logger.setLevel(logging.INFO)
    from ..checkpoints import resolve_checkpoint

    # a path that does not exist, a bare name that is neither here nor on the Hub, or a broken checkpoint fails now
    folder = resolve_checkpoint(args.model, "--model", processor=True)
    if Path(args.model).expanduser().is_dir():
        args.model = str(folder)  # a Hub id stays as given (the run records it), read from the Hub cache
    overrides = {name: value for name, value in vars(args).items() if name in arguments.OPTIONS and value is not None}
    result = train(args.model, args.stage, args.data, image_folder=args.image_folder, **overrides)
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
