"""Image processor for MS-LLaVA: LLaVA-1.5's preprocessing (pad to square with the mean colour, resize, centre crop,
CLIP's mean and std) on the PIL backend, for any PIL mode (alpha on white; palettes, CMYK, greyscale to RGB; 16-bit and
float greyscale scaled to 8 bits). Padding and resizing are fused: the result is PIL's resize of the padded square, but
the square is never built (a 20000 x 10 banner's alone is 1.2 GB). Imports nothing from the package, so that it ships
with every checkpoint as remote code.
"""

import numpy as np
from PIL import Image
from transformers.image_transforms import get_resize_output_image_size
from transformers.image_utils import ChannelDimension, PILImageResampling
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

# PIL's two-pass (horizontal, then vertical) filters; NEAREST (an affine transform) keeps the parent's pad, resize
_SEPARABLE_FILTERS = {
    getattr(PILImageResampling, name) for name in ("BOX", "BILINEAR", "HAMMING", "BICUBIC", "LANCZOS")
}
_BAND_PIXELS = 1 << 20  # a tall image's padded rows go through the horizontal pass about this many pixels at a time


def _high_depth_to_8bit(image: Image.Image) -> Image.Image:
    """PIL clips (rather than scales) modes I, I;16 and F when converting to RGB; scale them to 0..255 first."""
    with np.errstate(invalid="ignore"):  # a signalling NaN in a float image warns here; it is refused just below
        array = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        if not np.isfinite(array).all():
            raise ValueError(f"the mode F (32-bit float) image of size {image.size} holds NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        array = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
    else:
        max_value = 65535.0 if image.mode.startswith("I;16") or array.max() <= 65535 else float(array.max())
        array = array / max_value * 255.0
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")


def _resample(pixels: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
    """PIL's `resize(size, resample)` of an (height, width, channels) uint8 array (channels 1 or 3), converted as the
    parent's resize converts arrays (`to_pil_image`: one channel becomes mode L)."""
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    resized = np.asarray(image.resize(size, resample=resample))
    return resized.reshape(resized.shape[0], resized.shape[1], -1)  # (height, width, channels)


class MSLlavaImageProcessor(LlavaImageProcessorPil):
    """LLaVA-1.5's preprocessing on the PIL backend: LlavaImageProcessorPil's (CLIP's bicubic resize, centre crop, mean
    and std) at 336 px, padded to square with the mean colour."""

    size = {"shortest_edge": 336}
    crop_size = {"height": 336, "width": 336}
    do_pad = True

    def process_image(self, image, *args, **kwargs):
        if isinstance(image, Image.Image):
            if min(image.size) < 1:
                raise ValueError(f"an image must be at least 1 x 1 pixels, got {image.size[0]} x {image.size[1]}")
            if image.mode in ("I", "F") or image.mode.startswith("I;16"):
                image = _high_depth_to_8bit(image)
            if kwargs.get("do_convert_rgb") and ("A" in image.getbands() or "transparency" in image.info):
                # alpha on white, as transformers >= 5.21 composites it in convert_to_rgb (older ones drop it)
                white = Image.new("RGBA", image.size, (255, 255, 255, 255))
                image = Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        return super().process_image(image, *args, **kwargs)

    def _preprocess(self, images, do_resize, size, resample, do_pad, image_mean, **kwargs):
        if do_pad and do_resize:
            # the parent's padding colour, then its pad_to_square + resize, fused
            background = tuple(int(x * 255) for x in image_mean) if image_mean else 0
            images = [self._pad_and_resize(image, background, size, resample) for image in images]
            do_pad = do_resize = False
        return super()._preprocess(
            images, do_resize=do_resize, size=size, resample=resample, do_pad=do_pad, image_mean=image_mean, **kwargs
        )

    def _pad_and_resize(self, image: np.ndarray, background, size, resample) -> np.ndarray:
        """`self.resize(self.pad_to_square(image, background), size, resample)` without building the padded square.

        PIL resizes in two passes, horizontal then vertical, each rounding to 8 bits; here the passes are two PIL
        calls on the square's own sampling grid, so the result is bit for bit the padded resize. The horizontal pass
        of a padding row is the padding colour (a constant row stays constant), so a wide image's pass runs on its own
        rows only; a tall image's padded rows go through in bands. What is held is the image, one band and the
        (long side x output width) result of the horizontal pass, never the square.
        """
        channels, height, width = image.shape  # (channels, height, width): the backend is channels-first
        side = max(height, width)
        background = (background,) * channels if isinstance(background, int) else tuple(background)
        # the target of resizing the side x side square (the parent's resize, for the sizes this processor takes)
        if size.height and size.width and not size.shortest_edge:
            out_h, out_w = size.height, size.width
        elif size.shortest_edge and not size.longest_edge:
            square = np.broadcast_to(np.uint8(0), (1, side, side))  # a view: only its shape is read
            out_h, out_w = get_resize_output_image_size(
                square, size=size.shortest_edge, default_to_square=False, input_data_format=ChannelDimension.FIRST
            )
        else:
            out_h = out_w = None
        if (
            height == width
            or out_h is None
            or image.dtype != np.uint8
            or channels not in (1, 3)
            or len(background) != channels
            or resample not in _SEPARABLE_FILTERS
        ):  # nothing padded, or a case the fused path does not cover: the parent's pad then resize
            return self.resize(self.pad_to_square(image, background_color=background), size=size, resample=resample)

        pixels = np.moveaxis(image, 0, -1)  # (height, width, channels)
        rows = np.empty((side, out_w, channels), dtype=np.uint8)  # the square after the horizontal pass
        if width > height:  # padded above and below
            top = (side - height) // 2
            rows[...] = background
            rows[top : top + height] = _resample(pixels, (out_w, height), resample)
        else:  # padded left and right: every row holds image and padding
            left = (side - width) // 2
            band_rows = max(1, _BAND_PIXELS // side)
            for start in range(0, side, band_rows):
                band = np.empty((min(band_rows, side - start), side, channels), dtype=np.uint8)
                band[...] = background
                band[:, left : left + width] = pixels[start : start + band_rows]
                rows[start : start + band.shape[0]] = _resample(band, (out_w, band.shape[0]), resample)
        output = _resample(rows, (out_w, out_h), resample)  # the vertical pass
        return np.ascontiguousarray(np.moveaxis(output, -1, 0))  # (channels, out_h, out_w)


__all__ = ["MSLlavaImageProcessor"]
