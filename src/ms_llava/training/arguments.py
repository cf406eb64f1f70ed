"""The options of a training run: `MSLlavaTrainingArguments`, a `transformers.TrainingArguments` subclass whose
`stage` selects the paper's recipe (`ms_llava.recipes`) as a preset, and `ModelDataArguments` (what to train on).
`train_argument_parser()` turns both into `ms-llava train`'s options with `HfArgumentParser`; a new option is one
field here.
"""

import argparse
import dataclasses
import difflib
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import SchedulerType

from ..recipes import PAPER_RECIPES, preset

ADAPTERS = ("lora", "scale")


def launched_world_size() -> int:
    """The number of processes the launcher (`accelerate launch`, `torchrun`, `mpirun`) started; 1 without one."""
    from accelerate.utils import get_int_from_env

    return get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)


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
class ModelDataArguments:
    """What a run starts from and trains on (`ms-llava train --model ... --data ...`)."""

    model: str = field(metadata={"help": "MS-LLaVA checkpoint to start from (directory or Hub id)"})
    data: str = field(metadata={"help": "LLaVA JSON, messages+images file, or a save_to_disk folder"})
    image_folder: str | None = field(
        default=None, metadata={"help": "folder the image paths are relative to (default: the data's folder)"}
    )


def _help(text: str, **metadata) -> dict:
    return {"help": text, **metadata}


@dataclass
class MSLlavaTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the paper's recipe as preset: every option left at None takes the value of `stage`'s
    recipe (with LoRA's or ScAle's defaults where those train), and the batch is given globally. The fields below are
    ms-llava's own or `TrainingArguments` fields whose default differs; `MSLlavaTrainingArguments.for_stage(stage,
    **overrides)` builds one from keyword overrides (what `train()` takes). docs/training.md gives each default's source.

    Creating one sets up the process group of a multi-process launch (as `TrainingArguments` does).
    """

    stage: str | None = field(
        default=None, metadata=_help("the recipe stage to run", choices=sorted(PAPER_RECIPES), required=True)
    )
    output_dir: str | None = field(
        default=None, metadata=_help("checkpoints, logs and the final model", required=True)
    )
    # The recipe's (None: the stage's value).
    learning_rate: float | None = field(
        default=None, metadata=_help("peak learning rate (pretrain 1e-3, finetune 1e-5, LoRA 2e-4)")
    )
    projector_learning_rate: float | None = field(
        default=None, metadata=_help("learning rate of the projector (default: the learning rate; LoRA: 2e-5)")
    )
    global_batch_size: int | None = field(
        default=None, metadata=_help("examples per optimizer step (pretrain 32, finetune 16)")
    )
    per_device_batch_size: int | None = field(
        default=None, metadata=_help("default: global batch / processes (no gradient accumulation)")
    )
    num_train_epochs: float | None = field(default=None, metadata=_help("default 1", aliases=["--epochs"]))
    # Where the paper is silent: LLaVA-1.5's training scripts.
    lr_scheduler_type: SchedulerType | str = field(
        default="cosine",
        metadata=_help("transformers scheduler name (default cosine)", aliases=["--lr-scheduler"], metavar="NAME"),
    )
    warmup_ratio: float = field(default=0.03, metadata=_help("fraction of the steps spent warming up (default 0.03)"))
    optim: str = field(default="adamw_torch", metadata=_help("optimizer (default adamw_torch, as LLaVA-1.5)"))
    max_length: int | None = field(
        default=2048, metadata=_help("tokens per example, image tokens included (default 2048)")
    )
    # Run management.
    gradient_checkpointing: bool = field(default=False, metadata=_help("recompute activations in the backward pass"))
    save_steps: int = field(default=1000, metadata=_help("checkpoint every N steps (default 1000)"))
    save_total_limit: int | None = field(default=2, metadata=_help("checkpoints kept (default 2)"))
    logging_steps: int = field(default=1, metadata=_help("log the loss every N steps (default 1)"))
    dataloader_num_workers: int = field(
        default=4, metadata=_help("data loader worker processes (default 4)", aliases=["--num-workers"])
    )
    disable_tqdm: bool | None = field(default=False, metadata=_help("no progress bar"))
    resume: bool = field(default=False, metadata=_help("continue from the last complete checkpoint in --output-dir"))
    skip_bad_records: bool = field(
        default=False, metadata=_help("skip records the pre-pass rejects (counted in the log)")
    )
    verify_images: bool = field(
        default=False,
        metadata=_help("also decode every image in full in the pre-pass, embedded bytes included (slower)"),
    )
    cache_vision_features: bool = field(
        default=False,
        metadata=_help(
            "run the frozen vision tower once per distinct image file and reuse its features (same losses, faster)"
        ),
    )
    # `Trainer` would push every checkpoint itself when `push_to_hub` is true; here it names the repository that the
    # final model goes to once, with a model card (`ms_llava.hub.push_to_hub`), and is moved to `hub_model_id`.
    push_to_hub: str | None = field(
        default=None, metadata=_help("upload the result to this Hub repository (org/name) when done")
    )
    # Parameter-efficient fine-tuning (finetune stage only).
    adapter: str | None = field(
        default=None, metadata=_help("train an adapter instead of the model: lora (= --lora) or scale (ScAle)")
    )
    lora: bool = field(
        default=False, metadata=_help("LoRA on the language model; the projector trains fully (finetune only)")
    )
    qlora: bool = field(
        default=False, metadata=_help("QLoRA: LoRA over a 4-bit LLM (needs bitsandbytes; runs on CPU or GPU)")
    )
    lora_r: int = field(default=128, metadata=_help("LoRA rank (default 128)"))
    lora_alpha: int = field(default=256, metadata=_help("LoRA alpha (default 256)"))
    lora_dropout: float = field(default=0.05, metadata=_help("LoRA dropout (default 0.05)"))
    merge_lora: bool = field(default=False, metadata=_help("also write the merged model to OUTPUT_DIR/merged"))
    scale_bound: float = field(
        default=1.0, metadata=_help("ScAle: b in s = 1 + b*tanh(theta), in (0, 1] (default 1.0)")
    )
    scale_token_scope: str = field(default="last", metadata=_help("ScAle: last (default) or all"))
    scale_layers: list[int] | None = field(
        default=None, metadata=_help("ScAle: comma-separated decoder layer indices (default: all)")
    )
    # Derived from the options above in __post_init__, so not options themselves.
    per_device_train_batch_size: int = field(default=8, init=False)
    gradient_accumulation_steps: int = field(default=1, init=False)
    warmup_steps: float = field(default=0, init=False)
    data_seed: int | None = field(default=None, init=False)
    activation_checkpointing: bool | None = field(default=None, init=False)
    remove_unused_columns: bool = field(default=False, init=False)  # the collator needs every column
    resume_from_checkpoint: str | None = field(default=None, init=False)  # `resume` picks the checkpoint

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
    def for_stage(cls, stage: str, **overrides) -> "MSLlavaTrainingArguments":
        """The paper's recipe for `stage` with `overrides` (any option, by field name) applied; unknown names and bad
        values raise ValueError."""
        known = {item.name for item in dataclasses.fields(cls) if item.init} - {"stage"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            close = sorted({match for name in unknown for match in difflib.get_close_matches(name, known, n=2)})
            raise ValueError(
                f"unknown training option(s) {unknown}" + (f"; did you mean {', '.join(close)}?" if close else "")
            )
        adapter = overrides.get("adapter")
        scale_options = sorted(name for name in overrides if name.startswith("scale_"))
        if scale_options and adapter != "scale":
            raise ValueError(
                f"{', '.join(scale_options)} set ScAle options, which need adapter='scale' (got {adapter!r})"
            )
        if adapter == "lora" and overrides.get("lora") is False:
            raise ValueError("adapter='lora' and lora=False contradict each other")
        return cls(stage=stage, **overrides)

    def __post_init__(self):
        if self.stage not in PAPER_RECIPES:
            raise ValueError(f"stage must be one of {sorted(PAPER_RECIPES)}, got {self.stage!r}")
        if self.qlora or self.adapter == "lora":
            self.lora = True
        if self.lora and self.adapter is None:
            self.adapter = "lora"
        for name, value in preset(self.stage, self.adapter).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.max_steps is None:
            self.max_steps = -1  # TrainingArguments' "no limit"
        if self.scale_layers is not None:
            self.scale_layers = list(self.scale_layers)
        self.validate()
        world_size = launched_world_size()
        self.per_device_train_batch_size, self.gradient_accumulation_steps = self.batch_layout(world_size)
        self.warmup_steps = self.warmup_ratio  # transformers 5: a float below 1 is a fraction of the training steps
        self.data_seed = self.seed  # the same shuffled order for any number of processes, and after a resume
        self.activation_checkpointing = self.gradient_checkpointing
        if isinstance(self.push_to_hub, str):
            self.hub_model_id, self.push_to_hub = self.push_to_hub, False
        # Without CUDA, several processes (DDP over gloo) and bf16 autocast both need the CPU asked for explicitly.
        self.use_cpu = self.use_cpu or (not torch.cuda.is_available() and (self.bf16 or world_size > 1))
        self.dataloader_pin_memory = self.dataloader_pin_memory and torch.cuda.is_available()
        super().__post_init__()

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
            "max_steps": None if self.max_steps == -1 else self.max_steps,
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
            "push_to_hub": self.push_to_hub or self.hub_model_id,
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
        settings = {name: getattr(self, name) for name in self.CURVE_FIELDS}
        settings["lr_scheduler_type"] = SchedulerType(self.lr_scheduler_type).value
        settings["max_steps"] = None if self.max_steps == -1 else self.max_steps  # as run records have it
        return settings


TrainingConfig = MSLlavaTrainingArguments  # the name train()'s callers and docs use

# TrainingArguments options that `ms-llava train --help` lists besides the ones declared above; the other inherited
# ones (90) parse but are left out of the help, which would otherwise list them beside the ones ms-llava documents.
LISTED_INHERITED_OPTIONS = ("max_steps", "seed", "weight_decay", "max_grad_norm", "bf16")


def _layer_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer indices such as 0,1,5, got {text!r}"
        ) from None


def train_argument_parser(**kwargs) -> HfArgumentParser:
    """`HfArgumentParser` over `ModelDataArguments` and `MSLlavaTrainingArguments` (`kwargs` go to it). Every option
    defaults to None, so that `train()` fills in the stage recipe's value for what the command line leaves out."""
    # conflict_handler="resolve": --scale-layers is re-added below with its comma-separated form (HfArgumentParser
    # makes a list field take space-separated values).
    parser = HfArgumentParser((ModelDataArguments, MSLlavaTrainingArguments), conflict_handler="resolve", **kwargs)
    help_of = {item.name: item.metadata.get("help") for item in dataclasses.fields(MSLlavaTrainingArguments)}
    parser.add_argument(
        "--scale-layers", "--scale_layers", dest="scale_layers", type=_layer_list, help=help_of["scale_layers"]
    )
    listed = {
        *(item.name for item in dataclasses.fields(ModelDataArguments)),
        *MSLlavaTrainingArguments.__annotations__,
        *LISTED_INHERITED_OPTIONS,
    }
    for action in parser._actions:
        if action.dest not in listed and action.option_strings and action.dest != "help":
            action.help = argparse.SUPPRESS
        # usage and help name an option by its first spelling: the dashed one ms-llava documents, not --name_like_this
        action.option_strings.sort(key=lambda option: ("_" in option, len(option)))
    parser.set_defaults(**{item.name: None for item in dataclasses.fields(MSLlavaTrainingArguments) if item.init})
    return parser
