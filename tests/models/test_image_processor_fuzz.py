"""The image processor on any size, aspect ratio and PIL mode: a tensor of the right shape or a clear `ValueError`, never
a crash or a hang (Hypothesis: a small budget here, a larger one under `-m slow`); its fused pad-and-resize gives the
pixels of the padded resize (the parent class's path, what it computed before) in memory that does not grow with the
padded square."""

import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers.image_utils import OPENAI_CLIP_STD
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from ms_llava import MSLlavaImageProcessor

MODES = ["1", "L", "LA", "La", "P", "PA", "I", "I;16", "I;16B", "F", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"]
MODES += ["HSV", "LAB"]
ONE_STEP = 1 / 255 / min(OPENAI_CLIP_STD)  # one 8-bit step after normalisation, in the widest channel


class PaddedSquareImageProcessor(MSLlavaImageProcessor):
    """The path before the fusion: the parent's `_preprocess` builds the padded square, then resizes it."""

    _preprocess = LlavaImageProcessorPil._preprocess


def _processors(side: int):
    kwargs = {"size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side}}
    return MSLlavaImageProcessor(**kwargs), PaddedSquareImageProcessor(**kwargs)


def _photo_like(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour gradients and blobs plus sensor-like noise: an ordinary photo's statistics, not white noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(1, 6), rng.uniform(1, 6), rng.uniform(0, 2 * np.pi)
        channels.append(128 + 80 * np.sin(2 * np.pi * fx * x + phase) * np.cos(2 * np.pi * fy * y))
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def _random_image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    """An image of `mode` whose raw bytes are random (for F: any float32, NaN and infinities included)."""
    rng = np.random.default_rng(seed)
    return Image.frombytes(mode, (width, height), rng.bytes(len(Image.new(mode, (width, height)).tobytes())))


@pytest.mark.parametrize(
    "size", [(640, 480), (480, 640), (500, 333), (333, 500), (336, 336), (1024, 768), (768, 1024)]
)
def test_fused_pad_and_resize_gives_the_padded_resize(size):
    image = _photo_like(*size, seed=sum(size))
    fused, padded = MSLlavaImageProcessor(), PaddedSquareImageProcessor()
    expected = padded(images=image, return_tensors="np")["pixel_values"]
    got = fused(images=image, return_tensors="np")["pixel_values"]
    assert got.shape == expected.shape == (1, 3, 336, 336)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ONE_STEP)  # the bound: one 8-bit step
    # and in fact the same 8-bit pixels: the fused path runs PIL's two passes on the padded square's grid
    as_bytes = {"do_rescale": False, "do_normalize": False, "return_tensors": "np"}
    np.testing.assert_array_equal(
        fused(images=image, **as_bytes)["pixel_values"], padded(images=image, **as_bytes)["pixel_values"]
    )


@pytest.mark.parametrize("resample", [Image.Resampling.BILINEAR, Image.Resampling.LANCZOS, Image.Resampling.NEAREST])
def test_fused_pad_and_resize_follows_the_resample_filter(resample):
    image = _photo_like(150, 47, seed=3)
    fused, padded = _processors(64)
    kwargs = {"resample": resample, "do_rescale": False, "do_normalize": False, "return_tensors": "np"}
    np.testing.assert_array_equal(
        fused(images=image, **kwargs)["pixel_values"], padded(images=image, **kwargs)["pixel_values"]
    )


@pytest.mark.parametrize("size", [(8000, 3), (3, 8000)], ids=["wide", "tall"])
def test_memory_does_not_grow_with_the_padded_square(size):
    """NumPy reports its buffers to tracemalloc: before the fusion, the padded 8000 x 8000 RGB square alone was 192 MB."""
    image = _photo_like(*size, seed=0)
    square = 3 * max(size) ** 2
    tracemalloc.start()
    try:
        pixel_values = MSLlavaImageProcessor()(images=image, return_tensors="np")["pixel_values"]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert pixel_values.shape == (1, 3, 336, 336)
    assert peak < square / 6, f"peak {peak / 2**20:.1f} MiB of NumPy buffers for a {size} image"


def test_images_with_no_pixels_or_non_finite_values_give_a_value_error():
    processor = MSLlavaImageProcessor()
    for size in [(0, 5), (5, 0)]:
        with pytest.raises(ValueError, match="at least 1 x 1 pixels"):
            processor(images=Image.new("RGB", size))
    depth = np.ones((4, 6), dtype=np.float32)
    depth[1, 2] = np.nan  # a float depth map with a missing value
    with pytest.raises(ValueError, match="NaN or infinite"):
        processor(images=Image.fromarray(depth))


def _check_any_image(mode: str, long_side: int, short_side: int, tall: bool, target: int, seed: int) -> None:
    width, height = (short_side, long_side) if tall else (long_side, short_side)
    image = _random_image(mode, width, height, seed)
    fused, padded = _processors(target)
    try:
        pixel_values = fused(images=image, return_tensors="np")["pixel_values"]
    except ValueError as error:  # a clear refusal: a PIL mode it cannot convert, a float image holding NaN
        assert str(error), f"empty ValueError for mode {mode} {width} x {height}"
        return
    assert pixel_values.shape == (1, 3, target, target)
    assert np.isfinite(pixel_values).all()
    if long_side <= 1200:  # the padded square is affordable: the fused path must equal it
        np.testing.assert_array_equal(pixel_values, padded(images=image, return_tensors="np")["pixel_values"])


image_cases = {
    "mode": st.sampled_from(MODES),
    "long_side": st.integers(1, 3000),
    "short_side": st.integers(1, 3000),
    "tall": st.booleans(),
    "target": st.sampled_from([16, 37, 336]),
    "seed": st.integers(0, 2**32 - 1),
}


def _bounded(long_side: int, short_side: int) -> tuple[int, int]:
    """The short side at most the long side and at most 200 000 pixels in all (any aspect ratio, bounded time)."""
    return long_side, max(1, min(short_side, long_side, 200_000 // long_side))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**image_cases)
def test_any_image_gives_the_right_shape_or_a_value_error(mode, long_side, short_side, tall, target, seed):
    _check_any_image(mode, *_bounded(long_side, short_side), tall, target, seed)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**image_cases)
def test_any_image_gives_the_right_shape_or_a_value_error_more_examples(
    mode, long_side, short_side, tall, target, seed
):
    _check_any_image(mode, *_bounded(long_side, short_side), tall, target, seed)
