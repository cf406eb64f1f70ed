import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from ms_llava import MSLlavaImageProcessor, MSLlavaProcessor
from ms_llava.checkpoints import check_checkpoint_folder
from ms_llava.testing_utils import build_tiny_checkpoint, build_tiny_tokenizer
from pil_modes import image_in_mode


def reference_llava_preprocess(image: Image.Image, size: int = 336) -> np.ndarray:
    """LLaVA-1.5's preprocessing written out with PIL: expand to square with the mean colour, resize, normalise."""
    image = image.convert("RGB")
    width, height = image.size
    if width != height:
        side = max(width, height)
        square = Image.new("RGB", (side, side), tuple(int(x * 255) for x in OPENAI_CLIP_MEAN))
        square.paste(image, ((side - width) // 2, (side - height) // 2))
        image = square
    array = np.asarray(image.resize((size, size), Image.BICUBIC), dtype=np.float64) / 255.0
    return ((array - np.array(OPENAI_CLIP_MEAN)) / np.array(OPENAI_CLIP_STD)).transpose(2, 0, 1)


@pytest.mark.parametrize("size", [(400, 300), (300, 400), (336, 336), (37, 91), (1, 1), (10, 500), (500, 10)])
def test_image_processor_matches_llava_1_5_preprocessing(size):
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    pixel_values = MSLlavaImageProcessor()(image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 336, 336)
    np.testing.assert_allclose(pixel_values[0].numpy(), reference_llava_preprocess(image), atol=1e-5)


def test_padding_uses_the_mean_colour():
    image = Image.new("RGB", (50, 1), (0, 0, 0))  # 1:50, nearly all padding
    pixel_values = MSLlavaImageProcessor()(image, return_tensors="np")["pixel_values"][0]
    mean_colour = np.array([int(x * 255) / 255 for x in OPENAI_CLIP_MEAN])
    expected = (mean_colour - np.array(OPENAI_CLIP_MEAN)) / np.array(OPENAI_CLIP_STD)
    np.testing.assert_allclose(pixel_values[:, 0, 0], expected, atol=1e-5)  # a corner is padding


@pytest.mark.parametrize(
    "mode", ["RGBA", "L", "LA", "P", "P-transparent", "PA", "CMYK", "1", "I;16", "I", "F", "YCbCr"]
)
def test_any_pil_mode_becomes_a_normalised_rgb_tensor(mode):
    pixel_values = MSLlavaImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})(
        image_in_mode(mode), return_tensors="pt"
    )["pixel_values"]
    assert pixel_values.shape == (1, 3, 32, 32)
    assert torch.isfinite(pixel_values).all()
    # values stay inside the normalised range of 8-bit RGB
    low = (0 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    high = (1 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    assert (pixel_values[0] >= low.view(3, 1, 1) - 1e-4).all() and (pixel_values[0] <= high.view(3, 1, 1) + 1e-4).all()


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    image = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))  # mid-grey in 16 bits
    pixel_values = MSLlavaImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})(
        image, return_tensors="np"
    )["pixel_values"][0]
    grey = (128 / 255 - np.array(OPENAI_CLIP_MEAN)) / np.array(OPENAI_CLIP_STD)
    np.testing.assert_allclose(pixel_values[:, 4, 4], grey, atol=1e-5)


def test_processor_expands_each_image_to_exactly_m_tokens(tiny, image):
    model, processor = tiny
    assert processor.num_image_tokens == model.config.resampler_config.num_queries == 16
    texts = ["USER: <image>\nOne ASSISTANT:", "USER: <image>\n<image>\nTwo ASSISTANT:"]
    inputs = processor(images=[image, image, image], text=texts, return_tensors="pt", padding=True)
    counts = (inputs["input_ids"] == model.config.image_token_id).sum(-1).tolist()
    assert counts == [16, 32]
    assert inputs["pixel_values"].shape == (3, 3, 32, 32)


def test_num_multimodal_tokens(tiny):
    _, processor = tiny
    data = processor._get_num_multimodal_tokens(image_sizes=[(10, 20), (300, 40)])
    assert data.num_image_tokens == [16, 16] and data.num_image_patches == [1, 1]


def test_truncation_that_cuts_image_tokens_is_refused(tiny, image):
    _, processor = tiny
    with pytest.raises(ValueError, match=r"Mismatch in `image` token count between text and `input_ids`"):
        processor(images=image, text="USER: <image>\nHello there ASSISTANT:", truncation=True, max_length=8)
    # truncation that leaves the image alone is fine
    ok = processor(images=image, text="USER: <image>\nHi", truncation=True, max_length=64, return_tensors="pt")
    assert ok["input_ids"].shape[1] <= 64


def test_image_count_must_match_placeholders(tiny, image):
    _, processor = tiny
    with pytest.raises(ValueError, match="Found total 2 <image> tokens and 1 images"):
        processor(images=image, text="<image> <image>")


def test_chat_template_is_llava_1_5_style_with_generation_markers(tiny, image):
    _, processor = tiny
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A circle."}]},
        {"role": "user", "content": "And the colour?"},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "USER: <image>\nWhat is it? ASSISTANT: A circle.</s>USER: And the colour? ASSISTANT:"
    with_system = [{"role": "system", "content": "Be brief."}] + messages[:1]
    assert processor.apply_chat_template(with_system).startswith("Be brief. USER: <image>\n")

    messages[0]["content"][0]["image"] = image
    encoded = processor.apply_chat_template(
        messages[:2], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = encoded["input_ids"][0], encoded["assistant_masks"][0]
    answer = [token for token, keep in zip(ids, mask, strict=True) if keep]
    assert processor.tokenizer.decode(answer) == " A circle.</s>"
    assert list(ids).count(processor.image_token_id) == 16


def test_processor_and_model_config_must_agree_on_m(tiny, tmp_path, image):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    wrong = MSLlavaProcessor(processor.image_processor, processor.tokenizer, num_image_tokens=9)
    wrong.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"num_image_tokens=9 tokens, but the model config has .*num_queries=16"):
        check_checkpoint_folder(tmp_path, processor=True)
    inputs = AutoProcessor.from_pretrained(tmp_path)(images=image, text="<image>Hi", return_tensors="pt")
    with pytest.raises(ValueError, match=r"prompts hold 9 image tokens, but 1 images need 16 \(M = 16 per image\)"):
        model(**inputs)


def test_processor_and_model_config_must_agree_on_the_image_token(tiny, tmp_path):
    model, processor = tiny
    config = model.config.to_dict()
    model.__class__(model.config.__class__(**{**config, "image_token_id": 3})).save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    with pytest.raises(
        ValueError, match=r"image token '<image>' has id \d+, but the model config has image_token_id=3"
    ):
        check_checkpoint_folder(tmp_path, processor=True)


def test_explicit_image_token_is_used(tiny):
    _, processor = tiny
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<img>"]})
    custom = MSLlavaProcessor(processor.image_processor, tokenizer, num_image_tokens=4, image_token="<img>")
    assert custom.image_token == "<img>" and custom.image_token_id == tokenizer.convert_tokens_to_ids("<img>")
    assert custom.replace_image_token({}, 0) == "<img>" * 4


def test_saved_processor_files(tiny_dir):
    saved = json.loads((tiny_dir / "processor_config.json").read_text())
    assert saved["num_image_tokens"] == 16
    assert saved["auto_map"]["AutoProcessor"] == "processing_ms_llava.MSLlavaProcessor"
    assert (
        saved["image_processor"]["auto_map"]["AutoImageProcessor"] == "image_processing_ms_llava.MSLlavaImageProcessor"
    )
    for module in ["configuration", "modeling", "processing", "image_processing"]:
        assert (tiny_dir / f"{module}_ms_llava.py").is_file()
    assert isinstance(AutoImageProcessor.from_pretrained(tiny_dir), MSLlavaImageProcessor)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"num_image_tokens": 0}, "num_image_tokens"), ({"image_token": "<img>"}, "one token")],
)
def test_bad_processor_arguments(kwargs, message):
    tokenizer = build_tiny_tokenizer()
    with pytest.raises(ValueError, match=message):
        MSLlavaProcessor(MSLlavaImageProcessor(), tokenizer, **kwargs)


def test_default_chat_template_renders_the_documented_prompt(tmp_path):
    """A processor given no chat template renders the README's Quick-start prompt, also after save -> load."""
    documented = "USER: <image>\nWhat is in the image? ASSISTANT:"
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert f'# "{documented}"'.replace("\n", "\\n") in readme
    _, built = build_tiny_checkpoint()
    processor = MSLlavaProcessor(built.image_processor, built.tokenizer, num_image_tokens=16)
    processor.save_pretrained(tmp_path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    for candidate in (processor, MSLlavaProcessor.from_pretrained(tmp_path)):
        assert candidate.apply_chat_template(messages, add_generation_prompt=True) == documented
