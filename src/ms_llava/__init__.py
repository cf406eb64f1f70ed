"""ms-llava: MS-Resampler (multi-scope visual resampling) for LLaVA, native in Hugging Face Transformers.

Importing this package registers model type ``"ms_llava"`` with AutoConfig, AutoModel, AutoModelForImageTextToText,
AutoImageProcessor and AutoProcessor, and marks the classes for remote code, so that every ``save_pretrained`` writes
the module files and ``auto_map`` next to the weights. ``ms_llava.default_checkpoint_path()`` is the folder of the
embedded default checkpoint (a toy model, see the README).
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .configuration_ms_llava import MSLlavaConfig, MSResamplerConfig
from .demo import default_checkpoint_path  # light: pathlib only (the demo's heavy imports are inside its functions)
from .image_processing_ms_llava import MSLlavaImageProcessor
from .modeling_ms_llava import MSLlavaForConditionalGeneration, MSLlavaModel, MSLlavaPreTrainedModel, MSResampler
from .processing_ms_llava import LLAVA_1_5_CHAT_TEMPLATE, MSLlavaProcessor

__version__ = "0.1.0"

AutoConfig.register(MSLlavaConfig.model_type, MSLlavaConfig, exist_ok=True)
AutoModel.register(MSLlavaConfig, MSLlavaModel, exist_ok=True)
AutoModelForImageTextToText.register(MSLlavaConfig, MSLlavaForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(MSLlavaConfig, image_processor_classes={"pil": MSLlavaImageProcessor}, exist_ok=True)
AutoProcessor.register(MSLlavaConfig, MSLlavaProcessor, exist_ok=True)

MSLlavaConfig.register_for_auto_class()
MSLlavaModel.register_for_auto_class("AutoModel")
MSLlavaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
MSLlavaImageProcessor.register_for_auto_class("AutoImageProcessor")
MSLlavaProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "LLAVA_1_5_CHAT_TEMPLATE",
    "MSLlavaConfig",
    "MSLlavaForConditionalGeneration",
    "MSLlavaImageProcessor",
    "MSLlavaModel",
    "MSLlavaPreTrainedModel",
    "MSLlavaProcessor",
    "MSResampler",
    "MSResamplerConfig",
    "default_checkpoint_path",
]
