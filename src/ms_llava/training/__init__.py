"""`ms-llava train`: the paper's two-stage recipe (`ms_llava.recipes`) on transformers' `Trainer`. `arguments`: the
options; `trainer`: `train()`, the command, the training record, checkpoints and resume; `adapters`: what trains (LoRA,
QLoRA, ScAle); `data`: the records, their pre-pass and labels; `feature_cache`: the vision tower's features, once per
image. `python -m ms_llava.training ...` = `ms-llava train ...` (for `accelerate launch -m`, `torchrun -m`)."""

from .adapters import merge_lora_adapter  # first: holds back bitsandbytes' import-time CPU kernel line
from .arguments import MSLlavaTrainingArguments, add_arguments
from .trainer import TrainResult, run, train

__all__ = ["MSLlavaTrainingArguments", "TrainResult", "add_arguments", "merge_lora_adapter", "run", "train"]
