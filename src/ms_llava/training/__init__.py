"""Training MS-LLaVA: the paper's two-stage recipe (`ms_llava.recipes`) on transformers' `Trainer`.

- `trainer`: `train()` and `ms-llava train`, the trainer, LoRA / QLoRA / ScAle adapters, atomic checkpoints, resume;
- `data`: LLaVA JSON and messages + images records, the pre-pass that names bad records, the assistant-only labels;
- `feature_cache`: the frozen vision tower's features computed once per distinct image.

`python -m ms_llava.training ...` takes the options of `ms-llava train` (for `accelerate launch -m`).
"""

from .trainer import TrainingConfig, TrainResult, add_cli, main, merge_lora_adapter, train

__all__ = ["TrainResult", "TrainingConfig", "add_cli", "main", "merge_lora_adapter", "train"]
