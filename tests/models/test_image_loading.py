"""One image loader for every command (`ms_llava.images.load_image`): the command line (`demo`, `visualize` and
`chat` call it) and the training dataset hand the processor the same pixels as
`processor(images=Image.open(f))`, for every PIL mode; photos come out upright; a file that cannot be read gives a
`ValueError` naming it."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from ms_llava.images import display_rgb, load_image
from ms_llava.training.data import encode_conversation, load_training_records
from pil_modes import image_in_mode

# mode -> a file format that stores it as that mode (PIL opens it back in the same mode)
MODE_FORMATS = {
    "1": "PNG",
    "L": "PNG",
    "LA": "PNG",
    "P": "PNG",
    "P-transparent": "PNG",
    "PA": "TIFF",
    "I": "TIFF",
    "I;16": "PNG",
    "F": "TIFF",
    "RGB": "PNG",
    "RGBA": "PNG",
    "CMYK": "JPEG",
    "YCbCr": "TIFF",
}


def _saved(tmp_path, mode: str):
    path = tmp_path / f"image-{mode.replace(';', '_')}.{MODE_FORMATS[mode].lower()}"
    image_in_mode(mode).save(path, MODE_FORMATS[mode])
    with Image.open(path) as opened:
        expected_mode = "P" if mode == "P-transparent" else mode
        assert opened.mode == expected_mode, f"the {MODE_FORMATS[mode]} file did not keep mode {mode}"
    return path


def _pixels(image_processor, image) -> np.ndarray:
    return image_processor(images=image, return_tensors="np")["pixel_values"][0]


def _dataset_pixels(processor, path) -> np.ndarray:
    """The pixel values the training dataset gives for a one-image LLaVA record pointing at `path`."""
    record = {
        "image": path.name,
        "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A test."}],
    }
    data = path.parent / f"{path.stem}-data.json"
    data.write_text(json.dumps([record]))
    records = load_training_records(data)
    return encode_conversation(processor, records[0])["pixel_values"][0].numpy()


@pytest.mark.parametrize("mode", list(MODE_FORMATS))
def test_command_line_and_dataset_see_what_the_processor_sees(tiny, tmp_path, mode):
    _, processor = tiny
    path = _saved(tmp_path, mode)
    with Image.open(path) as opened:
        expected = _pixels(processor.image_processor, opened)
    np.testing.assert_array_equal(_pixels(processor.image_processor, load_image(path)), expected)
    np.testing.assert_array_equal(_dataset_pixels(processor, path), expected)
    # what the loader hands back is the image as opened (mode kept), not an RGB conversion
    assert load_image(path).mode == Image.open(path).mode


def _exif_rotated_jpeg(path):
    """A 60 x 40 JPEG stored sideways: EXIF orientation 6 (rotate 90 degrees clockwise to view). Upright, it is 40 x 60
    with a red top half and a blue bottom half."""
    upright = Image.new("RGB", (40, 60), (0, 0, 255))
    upright.paste((255, 0, 0), (0, 0, 40, 30))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise: orientation 6 turns it back
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, "JPEG", quality=95, exif=exif)
    return upright


@pytest.mark.parametrize("loader", ["command line", "dataset"])
def test_exif_rotated_photo_comes_out_upright(tiny, tmp_path, loader):
    _, processor = tiny
    path = tmp_path / "phone.jpg"
    upright = _exif_rotated_jpeg(path)
    with Image.open(path) as stored:
        assert stored.size == (60, 40)  # the file itself is sideways
    if loader == "command line":
        image = load_image(path)
        assert image.size == upright.size
        pixels = np.asarray(image, dtype=np.float64)
        np.testing.assert_allclose(pixels[:25].mean(axis=(0, 1)), [255, 0, 0], atol=8)  # red on top (JPEG loss only)
        np.testing.assert_allclose(pixels[35:].mean(axis=(0, 1)), [0, 0, 255], atol=8)  # blue below
        got = _pixels(processor.image_processor, image)
    else:
        got = _dataset_pixels(processor, path)
    np.testing.assert_allclose(got, _pixels(processor.image_processor, upright), atol=0.5)


def test_transparent_png_is_composited_on_white_as_the_processor_does(tiny, tmp_path):
    _, processor = tiny
    path = tmp_path / "transparent.png"
    Image.new("RGBA", (30, 20), (0, 0, 0, 0)).save(path)  # fully transparent black
    white = _pixels(processor.image_processor, Image.new("RGB", (30, 20), (255, 255, 255)))
    np.testing.assert_array_equal(_pixels(processor.image_processor, load_image(path)), white)
    np.testing.assert_array_equal(_dataset_pixels(processor, path), white)


def test_sixteen_bit_greyscale_png_is_not_white(tiny, tmp_path):
    _, processor = tiny
    path = tmp_path / "scan.png"
    Image.fromarray(np.full((20, 30), 16384, dtype=np.uint16)).save(path)  # a quarter of full scale
    image_processor = processor.image_processor
    quarter = _pixels(image_processor, Image.new("RGB", (30, 20), (64, 64, 64)))  # 16384 / 65535 * 255 = 63.75
    np.testing.assert_array_equal(_pixels(image_processor, load_image(path)), quarter)
    np.testing.assert_array_equal(_dataset_pixels(processor, path), quarter)
    # what the attention picture draws is that grey too
    assert np.asarray(display_rgb(load_image(path)))[0, 0].tolist() == [64, 64, 64]


def _truncated_jpeg(path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


@pytest.mark.parametrize(
    "case, message",
    [
        ("truncated", "truncated or damaged"),
        ("text", "not an image file"),
        ("missing", "not found"),
        ("folder", "is a folder"),
    ],
)
def test_unreadable_image_gives_a_value_error_naming_the_file(tmp_path, case, message):
    path = tmp_path / f"{case}.jpg"
    if case == "truncated":
        _truncated_jpeg(path)
    elif case == "text":
        path.write_text("this is not a JPEG\n")
    elif case == "folder":
        path.mkdir()
    with pytest.raises(ValueError, match=message) as raised:
        load_image(path)
    assert str(path) in str(raised.value)


def test_a_truncated_file_is_refused_where_another_library_lets_pil_load_truncated_images(tmp_path, monkeypatch):
    """lmms-eval sets PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True when it is imported (ms-llava eval imports it); our
    loader still refuses the cut-off file, and leaves the flag as it found it."""
    from PIL import ImageFile

    path = tmp_path / "cut.jpg"
    _truncated_jpeg(path)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ValueError, match="truncated or damaged"):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_dataset_names_the_record_and_the_file_of_an_unreadable_image(tiny, tmp_path):
    from ms_llava.training.data import SupervisedDataset

    _, processor = tiny
    path = tmp_path / "cut.jpg"
    _truncated_jpeg(path)
    record = {"id": "cut", "image": path.name, "conversations": [{"from": "human", "value": "<image>\nWhat?"}]}
    record["conversations"].append({"from": "gpt", "value": "A test."})
    (tmp_path / "data.json").write_text(json.dumps([record]))
    dataset = SupervisedDataset(load_training_records(tmp_path / "data.json"), [0], processor, max_length=None)
    with pytest.raises(ValueError, match="record 0 .id 'cut'.*truncated") as raised:
        dataset[0]
    assert str(path) in str(raised.value)


def test_image_over_the_decompression_bomb_limit_gives_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses above twice this: 10000 > 2000
    with pytest.raises(ValueError, match="too large to decode safely") as raised:
        load_image(path)
    assert str(path) in str(raised.value) and "MAX_IMAGE_PIXELS" in str(raised.value)
