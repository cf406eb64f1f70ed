"""Test images in every PIL mode (tests/models: the image processor and the image loader)."""

import numpy as np
from PIL import Image


def image_in_mode(mode: str) -> Image.Image:
    """A 30 x 20 (not square: padding is exercised) image of `mode` with random content (seeded), alpha included;
    `"P-transparent"`: a palette image with a transparent colour."""
    rng = np.random.default_rng(0)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (20, 30)).astype(np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(0, 65536, (20, 30)).astype(np.int32))
    if mode == "F":
        return Image.fromarray(rng.normal(size=(20, 30)).astype(np.float32))
    rgba = Image.fromarray(rng.integers(0, 256, (20, 30, 4), dtype=np.uint8), mode="RGBA")
    if mode == "P-transparent":
        image = rgba.convert("RGB").convert("P")
        image.info["transparency"] = 0
        return image
    return rgba.convert(mode)
