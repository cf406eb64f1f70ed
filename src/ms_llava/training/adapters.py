"""What trains in a run: the stage's frozen and trained modules, or an adapter instead of the model (LoRA on the LLM,
QLoRA over a 4-bit LLM, ScAle's per-head and per-MLP scalars), and merging a LoRA adapter back into its base model.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from ..recipes import PAPER_RECIPES, PROJECTOR

logger = logging.getLogger(__name__)

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
    """QLoRA loads the LLM in 4 bits with bitsandbytes (0.50 and later run 4-bit layers on CPU as well as on GPU)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            "qlora needs bitsandbytes (pip install 'bitsandbytes>=0.50'); use lora=True (--lora) without quantization "
            "instead"
        )


# bitsandbytes' CPU backend logs this when it is imported (peft imports it, and transformers' Trainer imports peft):
# it could not load the fused 4-bit kernel that `kernels` fetches from kernels-community on the Hub.
BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
MISSING_CPU_KERNEL_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _MissingCpuKernelFilter(logging.Filter):
    """Holds back bitsandbytes' import-time warning about its missing fused CPU kernel (printed whenever peft is
    imported, quantizing or not) and keeps its reason; `load_model` says it once, plainly, when it quantizes on CPU."""

    def __init__(self):
        super().__init__()
        self.reason: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(MISSING_CPU_KERNEL_MESSAGE):
            self.reason = str(record.args[0]) if record.args else record.getMessage()
            return False
        return True


def hold_back_bitsandbytes_cpu_kernel_warning() -> _MissingCpuKernelFilter:
    """Installs the filter on bitsandbytes' CPU logger (once; it works before bitsandbytes is imported, as loggers
    exist by name) and returns it."""
    bnb_logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    for existing in bnb_logger.filters:
        if isinstance(existing, _MissingCpuKernelFilter):
            return existing
    held = _MissingCpuKernelFilter()
    bnb_logger.addFilter(held)
    return held


def cpu_4bit_kernel_note() -> str | None:
    """What bitsandbytes lacks on this machine for its fast 4-bit matrix products on CPU, in one sentence; None when
    its fused kernel loaded or was never tried (bitsandbytes tries only on CPUs with AVX512-BF16)."""
    held = hold_back_bitsandbytes_cpu_kernel_warning()
    if held.reason is None:
        return None
    if importlib.util.find_spec("kernels") is None:
        what = "the `kernels` package is missing (pip install 'kernels>=0.11.1'; it downloads the kernel from the Hub)"
    else:
        what = f"the `kernels` package could not load it ({held.reason})"
    return (
        "4-bit layers on CPU run on bitsandbytes' built-in kernels, not on its fused kernel from kernels-community: "
        f"{what}. The cost is speed: 4-bit matrix products on CPU are slower."
    )


def qlora_quantization_config():
    """QLoRA's `BitsAndBytesConfig`: the LLM in 4 bits (NF4, double quantization, bf16 compute); the vision tower and
    lm_head are listed as not converted, and MS-Resampler is never converted (declared on the model class). Pass it
    to `from_pretrained` to rebuild the base a QLoRA adapter was trained on."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        # names from the root: transformers skips a module whose name starts with an entry (or ends with it)
        llm_int8_skip_modules=["model.vision_tower", "lm_head"],
    )


def load_model(model_name_or_path: str, config):
    """The checkpoint in float32 (bf16 training uses autocast over float32 weights), or, for QLoRA, with its LLM in 4
    bits (`qlora_quantization_config`), on GPU or CPU; what is not quantized stays in float32 (the trained projector
    keeps its precision; PEFT's `prepare_model_for_kbit_training` would cast it to float32 anyway)."""
    if not config.qlora:
        return AutoModelForImageTextToText.from_pretrained(model_name_or_path, dtype=torch.float32)
    from accelerate import PartialState

    hold_back_bitsandbytes_cpu_kernel_warning()
    device = PartialState().device
    model = AutoModelForImageTextToText.from_pretrained(
        model_name_or_path,
        quantization_config=qlora_quantization_config(),
        dtype=torch.float32,
        device_map={"": device},
    )
    note = cpu_4bit_kernel_note() if device.type == "cpu" else None
    if note and not _NOTED:
        _NOTED.append(note)
        logger.warning(note)
    return model


_NOTED: list[str] = []  # the CPU kernel note, once it was said (once per process)


def configure_trainable(model, config):
    """Freezes what the stage freezes; with LoRA, wraps the model in PEFT (adapters on the LLM's linear layers, the
    projector trained in full as a module to save); with ScAle, see `add_scale_adapter`. Returns the model to train."""
    if config.adapter == "scale":
        return add_scale_adapter(model, config)
    trained = PAPER_RECIPES[config.stage].trained_modules
    for name, param in model.named_parameters():
        if not param.is_floating_point():
            continue  # QLoRA's 4-bit weights (uint8 storage) never train: the LoRA adapters over them do
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
