"""Training MS-LLaVA: the paper's two-stage recipe (`ms_llava.recipes`) on transformers' `Trainer`.

- `arguments`: the options, a `TrainingArguments` subclass with the recipe as preset, and their command line;
- `trainer`: `train()` and `ms-llava train`, complete checkpoints and resume;
- `adapters`: what trains: the stage's modules, LoRA / QLoRA on the LLM, or ScAle's scalars; merging LoRA;
- `data`: LLaVA JSON and messages + images records, the pre-pass that names bad records, the assistant-only labels;
- `feature_cache`: the frozen vision tower's features computed once per distinct image.

`python -m ms_llava.training ...` takes the options of `ms-llava train` (for `accelerate launch -m`).
"""

from .adapters import merge_lora_adapter
from .arguments import MSLlavaTrainingArguments, TrainingConfig
from .trainer import TrainResult, add_cli, main, train

__all__ = [
    "MSLlavaTrainingArguments",
    "TrainResult",
    "TrainingConfig",
    "add_cli",
    "main",
    "merge_lora_adapter",
    "train",
]
