"""Training MS-LLaVA with the paper's two-stage recipe (Sec. 4.1) on transformers' `Trainer`.

    from ms_llava.training import train

    stage1 = train("ms-llava-init", "pretrain", "blip_laion_cc_sbu_558k.json", image_folder="images", output_dir="s1")
    stage2 = train("s1", "finetune", "llava_v1_5_mix665k.json", image_folder="data", output_dir="s2")

or `ms-llava train --stage pretrain|finetune --model DIR --data PATH --image-folder DIR --output-dir DIR`, also under
`accelerate launch` (DDP, FSDP, DeepSpeed: configs in `configs/accelerate/`). `docs/training.md` documents every
default, its source, and the choices made where the paper is silent.

- `pretrain`: only the projector (MS-Resampler) trains; the vision tower and the LLM are frozen. AdamW, lr 1e-3,
  global batch 32, 1 epoch.
- `finetune`: the projector and the LLM (with its embeddings and head) train; the vision tower is frozen. AdamW,
  lr 1e-5, global batch 16, 1 epoch.

Every hyper-parameter is a field of `TrainingConfig` and can be overridden (`train(..., learning_rate=2e-5)`). The
global batch is per-device batch x gradient accumulation x processes; the accumulation is computed from the other
two and a global batch they do not divide is refused. The loss covers the assistant tokens only (`ms_llava.training.data`).

Dependability:

- every record is checked by a pre-pass before the model is loaded (`ms_llava.training.data.check_records`, on the main
  process; the others receive its result); bad records stop the run with an error naming them, or are skipped with
  `skip_bad_records=True` (counted in the log, listed in `OUTPUT_DIR/skipped_records.jsonl`); a chat template that
  marks no assistant token stops the run before training;
- checkpoints appear atomically: `MSLlavaTrainer` writes each into `OUTPUT_DIR/.checkpoint-staging/` and renames it
  to `OUTPUT_DIR/checkpoint-N` once every process has finished writing, so a crash mid-save never leaves a
  `checkpoint-N` that `resume=True` would pick (transformers 5.23's `Trainer` writes straight into `checkpoint-N`);
- `resume=True` continues from the last complete checkpoint with the same data order (a seeded sampler), and refuses
  settings that would change the loss curve, bf16 and the data (a fingerprint of the records) included;
- the per-step loss goes to `OUTPUT_DIR/loss_log.csv` as training runs, and the whole history to
  `OUTPUT_DIR/trainer_state.json` at the end.

LoRA (`lora=True`) adapts the LLM's linear layers only, chosen by a regular expression anchored at
`model.language_model.`, so no vision-tower module can match; the projector trains fully (`modules_to_save`). QLoRA
(`qlora=True`) loads the LLM in 4 bits and needs a CUDA GPU and bitsandbytes.

ScAle (`adapter="scale"`, `ms_llava.tuners.scale`, docs/scale.md) freezes the whole model, the projector included, and trains
only bounded scalars (one per attention head and one per MLP of the LLM); the output folder holds the adapter in
PEFT's format and the processor.
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
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..recipes import LORA_DEFAULTS, PAPER_RECIPES, PROJECTOR, SCALE_DEFAULTS
from .data import (
    BadRecordsError,
    DataCheck,
    RightPaddingCollator,
    SupervisedDataset,
    check_records,
    load_training_records,
    pad_token_id,
)
from .feature_cache import cached_vision_tower

logger = logging.getLogger(__name__)

STAGING_DIR = ".checkpoint-staging"
LOSS_LOG = "loss_log.csv"
RUN_RECORD = "ms_llava_training.json"
SKIPPED_RECORDS = "skipped_records.jsonl"
LANGUAGE_MODEL_PREFIX = "model.language_model."


ADAPTERS = ("lora", "scale")


@dataclass
class TrainingConfig:
    """Every setting of a training run. `TrainingConfig.for_stage(stage, **overrides)` starts from the paper's
    stage recipe; the fields below the recipe's are choices where the paper is silent (docs/training.md)."""

    stage: str
    learning_rate: float
    global_batch_size: int
    num_train_epochs: float = 1.0
    per_device_batch_size: int | None = None  # None: global batch / processes (no gradient accumulation)
    max_steps: int | None = None  # stops early; the schedule then spans max_steps
    projector_learning_rate: float | None = None  # None: learning_rate
    # Where the paper is silent: LLaVA-1.5's training scripts.
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    max_length: int | None = 2048
    # Run management.
    seed: int = 42
    bf16: bool = False
    gradient_checkpointing: bool = False
    save_steps: int = 1000
    save_total_limit: int | None = 2
    logging_steps: int = 1
    dataloader_num_workers: int = 4
    resume: bool = False
    skip_bad_records: bool = False
    verify_images: bool = False
    # The frozen vision tower runs once per distinct image, not once per visit (ms_llava.training.feature_cache; same losses).
    cache_vision_features: bool = False
    # Parameter-efficient fine-tuning (finetune stage only).
    lora: bool = False
    qlora: bool = False
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    merge_lora: bool = False
    push_to_hub: str | None = None
    # The adapter to train instead of the model: None (full fine-tune of the stage), "lora" (= lora=True) or "scale"
    # (ScAle: only per-head and per-MLP scalars of the LLM train; ms_llava.tuners.scale).
    adapter: str | None = None
    scale_bound: float = 1.0  # ScAle: s = 1 + bound * tanh(theta), bound in (0, 1]
    scale_token_scope: str = "last"  # ScAle: "last" (last prompt token and generated tokens) or "all"
    scale_layers: list[int] | None = None  # ScAle: decoder layer indices; None: all

    # Settings that shape the loss curve: a resumed run must keep them.
    CURVE_FIELDS = (
        "stage",
        "learning_rate",
        "projector_learning_rate",
        "global_batch_size",
        "num_train_epochs",
        "max_steps",
        "lr_scheduler_type",
        "warmup_ratio",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "max_grad_norm",
        "max_length",
        "seed",
        "bf16",
        "lora",
        "qlora",
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "adapter",
        "scale_bound",
        "scale_token_scope",
        "scale_layers",
    )

    @classmethod
    def for_stage(cls, stage: str, **overrides) -> TrainingConfig:
        """The paper's recipe for `stage` with `overrides` applied; unknown names and bad values raise ValueError."""
        if stage not in PAPER_RECIPES:
            raise ValueError(f"stage must be one of {sorted(PAPER_RECIPES)}, got {stage!r}")
        known = {field.name for field in dataclasses.fields(cls)} - {"stage"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        adapter = overrides.get("adapter")
        scale_options = sorted(name for name in overrides if name.startswith("scale_"))
        if scale_options and adapter != "scale":
            raise ValueError(
                f"{', '.join(scale_options)} set ScAle options, which need adapter='scale' (got {adapter!r})"
            )
        if adapter == "lora" and overrides.get("lora") is False:
            raise ValueError("adapter='lora' and lora=False contradict each other")
        recipe = PAPER_RECIPES[stage]
        values = {
            "learning_rate": recipe.learning_rate,
            "global_batch_size": recipe.global_batch_size,
            "num_train_epochs": recipe.num_train_epochs,
        }
        if overrides.get("lora") or overrides.get("qlora") or adapter == "lora":
            values.update(LORA_DEFAULTS)
        if adapter == "scale":
            values.update(SCALE_DEFAULTS)
        values.update(overrides)
        if values.get("qlora") or adapter == "lora":
            values["lora"] = True
        if values.get("lora") and adapter is None:
            values["adapter"] = "lora"
        if values.get("scale_layers") is not None:
            values["scale_layers"] = list(values["scale_layers"])
        config = cls(stage=stage, **values)
        config.validate()
        return config

    def validate(self) -> None:
        positive = {
            "learning_rate": self.learning_rate,
            "global_batch_size": self.global_batch_size,
            "num_train_epochs": self.num_train_epochs,
            "save_steps": self.save_steps,
            "logging_steps": self.logging_steps,
            "lora_r": self.lora_r,
            "lora_alpha": self.lora_alpha,
        }
        optional_positive = {
            "per_device_batch_size": self.per_device_batch_size,
            "max_steps": self.max_steps,
            "projector_learning_rate": self.projector_learning_rate,
            "max_length": self.max_length,
            "save_total_limit": self.save_total_limit,
        }
        for name, value in {**positive, **{k: v for k, v in optional_positive.items() if v is not None}}.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        for name in ("global_batch_size", "save_steps", "logging_steps", "lora_r", "per_device_batch_size"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.dataloader_num_workers < 0:
            raise ValueError(f"dataloader_num_workers must be >= 0, got {self.dataloader_num_workers!r}")
        if self.lora and self.stage == "pretrain":
            raise ValueError(
                "lora adapts the language model, which the 'pretrain' stage keeps frozen (only the projector trains "
                "there); use lora with stage 'finetune'"
            )
        if self.merge_lora and not self.lora:
            raise ValueError("merge_lora needs lora=True")
        if self.adapter is not None and self.adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {list(ADAPTERS)} or None, got {self.adapter!r}")
        if self.adapter == "scale":
            self._validate_scale()

    def _validate_scale(self) -> None:
        conflicts = {
            "lora": self.lora,
            "qlora": self.qlora,
            "merge_lora": self.merge_lora,
            "projector_learning_rate": self.projector_learning_rate,
            "push_to_hub": self.push_to_hub,
        }
        conflicting = {name: value for name, value in conflicts.items() if value}
        if conflicting:
            raise ValueError(
                f"adapter='scale' cannot be combined with {', '.join(f'{k}={v!r}' for k, v in conflicting.items())}: "
                "ScAle freezes the whole model (projector included), is not LoRA, and its default 'last' token scope "
                "cannot be merged (push the adapter folder with huggingface_hub instead)"
            )
        if self.stage != "finetune":
            raise ValueError(f"adapter='scale' adapts a trained model: use stage 'finetune', got {self.stage!r}")
        bound = self.scale_bound
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not 0 < bound <= 1:
            raise ValueError(f"scale_bound must be a number in (0, 1], got {bound!r}")
        if self.scale_token_scope not in ("last", "all"):
            raise ValueError(f"scale_token_scope must be 'last' or 'all', got {self.scale_token_scope!r}")
        layers = self.scale_layers
        if layers is not None and (
            not layers or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
        ):
            raise ValueError(f"scale_layers must be a non-empty list of non-negative layer indices, got {layers!r}")

    def batch_layout(self, world_size: int) -> tuple[int, int]:
        """`(per-device batch, gradient accumulation steps)` so that their product x `world_size` is the global
        batch; ValueError naming the numbers when they do not divide."""
        per_device = self.per_device_batch_size
        if per_device is None:
            if self.global_batch_size % world_size:
                raise ValueError(
                    f"global batch size {self.global_batch_size} is not divisible by the {world_size} processes; "
                    "choose a global batch size that is"
                )
            per_device = self.global_batch_size // world_size
        return per_device, gradient_accumulation_steps(self.global_batch_size, per_device, world_size)

    def curve_settings(self) -> dict:
        return {name: getattr(self, name) for name in self.CURVE_FIELDS}


def gradient_accumulation_steps(global_batch_size: int, per_device_batch_size: int, world_size: int) -> int:
    """global batch = per-device batch x accumulation x world size; ValueError when that has no integer solution."""
    per_step = per_device_batch_size * world_size
    if global_batch_size % per_step:
        raise ValueError(
            f"global batch size {global_batch_size} is not a multiple of per-device batch size "
            f"{per_device_batch_size} x {world_size} process(es) = {per_step}; change --global-batch-size or "
            "--per-device-batch-size"
        )
    return global_batch_size // per_step


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
    """transformers' `Trainer` with atomic checkpoints and an optional learning rate for the projector.

    Checkpoints: transformers 5.23 writes `checkpoint-N` in place (weights, then optimizer, RNG and trainer state),
    and `resume_from_checkpoint=True` takes the highest-numbered `checkpoint-N` whatever its state. Here each
    checkpoint is written into `OUTPUT_DIR/.checkpoint-staging/checkpoint-N` (`_get_output_dir` points there during
    the save) and renamed into place by the main process after every process has written its part and the files are
    synced, so every `checkpoint-N` directory is complete.
    """

    def __init__(self, *args, projector_learning_rate: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.projector_learning_rate = projector_learning_rate
        self._staging_root: str | None = None

    def _get_output_dir(self, trial) -> str:
        return self._staging_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, STAGING_DIR)
        if self.args.should_save:
            shutil.rmtree(os.path.join(staging_root, name), ignore_errors=True)
            os.makedirs(staging_root, exist_ok=True)
        self.accelerator.wait_for_everyone()
        self._staging_root = staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()  # every process has written its files (RNG state, shards)
        if self.args.should_save:
            publish_directory(os.path.join(staging_root, name), os.path.join(run_dir, name))
            os.rmdir(staging_root)  # empty now
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

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


def publish_directory(staging: str | Path, final: str | Path) -> None:
    """Makes `staging` appear as `final` in one rename, after syncing its files; an existing `final` is replaced."""
    staging, final = Path(staging), Path(final)
    for path in sorted(staging.rglob("*"), reverse=True):
        _fsync(path)
    _fsync(staging)
    replaced = None
    if final.exists():
        replaced = final.with_name(f".{final.name}.replaced")
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(staging, final)
    _fsync(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        descriptor = os.open(path, flags)
    except OSError:  # directories cannot be opened on some platforms
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """`checkpoint-N` directories of `output_dir` holding a trainer state (the file `Trainer` writes last), by N."""
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    found = []
    if Path(output_dir).is_dir():
        for path in Path(output_dir).iterdir():
            match = pattern.match(path.name)
            if match and path.is_dir() and (path / "trainer_state.json").is_file():
                found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


class LossLogCallback(TrainerCallback):
    """Appends every logged training loss to `OUTPUT_DIR/loss_log.csv` (main process). At the start of a run the file
    is rewritten from the trainer state, so after a resume it holds the steps up to the checkpoint, then the new
    ones."""

    FIELDS = ("step", "epoch", "loss", "learning_rate", "grad_norm")

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            with open(self.path, "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, self.FIELDS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(entry for entry in state.log_history if "loss" in entry)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            with open(self.path, "a", newline="", encoding="utf-8") as handle:
                row = {**logs, "step": state.global_step}
                csv.DictWriter(handle, self.FIELDS, extrasaction="ignore").writerow(row)


# --------------------------------------------------------------------------------------------- model set-up


def language_model_lora_targets(model) -> str:
    """A regular expression for PEFT's `target_modules`: every linear layer under `model.language_model.` (by leaf
    name, e.g. q_proj ... down_proj). Anchored at that prefix, it cannot match the vision tower's q_proj / k_proj."""
    names = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if name.startswith(LANGUAGE_MODEL_PREFIX) and isinstance(module, torch.nn.Linear)
        }
    )
    if not names:
        raise ValueError(f"no linear layer found under {LANGUAGE_MODEL_PREFIX!r}: cannot place LoRA adapters")
    return rf"^{re.escape(LANGUAGE_MODEL_PREFIX)}.*\.({'|'.join(map(re.escape, names))})$"


def require_qlora_support() -> None:
    """QLoRA loads the LLM in 4 bits with bitsandbytes, which needs a CUDA GPU."""
    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (none is visible to torch)")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes (pip install bitsandbytes)")
    if missing:
        raise ValueError(f"qlora needs {' and '.join(missing)}; use lora=True (--lora) without quantization instead")


def load_model(model_name_or_path: str, config: TrainingConfig):
    """The checkpoint in float32 (bf16 training uses autocast over float32 weights), or with its LLM in 4 bits
    (NF4, double quantization, bf16 compute) for QLoRA; the vision tower, projector and head stay unquantized."""
    if not config.qlora:
        return AutoModelForImageTextToText.from_pretrained(model_name_or_path, dtype=torch.float32)
    from accelerate import PartialState
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=["vision_tower", PROJECTOR, "lm_head"],
    )
    return AutoModelForImageTextToText.from_pretrained(
        model_name_or_path,
        quantization_config=quantization,
        dtype=torch.bfloat16,
        device_map={"": PartialState().local_process_index},
    )


def configure_trainable(model, config: TrainingConfig):
    """Freezes what the stage freezes; with LoRA, wraps the model in PEFT (adapters on the LLM's linear layers, the
    projector trained in full as a module to save). Returns the model to train."""
    if config.adapter == "scale":
        return add_scale_adapter(model, config)
    trained = PAPER_RECIPES[config.stage].trained_modules
    for name, param in model.named_parameters():
        param.requires_grad = any(name == prefix or name.startswith(prefix + ".") for prefix in trained)
    if not config.lora:
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    lora_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=language_model_lora_targets(model),
        modules_to_save=[PROJECTOR],
        bias="none",
    )
    return get_peft_model(model, lora_config)


def add_scale_adapter(model, config: TrainingConfig):
    """Freezes every weight (vision tower, projector, LLM, head) and wraps the model in PEFT with a ScAle adapter on the
    LLM's attention heads and MLPs (`ms_llava.tuners.scale`); only the scalars train."""
    from peft import get_peft_model

    from ..tuners.scale import ScaleConfig

    model.requires_grad_(False)
    scale_config = ScaleConfig(
        bound=config.scale_bound, token_scope=config.scale_token_scope, layers_to_transform=config.scale_layers
    )
    return get_peft_model(model, scale_config)


def merge_lora_adapter(adapter_dir: str | Path, output_dir: str | Path | None = None, base_model: str | None = None):
    """Loads the base model (`base_model`, default: the one recorded in the adapter), applies the adapter of
    `adapter_dir` with `PeftModel.from_pretrained`, merges it (`merge_and_unload`) and returns the merged model; with
    `output_dir`, also saves it there with the processor, in the HF layout (loadable with `from_pretrained`)."""
    from peft import PeftConfig, PeftModel

    base_path = base_model or PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    base = AutoModelForImageTextToText.from_pretrained(base_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    if output_dir is not None:
        merged.save_pretrained(output_dir)
        AutoProcessor.from_pretrained(str(adapter_dir)).save_pretrained(output_dir)
    return merged


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
        **overrides: any `TrainingConfig` field (`learning_rate=...`, `lora=True`, `resume=True`, ...).

    Raises:
        ValueError: a bad setting, a global batch that the per-device batch and processes do not divide, an output
            directory holding checkpoints without `resume=True`, or bad records (`BadRecordsError`) without
            `skip_bad_records=True`.
    """
    config = TrainingConfig.for_stage(stage, **overrides)
    require_training_extra(lora=config.lora or config.qlora or config.adapter is not None)
    from accelerate import PartialState

    if config.qlora:
        require_qlora_support()
    world_size = launched_world_size()
    per_device, accumulation = config.batch_layout(world_size)
    output_dir = Path(output_dir)
    model_name_or_path = (
        str(Path(model_name_or_path).resolve()) if Path(model_name_or_path).is_dir() else str(model_name_or_path)
    )
    resume_from = _checkpoint_to_resume(output_dir, config)
    args = training_arguments(config, output_dir, per_device, accumulation, world_size)
    state = PartialState()  # set up by TrainingArguments (gloo on CPU, NCCL on GPUs)
    if state.num_processes != world_size:
        raise ValueError(
            f"the launcher started {world_size} processes but the process group has {state.num_processes}"
        )

    processor = AutoProcessor.from_pretrained(model_name_or_path)
    records = load_training_records(data_path, image_folder)
    data_check = _pre_pass(records, processor, config, state)
    if data_check.problems and not config.skip_bad_records:
        raise BadRecordsError(data_check.problems, data_check.num_records)
    if not data_check.kept:
        raise ValueError(f"{records.description}: no record left to train on ({data_check.summary()})")
    _prepare_output_dir(output_dir, config, data_check, resume_from, state)
    _log_main(state, "data: %s: %s", records.description, data_check.summary())
    # A batch of text-only records leaves the projector unused: DDP must then look for unused parameters.
    args.ddp_find_unused_parameters = data_check.num_text_only > 0

    model = configure_trainable(load_model(model_name_or_path, config), config)
    trainable = sum(param.numel() for param in model.parameters() if param.requires_grad)
    _log_main(
        state,
        "stage %s: %s trainable parameters; global batch %d = %d per device x %d accumulation x %d process(es); "
        "lr %g%s",
        config.stage,
        f"{trainable:,}",
        config.global_batch_size,
        per_device,
        accumulation,
        world_size,
        config.learning_rate,
        f" (projector {config.projector_learning_rate:g})" if config.projector_learning_rate else "",
    )
    feature_cache = None
    if config.cache_vision_features:
        feature_cache = _build_feature_cache(model, processor, records, data_check.kept, state)
    trainer = MSLlavaTrainer(
        model=model,
        args=args,
        train_dataset=SupervisedDataset(records, data_check.kept, processor, config.max_length, feature_cache),
        data_collator=RightPaddingCollator(pad_token_id(processor.tokenizer)),
        processing_class=processor,
        callbacks=[LossLogCallback(output_dir / LOSS_LOG), *(callbacks or [])],
        projector_learning_rate=config.projector_learning_rate,
    )
    started = time.perf_counter()
    with cached_vision_tower(model, feature_cache) if feature_cache else contextlib.nullcontext():
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    trainer.save_model(str(output_dir))  # model or adapter, with the processor (main process writes)
    trainer.save_state()  # trainer_state.json with the whole log history
    wall_time = time.perf_counter() - started

    merged_dir = None
    if state.is_main_process and config.lora and (config.merge_lora or config.push_to_hub):
        merged_dir = output_dir / "merged"
        merge_lora_adapter(output_dir, merged_dir)
    if state.is_main_process and config.push_to_hub:
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


def _build_feature_cache(model, processor, records, kept: list[int], state):
    """The frozen tower's features of every distinct image of the kept records (`ms_llava.training.feature_cache`)."""
    from .feature_cache import build_cache, check_cacheable

    check_cacheable(model)
    images = [image for index in kept for image in records[index].images]
    if not images:
        _log_main(state, "vision feature cache: the kept records hold no image, nothing to cache")
        return None
    started = time.perf_counter()
    cache = build_cache(model, processor, images, log=lambda message, *args: _log_main(state, message, *args))
    _log_main(state, "vision feature cache ready in %.1f s", time.perf_counter() - started)
    return cache


def launched_world_size() -> int:
    """The number of processes the launcher (`accelerate launch`, `torchrun`, `mpirun`) started; 1 without one."""
    from accelerate.utils import get_int_from_env

    return get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)


def training_arguments(
    config: TrainingConfig, output_dir: Path, per_device: int, accumulation: int, world_size: int
) -> TrainingArguments:
    """`TrainingArguments` for `config`. Creating them sets up the process group of a multi-process launch."""
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.learning_rate,
        optim="adamw_torch",
        adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2,
        adam_epsilon=config.adam_epsilon,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_ratio,  # transformers 5: a float below 1 is a fraction of the training steps
        seed=config.seed,
        data_seed=config.seed,  # the same shuffled order for any number of processes, and after a resume
        bf16=config.bf16,
        # Without CUDA, several processes (DDP over gloo) and bf16 autocast both need the CPU asked for explicitly.
        use_cpu=not torch.cuda.is_available() and (config.bf16 or world_size > 1),
        activation_checkpointing=config.gradient_checkpointing,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        dataloader_num_workers=config.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=False,
    )


def _log_main(state, message: str, *args) -> None:
    if state.is_main_process:
        logger.info(message, *args)


def _checkpoint_to_resume(output_dir: Path, config: TrainingConfig) -> Path | None:
    checkpoints = complete_checkpoints(output_dir)
    if config.resume:
        if not checkpoints:
            logger.warning("resume: no complete checkpoint in %s; starting from the beginning", output_dir)
            return None
        return checkpoints[-1]
    if checkpoints:
        raise ValueError(
            f"{output_dir} already holds checkpoints ({', '.join(path.name for path in checkpoints)}): pass --resume "
            f"(resume=True) to continue from {checkpoints[-1].name}, or choose another output directory"
        )
    return None


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


def _prepare_output_dir(output_dir: Path, config, data_check: DataCheck, resume_from: Path | None, state) -> None:
    """Checks that a resumed run keeps the settings that shape the loss curve and the same data (every process raises
    alike), then removes what an interrupted save left, records the run's settings and lists the skipped records (or
    removes the list an earlier run left when there are none)."""
    record = {
        **config.curve_settings(),
        "num_examples": len(data_check.kept),
        "data_fingerprint": data_check.fingerprint,
    }
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
    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        staging = output_dir / STAGING_DIR
        if staging.exists():
            logger.warning("removing %s: an incomplete checkpoint left by an interrupted save", staging)
            shutil.rmtree(staging)
        record_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if not data_check.problems:
            (output_dir / SKIPPED_RECORDS).unlink(missing_ok=True)  # an earlier run's list would mislead
        else:
            with open(output_dir / SKIPPED_RECORDS, "w", encoding="utf-8") as handle:
                for problem in data_check.problems:
                    handle.write(json.dumps(problem.to_dict()) + "\n")
            logger.warning(
                "skipping %d bad record(s) (%s); listed in %s",
                len(data_check.problems),
                ", ".join(str(problem) for problem in data_check.problems[:3])
                + (" ..." if len(data_check.problems) > 3 else ""),
                output_dir / SKIPPED_RECORDS,
            )
    state.wait_for_everyone()


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
    commit = push_to_hub(checkpoint_dir, config.push_to_hub, base_model=base_model, training=training)
    logger.info("pushed %s to %s (commit %s)", checkpoint_dir, config.push_to_hub, commit.oid)


# --------------------------------------------------------------------------------------------- command line

# (flag, TrainingConfig field, type, help); every flag defaults to None = the stage recipe's value.
_VALUE_OPTIONS = [
    ("--learning-rate", "learning_rate", float, "peak learning rate (pretrain 1e-3, finetune 1e-5, LoRA 2e-4)"),
    ("--projector-learning-rate", "projector_learning_rate", float, "learning rate of the projector (LoRA: 2e-5)"),
    ("--global-batch-size", "global_batch_size", int, "examples per optimizer step (pretrain 32, finetune 16)"),
    ("--per-device-batch-size", "per_device_batch_size", int, "default: global batch / processes"),
    ("--epochs", "num_train_epochs", float, "default 1"),
    ("--max-steps", "max_steps", int, "stop after this many optimizer steps (the schedule spans them)"),
    ("--save-steps", "save_steps", int, "checkpoint every N steps (default 1000)"),
    ("--save-total-limit", "save_total_limit", int, "checkpoints kept (default 2)"),
    ("--seed", "seed", int, "seed of the initialisation and data order (default 42)"),
    ("--max-length", "max_length", int, "tokens per example, image tokens included (default 2048)"),
    ("--lr-scheduler", "lr_scheduler_type", str, "transformers scheduler name (default cosine)"),
    ("--warmup-ratio", "warmup_ratio", float, "fraction of the steps spent warming up (default 0.03)"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay (default 0)"),
    ("--max-grad-norm", "max_grad_norm", float, "gradient clipping norm (default 1.0)"),
    ("--logging-steps", "logging_steps", int, "log the loss every N steps (default 1)"),
    ("--num-workers", "dataloader_num_workers", int, "data loader worker processes (default 4)"),
    ("--lora-r", "lora_r", int, "LoRA rank (default 128)"),
    ("--lora-alpha", "lora_alpha", int, "LoRA alpha (default 256)"),
    ("--lora-dropout", "lora_dropout", float, "LoRA dropout (default 0.05)"),
    ("--push-to-hub", "push_to_hub", str, "upload the result to this Hub repository (org/name) when done"),
    ("--adapter", "adapter", str, "train an adapter instead of the model: lora (= --lora) or scale (ScAle)"),
    ("--scale-bound", "scale_bound", float, "ScAle: b in s = 1 + b*tanh(theta), in (0, 1] (default 1.0)"),
    ("--scale-token-scope", "scale_token_scope", str, "ScAle: last (default) or all"),
    ("--scale-layers", "scale_layers", None, "ScAle: comma-separated decoder layer indices (default: all)"),
]
_FLAG_OPTIONS = [
    ("--bf16", "bf16", "bf16 mixed precision (autocast; weights and optimizer stay float32)"),
    ("--gradient-checkpointing", "gradient_checkpointing", "recompute activations in the backward pass"),
    ("--resume", "resume", "continue from the last complete checkpoint in --output-dir"),
    (
        "--cache-vision-features",
        "cache_vision_features",
        "run the frozen vision tower once per distinct image file and reuse its features (same losses, faster)",
    ),
    ("--skip-bad-records", "skip_bad_records", "skip records the pre-pass rejects (counted in the log)"),
    (
        "--verify-images",
        "verify_images",
        "also decode every image in full in the pre-pass, embedded bytes included (slower)",
    ),
    ("--lora", "lora", "LoRA on the language model; the projector trains fully (finetune only)"),
    ("--qlora", "qlora", "QLoRA: LoRA over a 4-bit LLM (needs a CUDA GPU and bitsandbytes)"),
    ("--merge-lora", "merge_lora", "also write the merged model to OUTPUT_DIR/merged"),
]


def _layer_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer indices such as 0,1,5, got {text!r}"
        ) from None


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", required=True, choices=sorted(PAPER_RECIPES), help="the recipe stage to run")
    parser.add_argument("--model", required=True, help="MS-LLaVA checkpoint to start from (directory or Hub id)")
    parser.add_argument("--data", required=True, help="LLaVA JSON, messages+images file, or a save_to_disk folder")
    parser.add_argument("--image-folder", help="folder the image paths are relative to (default: the data's folder)")
    parser.add_argument("--output-dir", required=True, help="checkpoints, logs and the final model")
    for flag, field, kind, help_text in _VALUE_OPTIONS:
        parser.add_argument(flag, dest=field, type=kind or _layer_list, default=None, help=help_text)
    for flag, field, help_text in _FLAG_OPTIONS:
        parser.add_argument(flag, dest=field, action="store_true", default=None, help=help_text)
    parser.set_defaults(handler=_train_command)


_DESCRIPTION = (
    "Train MS-LLaVA with the paper's two-stage recipe (Sec. 4.1). pretrain: only the projector trains (AdamW, lr "
    "1e-3, global batch 32, 1 epoch); finetune: projector and LLM train, vision tower frozen (lr 1e-5, global batch "
    "16, 1 epoch). Every option overrides the recipe. Runs under `accelerate launch` for several processes."
)


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Registers `train` on an argparse subparsers object (`ms-llava train --stage ... --model ... ...`); the parsed
    arguments' `handler(args)` runs it and returns the exit status."""
    parser = subparsers.add_parser("train", help="train with the paper's two-stage recipe", description=_DESCRIPTION)
    _add_arguments(parser)
    return parser


def _train_command(args: argparse.Namespace) -> int:
    """Handler of `ms-llava train`: 0 on success, 2 on a bad setting or bad data."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    fields = [field for _, field, *_ in _VALUE_OPTIONS] + [field for _, field, _ in _FLAG_OPTIONS]
    overrides = {field: getattr(args, field) for field in fields if getattr(args, field) is not None}
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
            f"({len(result.skipped)} skipped), {final_loss}{result.wall_time_s:.1f} s; "
            f"{what} and processor in {result.output_dir}"
            + (f", merged model in {result.merged_dir}" if result.merged_dir else "")
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m ms_llava.training --stage ... ` (the same options as `ms-llava train`)."""
    parser = argparse.ArgumentParser(prog="python -m ms_llava.training", description=_DESCRIPTION)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    return args.handler(args)
