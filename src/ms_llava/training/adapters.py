"""What trains in a run: the stage's frozen and trained modules, or an adapter instead of the model (LoRA on the LLM,
QLoRA over a 4-bit LLM, ScAle's per-head and per-MLP scalars), and merging a LoRA adapter back into its base model.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from ..recipes import PAPER_RECIPES, PROJECTOR

LANGUAGE_MODEL_PREFIX = "model.language_model."


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


def load_model(model_name_or_path: str, config):
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


def configure_trainable(model, config):
    """Freezes what the stage freezes; with LoRA, wraps the model in PEFT (adapters on the LLM's linear layers, the
    projector trained in full as a module to save); with ScAle, see `add_scale_adapter`. Returns the model to train."""
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


def add_scale_adapter(model, config):
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
