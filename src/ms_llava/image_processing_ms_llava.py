"""Image processor for MS-LLaVA: LLaVA-1.5 preprocessing on the PIL/NumPy backend (no torchvision).

Pad to square with the mean colour, resize the shortest edge, centre crop, rescale, normalise with CLIP's mean and std.
Any PIL mode is accepted: alpha is composited on white, palettes, CMYK and greyscale are converted to RGB, and 16-bit /
32-bit / float greyscale is scaled to 8 bits first. This file imports nothing from the ``ms_llava`` package so that it
can ship with a checkpoint as remote code.
"""

import numpy as np
from PIL import Image
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil


def _high_depth_to_8bit(image: Image.Image) -> Image.Image:
    """PIL clips (rather than scales) modes I, I;16 and F when converting to RGB; scale them to 0..255 first."""
    array = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        low, high = float(array.min()), float(array.max())
        array = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
    else:
        max_value = 65535.0 if image.mode.startswith("I;16") or array.max() <= 65535 else float(array.max())
        array = array / max_value * 255.0
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")


class MSLlavaImageProcessor(LlavaImageProcessorPil):
    """LLaVA-1.5's preprocessing (336 px, pad to square with the mean colour) on the PIL backend."""

    resample = PILImageResampling.BICUBIC
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"shortest_edge": 336}
    crop_size = {"height": 336, "width": 336}
    default_to_square = False
    do_pad = True
    do_resize = True
    do_center_crop = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True

    def process_image(self, image, *args, **kwargs):
        if isinstance(image, Image.Image) and (image.mode in ("I", "F") or image.mode.startswith("I;16")):
            image = _high_depth_to_8bit(image)
        return super().process_image(image, *args, **kwargs)


__all__ = ["MSLlavaImageProcessor"]
