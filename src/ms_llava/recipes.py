"""The paper's training recipe (Sec. 4.1) as data: what each stage trains and its hyper-parameters, and the defaults
of the adapters the paper does not use. Read by the training options (`ms_llava.training.arguments`) and the model
card (`ms_llava.hub`); imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass

PROJECTOR = "multi_modal_projector"


@dataclass(frozen=True)
class StageRecipe:
    """One stage of the paper's recipe: what trains (parameter-name prefixes; the rest is frozen) and how."""

    trained_modules: tuple[str, ...]
    learning_rate: float
    global_batch_size: int
    num_train_epochs: float


PAPER_RECIPES = {  # StageRecipe(trained modules, learning rate, global batch size, epochs)
    # projector pre-training on image-caption pairs (LLaVA-1.5's 558K); vision tower and LLM frozen
    "pretrain": StageRecipe((f"model.{PROJECTOR}",), 1e-3, 32, 1.0),
    # instruction tuning (LLaVA-1.5's 665K); projector and LLM train, vision tower frozen
    "finetune": StageRecipe((f"model.{PROJECTOR}", "model.language_model", "lm_head"), 1e-5, 16, 1.0),
}

# LLaVA-1.5's LoRA recipe (scripts/v1_5/finetune_lora.sh): the paper trains no adapters.
LORA_DEFAULTS = {"learning_rate": 2e-4, "projector_learning_rate": 2e-5}
# ScAle (docs/scale.md): a few hundred bounded scalars need a learning rate far above LoRA's to move in one epoch.
SCALE_DEFAULTS = {"learning_rate": 2e-2}


def preset(stage: str, adapter: str | None = None) -> dict:
    """The option values a run of `stage` starts from (`adapter`: None, "lora" or "scale"), by option name."""
    recipe = PAPER_RECIPES[stage]
    values = {name: getattr(recipe, name) for name in ("learning_rate", "global_batch_size", "num_train_epochs")}
    return {**values, **{"lora": LORA_DEFAULTS, "scale": SCALE_DEFAULTS}.get(adapter, {})}
