"""The options of a run: `MSLlavaTrainingArguments`, a `TrainingArguments` subclass with the paper's recipe
(`ms_llava.recipes`) as preset; `add_arguments` makes them `ms-llava train`'s options with `HfArgumentParser`'s field
parser, so a new option is one field here.
"""

import argparse
import copy
import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field

import torch
from accelerate.utils import get_int_from_env
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import SchedulerType

from ..recipes import PAPER_RECIPES, preset

ADAPTERS = ("lora", "scale")
LISTED_INHERITED_OPTIONS = ("max_steps", "seed", "weight_decay", "max_grad_norm", "bf16")  # the other 90 are unlisted
# data-loader workers start again every epoch: below this many steps per epoch, or with one core per process, the data
# load in the training process (docs/training.md has the measurements)
WORKERS_MIN_STEPS_PER_EPOCH, WORKERS_MAX = 10, 4


def option(default, text: str, **metadata):
    return field(default=default, metadata={"help": text, **metadata})


def launched_world_size() -> int:
    """The number of processes the launcher (`accelerate launch`, `torchrun`, `mpirun`) started; 1 without one."""
    return get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)


def default_num_workers(num_examples: int, global_batch_size: int, processes_here: int = 1) -> int:
    """Data-loader workers when none are given: 0 when an epoch has fewer than `WORKERS_MIN_STEPS_PER_EPOCH` steps
    (the workers' start costs more than they save) or a process has one core; else one per spare core, 4 at most."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    spare = cores // max(processes_here, 1) - 1
    small = num_examples < WORKERS_MIN_STEPS_PER_EPOCH * global_batch_size
    return 0 if small or spare < 1 else min(spare, WORKERS_MAX)


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
class MSLlavaTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the paper's recipe as preset: an option left at None takes `stage`'s value (LoRA's or
    ScAle's where those train), and the batch is given globally. `for_stage(stage, **overrides)` builds one, as
    `train()` does. Creating one sets up the process group of a multi-process launch."""

    stage: str | None = option(None, "the recipe stage", choices=sorted(PAPER_RECIPES), required=True)
    output_dir: str | None = option(None, "checkpoints, logs and the final model", required=True)
    learning_rate: float | None = option(None, "peak learning rate (pretrain 1e-3, finetune 1e-5, LoRA 2e-4)")
    projector_learning_rate: float | None = option(None, "the projector's (default: the learning rate; LoRA 2e-5)")
    global_batch_size: int | None = option(None, "examples per optimizer step (pretrain 32, finetune 16)")
    per_device_batch_size: int | None = option(None, "default: global batch / processes (no accumulation)")
    num_train_epochs: float | None = option(None, "default 1", aliases=["--epochs"])
    # Where the paper is silent: LLaVA-1.5's training scripts.
    lr_scheduler_type: SchedulerType | str = option(
        "cosine", "scheduler (default cosine)", aliases=["--lr-scheduler"], metavar="NAME"
    )
    warmup_ratio: float = option(0.03, "fraction of the steps spent warming up (default 0.03)")
    optim: str = option("adamw_torch", "optimizer (default adamw_torch, as LLaVA-1.5)")
    max_length: int | None = option(2048, "tokens per example, image tokens included (default 2048)")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass")
    save_steps: int = option(1000, "checkpoint every N steps (default 1000)")
    save_total_limit: int | None = option(2, "checkpoints kept (default 2)")
    logging_steps: int = option(1, "log the loss every N steps (default 1)")
    dataloader_num_workers: int | None = option(
        None,
        f"data-loader worker processes (default: 0 when an epoch has fewer than {WORKERS_MIN_STEPS_PER_EPOCH} steps "
        f"or a process has one CPU core, else one per spare core, at most {WORKERS_MAX})",
        aliases=["--num-workers"],
    )
    disable_tqdm: bool | None = option(False, "no progress bar")
    resume: bool = option(False, "continue from the last complete checkpoint in --output-dir")
    skip_bad_records: bool = option(False, "skip the records the pre-pass rejects (listed)")
    verify_images: bool = option(False, "decode every image in full in the pre-pass (slower)")
    cache_vision_features: bool = option(False, "run the frozen vision tower once per distinct image (same losses)")
    # the repository the final model goes to once, with a model card (Trainer's own would push every checkpoint)
    push_to_hub: str | None = option(None, "upload the result to this Hub repository")
    adapter: str | None = option(None, "train an adapter: lora (= --lora) or scale (ScAle)")
    lora: bool = option(False, "LoRA on the LLM; the projector trains fully (finetune only)")
    qlora: bool = option(False, "QLoRA: LoRA over a 4-bit LLM (bitsandbytes; CPU or GPU)")
    lora_r: int = option(128, "LoRA rank (default 128)")
    lora_alpha: int = option(256, "LoRA alpha (default 256)")
    lora_dropout: float = option(0.05, "LoRA dropout (default 0.05)")
    merge_lora: bool = option(False, "also write the merged model to OUTPUT_DIR/merged")
    scale_bound: float = option(1.0, "ScAle: b in s = 1 + b*tanh(theta), in (0, 1]")
    scale_token_scope: str = option("last", "ScAle: last (default) or all")
    scale_layers: list[int] | None = option(None, "ScAle: layers such as 0,2 (default: all)")
    # Derived in __post_init__, so not options themselves.
    per_device_train_batch_size: int = field(default=8, init=False)
    gradient_accumulation_steps: int = field(default=1, init=False)
    warmup_steps: float = field(default=0, init=False)
    data_seed: int | None = field(default=None, init=False)
    activation_checkpointing: bool | None = field(default=None, init=False)
    remove_unused_columns: bool = field(default=False, init=False)  # the collator needs every column
    resume_from_checkpoint: str | None = field(default=None, init=False)  # `resume` picks the checkpoint

    @classmethod
    def for_stage(cls, stage: str, **overrides) -> "MSLlavaTrainingArguments":
        """`stage`'s recipe with `overrides` (options by field name); unknown names and bad values raise ValueError."""
        unknown = sorted(set(overrides) - OPTIONS)
        if unknown:
            close = sorted({match for name in unknown for match in difflib.get_close_matches(name, OPTIONS, n=2)})
            raise ValueError(
                f"unknown training option(s) {unknown}" + (f"; did you mean {', '.join(close)}?" * bool(close))
            )
        scale_options = sorted(name for name in overrides if name.startswith("scale_"))
        if scale_options and overrides.get("adapter") != "scale":
            raise ValueError(
                f"{', '.join(scale_options)} set ScAle options, which need adapter='scale' "
                f"(got {overrides.get('adapter')!r})"
            )
        if overrides.get("adapter") == "lora" and overrides.get("lora") is False:
            raise ValueError("adapter='lora' and lora=False contradict each other")
        return cls(stage=stage, **overrides)

    def __post_init__(self):
        if self.stage not in PAPER_RECIPES:
            raise ValueError(f"stage must be one of {sorted(PAPER_RECIPES)}, got {self.stage!r}")
        self.lora = self.lora or self.qlora or self.adapter == "lora"
        self.adapter = "lora" if self.lora and self.adapter is None else self.adapter
        for name, value in preset(self.stage, self.adapter).items():
            setattr(self, name, value if getattr(self, name) is None else getattr(self, name))
        self.max_steps = -1 if self.max_steps is None else self.max_steps  # TrainingArguments' "no limit"
        self.validate()
        world_size = launched_world_size()
        self.per_device_train_batch_size, self.gradient_accumulation_steps = self.batch_layout(world_size)
        self.warmup_steps = self.warmup_ratio  # transformers 5: a float below 1 is a fraction of the steps
        self.data_seed = self.seed  # the same shuffled order for any number of processes, and after a resume
        self.activation_checkpointing = self.gradient_checkpointing
        if isinstance(self.push_to_hub, str):
            self.hub_model_id, self.push_to_hub = self.push_to_hub, False
        # Without CUDA, several processes (DDP over gloo) and bf16 autocast both need the CPU asked for explicitly.
        self.use_cpu = self.use_cpu or (not torch.cuda.is_available() and (self.bf16 or world_size > 1))
        self.dataloader_pin_memory = self.dataloader_pin_memory and torch.cuda.is_available()
        self.auto_num_workers = self.dataloader_num_workers is None  # `train` picks them once the data are known
        self.dataloader_num_workers = self.dataloader_num_workers or 0
        super().__post_init__()

    def validate(self) -> None:
        optional = {"per_device_batch_size", "max_steps", "projector_learning_rate", "max_length", "save_total_limit"}
        integers = {"global_batch_size", "save_steps", "logging_steps", "lora_r", "per_device_batch_size"}
        for name in sorted(optional | integers | {"learning_rate", "num_train_epochs", "lora_alpha"}):
            value = getattr(self, name)
            if name in optional and (value is None or (name == "max_steps" and value == -1)):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
            if name in integers and not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in ("warmup_ratio", "lora_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if (self.dataloader_num_workers or 0) < 0:
            raise ValueError(f"dataloader_num_workers must be >= 0, got {self.dataloader_num_workers!r}")
        if self.lora and self.stage == "pretrain":
            raise ValueError("lora adapts the language model, which the 'pretrain' stage keeps frozen: use 'finetune'")
        if self.merge_lora and not self.lora:
            raise ValueError("merge_lora needs lora=True")
        if self.adapter not in (None, *ADAPTERS):
            raise ValueError(f"adapter must be one of {list(ADAPTERS)} or None, got {self.adapter!r}")
        if self.adapter != "scale":
            return
        conflicts = {"lora": self.lora, "qlora": self.qlora, "projector_learning_rate": self.projector_learning_rate}
        conflicts["push_to_hub"] = self.push_to_hub or self.hub_model_id
        conflicting = ", ".join(f"{name}={value!r}" for name, value in conflicts.items() if value)
        if conflicting:
            raise ValueError(
                f"adapter='scale' cannot be combined with {conflicting}: ScAle freezes the whole model, projector "
                "included, is not LoRA, and its 'last' scope cannot be merged (push its folder with huggingface_hub)"
            )
        if self.stage != "finetune":
            raise ValueError(f"adapter='scale' adapts a trained model: use stage 'finetune', got {self.stage!r}")
        bound, layers = self.scale_bound, self.scale_layers
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not 0 < bound <= 1:
            raise ValueError(f"scale_bound must be a number in (0, 1], got {bound!r}")
        if self.scale_token_scope not in ("last", "all"):
            raise ValueError(f"scale_token_scope must be 'last' or 'all', got {self.scale_token_scope!r}")
        if layers is not None and not (layers and all(type(i) is int and i >= 0 for i in layers)):
            raise ValueError(f"scale_layers must be a non-empty list of non-negative layer indices, got {layers!r}")

    def batch_layout(self, world_size: int) -> tuple[int, int]:
        """`(per-device batch, gradient accumulation steps)` whose product x `world_size` is the global batch."""
        per_device = self.per_device_batch_size
        if per_device is None:
            if self.global_batch_size % world_size:
                raise ValueError(
                    f"global batch size {self.global_batch_size} is not divisible by the {world_size} "
                    "processes; choose a global batch size that is"
                )
            per_device = self.global_batch_size // world_size
        return per_device, gradient_accumulation_steps(self.global_batch_size, per_device, world_size)


# The options `for_stage` and `train()` take, by field name (`stage` is an argument of its own).
OPTIONS = frozenset(item.name for item in dataclasses.fields(MSLlavaTrainingArguments) if item.init) - {"stage"}


def _layer_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer indices such as 0,1,5, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`ms-llava train`'s options: the checkpoint and data, and every field of `MSLlavaTrainingArguments`, declared as
    `HfArgumentParser` declares it (there is no public call for one field); an option left out parses to None, so that
    `train()` fills in the stage recipe's value."""
    parser.description = (
        "Train MS-LLaVA with the paper's two-stage recipe (Sec. 4.1). pretrain: only the projector trains (AdamW, lr "
        "1e-3, global batch 32, 1 epoch); finetune: projector and LLM train, vision tower frozen (lr 1e-5, global "
        "batch 16, 1 epoch). Every option overrides the recipe. Runs under `accelerate launch` for several processes. "
        "The other options of transformers' TrainingArguments (--optim, --report_to, ...) are taken but not listed."
    )
    parser.add_argument("--model", required=True, help="MS-LLaVA checkpoint to start from (folder or Hub id)")
    parser.add_argument("--data", required=True, help="LLaVA JSON, messages+images file, or a save_to_disk folder")
    parser.add_argument("--image_folder", "--image-folder", help="the images' folder (default: the data's)")
    listed = {*MSLlavaTrainingArguments.__annotations__, *LISTED_INHERITED_OPTIONS}
    hints = typing.get_type_hints(MSLlavaTrainingArguments)
    for item in dataclasses.fields(MSLlavaTrainingArguments):
        if item.init:
            item = copy.copy(item)  # the parser rewrites the field's type
            item.type = _layer_list if item.name == "scale_layers" else hints[item.name]
            if item.name not in listed:
                item.metadata = {**item.metadata, "help": argparse.SUPPRESS}
            HfArgumentParser._parse_dataclass_field(parser, item)
    parser.set_defaults(**dict.fromkeys(OPTIONS))
