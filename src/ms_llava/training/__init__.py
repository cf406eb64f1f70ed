"""`ms-llava train`: the paper's two-stage recipe (`ms_llava.recipes`) on transformers' `Trainer`.

- `arguments`: the options, a `TrainingArguments` subclass with the recipe as preset;
- `trainer`: `train()`, the command (`add_arguments`, `run`), the training record, checkpoints and resume;
- `adapters`: what trains (the stage's modules, LoRA / QLoRA on the LLM, ScAle's scalars); merging LoRA;
- `data`: LLaVA JSON and messages + images records, the pre-pass that names bad records, assistant-only labels;
- `feature_cache`: the frozen vision tower's features computed once per distinct image.

`python -m ms_llava.training ...` = `ms-llava train ...` (for `accelerate launch -m`, `torchrun -m`).
"""

from .adapters import merge_lora_adapter  # first: holds back bitsandbytes' import-time CPU kernel line
from .arguments import MSLlavaTrainingArguments, add_arguments
from .trainer import TrainResult, run, train

__all__ = ["MSLlavaTrainingArguments", "TrainResult", "add_arguments", "merge_lora_adapter", "run", "train"]
