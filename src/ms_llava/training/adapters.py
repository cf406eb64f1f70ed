"""What trains in a run: the stage's modules, or an adapter (LoRA on the LLM, QLoRA over a 4-bit LLM, ScAle's
scalars); and merging a LoRA adapter back into its base model."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import re
import warnings

import torch
from accelerate import PartialState
from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

from ..recipes import PAPER_RECIPES, PROJECTOR

logger = logging.getLogger(__name__)
LANGUAGE_MODEL_PREFIX = "model.language_model."
_HELD_BACK: list[str] = []  # why bitsandbytes' fused CPU kernel failed to load (the line held back below)
_NOTED: list[str] = []  # the note below, once said (once per process)


def _hold_back(record: logging.LogRecord) -> bool:
    """bitsandbytes' CPU backend logs "Failed to load CPU gemm_4bit_forward from kernels-community ..." when imported,
    so every run (peft imports it) would print it: held back, and said once, plainly, by a QLoRA run on CPU."""
    if not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward"):
        return True
    _HELD_BACK.append(str(record.args[0]) if record.args else record.getMessage())
    return False


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_hold_back)


def cpu_4bit_kernel_note() -> str | None:
    """Why bitsandbytes runs 4-bit layers on CPU without its fused kernel; None when it did not try (it does only on
    CPUs with AVX512-BF16) or did not fail."""
    if not _HELD_BACK:
        return None
    what = f"the `kernels` package could not load it ({_HELD_BACK[-1]})"
    if importlib.util.find_spec("kernels") is None:
        what = "the `kernels` package is missing (pip install 'kernels>=0.11.1'; it downloads the kernel from the Hub)"
    return (
        "4-bit layers on CPU run on bitsandbytes' built-in kernels, not on its fused kernel from kernels-community: "
        f"{what}. The cost is speed: 4-bit matrix products on CPU are slower."
    )


@contextlib.contextmanager
def quiet_peft():
    """peft 0.21's PeftModel reads `model.is_gradient_checkpointing`, which transformers >= 5.23 deprecates with a
    FutureWarning on every LoRA run: nothing the user can act on (peft >= 0.22 reads the new name)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def language_model_lora_targets(model) -> str:
    """PEFT `target_modules`: every linear layer under `model.language_model.` by leaf name (q_proj ... down_proj);
    anchored there, it cannot match the vision tower's."""
    linear = (name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear))
    names = sorted({name.rsplit(".", 1)[-1] for name in linear if name.startswith(LANGUAGE_MODEL_PREFIX)})
    return rf"^{re.escape(LANGUAGE_MODEL_PREFIX)}.*\.({'|'.join(map(re.escape, names))})$"


def require_qlora_support() -> None:
    """QLoRA loads the LLM in 4 bits with bitsandbytes (0.50 and later run 4-bit layers on CPU too)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            "qlora needs bitsandbytes (pip install 'bitsandbytes>=0.50'); use lora=True (--lora) without "
            "quantization instead"
        )


def qlora_quantization_config() -> BitsAndBytesConfig:
    """QLoRA's: the LLM in NF4, double quantization, bf16 compute; vision tower, lm_head (and the resampler, as the
    model class keeps it) unquantized. Pass it to `from_pretrained` to rebuild a QLoRA adapter's base."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=["model.vision_tower", "lm_head"],  # names from the root
    )


def load_model(model_name_or_path: str, config):
    """The checkpoint in float32 (bf16 trains by autocast over float32 weights); for QLoRA with its LLM in 4 bits on
    this process's device."""
    device = PartialState().device
    qlora = dict(quantization_config=qlora_quantization_config(), device_map={"": device}) if config.qlora else {}
    model = AutoModelForImageTextToText.from_pretrained(model_name_or_path, dtype=torch.float32, **qlora)
    note = cpu_4bit_kernel_note() if config.qlora and device.type == "cpu" else None
    if note and not _NOTED:
        _NOTED.append(note)
        logger.warning(note)
    return model


def configure_trainable(model, config):
    """Freezes what the stage freezes; LoRA: PEFT adapters on the LLM's linear layers, the projector trained in full as
    a module to save; ScAle: every weight frozen, its scalars train (`ms_llava.tuners.scale`)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.adapter == "scale":
        from ..tuners.scale import ScaleConfig

        model.requires_grad_(False)
        scope, layers = config.scale_token_scope, config.scale_layers
        adapter = ScaleConfig(bound=config.scale_bound, token_scope=scope, layers_to_transform=layers)
    else:
        trained = PAPER_RECIPES[config.stage].trained_modules
        for name, param in model.named_parameters():
            if param.is_floating_point():  # QLoRA's 4-bit weights (uint8) never train; its adapters over them do
                param.requires_grad = any(name == prefix or name.startswith(prefix + ".") for prefix in trained)
        if not config.lora:
            return model
        if config.qlora:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
        adapter = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=language_model_lora_targets(model),
            modules_to_save=[PROJECTOR],
        )
    with quiet_peft():
        return get_peft_model(model, adapter)


def merge_lora_adapter(adapter_dir, output_dir=None, base_model: str | None = None):
    """The base model (`base_model`, default: the adapter's recorded one) with the adapter of `adapter_dir` merged in;
    with `output_dir`, also saved there with the processor."""
    from peft import PeftConfig, PeftModel

    base_path = base_model or PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    base = AutoModelForImageTextToText.from_pretrained(base_path, dtype=torch.float32)
    with quiet_peft():
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    if output_dir is not None:
        merged.save_pretrained(output_dir)
        AutoProcessor.from_pretrained(str(adapter_dir)).save_pretrained(output_dir)
    return merged
