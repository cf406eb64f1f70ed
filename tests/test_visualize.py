import numpy as np
import pytest
import torch
from PIL import Image

from ms_llava.modeling_ms_llava import build_scope_bias, query_anchors
from ms_llava.testing_utils import build_tiny_checkpoint, sample_image
from ms_llava.visualize import (
    map_to_model_input,
    panel_layout,
    parse_point,
    query_attention,
    render,
    visualize,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster, and steady on a shared machine


def resampler_attention(model, processor, image, **vision_kwargs):
    """The model's own per-branch attention, heads averaged: (E, M, prefix + H*W), straight from MSResampler."""
    pixel_values = processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
    config = model.config
    tower = model.model.vision_tower(pixel_values, output_hidden_states=True, **vision_kwargs)
    hidden = tower.hidden_states[config.vision_feature_layer]
    patch = config.vision_config.patch_size
    grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
    prefix = hidden.shape[1] - grid[0] * grid[1]
    dropped = 1 if config.vision_feature_select_strategy == "default" else 0
    with torch.no_grad():
        _, probs = model.model.multi_modal_projector(
            hidden[:, dropped:], grid_size=grid, num_prefix_tokens=prefix - dropped, output_attentions=True
        )
    return probs[0].mean(dim=1), grid, prefix - dropped


@pytest.mark.parametrize("query", [0, 5, 15])
def test_heat_map_is_the_resampler_attention_on_the_grid(tiny, image, query):
    model, processor = tiny
    result = query_attention(model, processor, image, query=query)
    attention, (height, width), prefix = resampler_attention(model, processor, image)
    assert prefix == 0 and result.num_prefix_tokens == 0
    assert result.grid_size == (height, width) == (8, 8)
    assert [b.window for b in result.branches] == [2, 4, 8]
    for branch_index, branch in enumerate(result.branches):
        expected = attention[branch_index, query].view(height, width).numpy()
        np.testing.assert_allclose(branch.attention, expected, rtol=1e-5, atol=1e-7)
        assert branch.prefix_mass == 0.0
        assert branch.mass_inside == pytest.approx(float(expected[branch.window_mask].sum()), rel=1e-5)
        assert 0.0 < branch.mass_inside <= 1.0 + 1e-6


def test_cls_prefix_attention_is_reported_not_drawn(image):
    model, processor = build_tiny_checkpoint(seed=1)
    model.config.vision_feature_select_strategy = "full"  # keeps CLIP's CLS token: one token off the grid
    result = query_attention(model, processor, image, query=3)
    attention, (height, width), prefix = resampler_attention(model, processor, image)
    assert prefix == 1 and result.num_prefix_tokens == 1
    for branch_index, branch in enumerate(result.branches):
        np.testing.assert_allclose(
            branch.attention, attention[branch_index, 3, 1:].view(height, width).numpy(), rtol=1e-5, atol=1e-7
        )
        assert branch.prefix_mass == pytest.approx(float(attention[branch_index, 3, 0]), rel=1e-5)
        assert branch.prefix_mass > 0
        assert branch.attention.sum() + branch.prefix_mass == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("grid_px", "patch", "num_queries", "query_grid", "windows"),
    [
        ((32, 32), 4, 16, None, [2, 4, 8]),  # 8 x 8 grid, 4 x 4 queries
        ((28, 20), 4, 6, [3, 2], [2, 3, 5]),  # non-square: 7 x 5 grid, 3 x 2 queries
        ((24, 40), 4, 8, [2, 4], [2, 3, 6]),  # non-square the other way: 6 x 10 grid
    ],
)
def test_drawn_window_is_the_zero_set_of_the_scope_bias(grid_px, patch, num_queries, query_grid, windows):
    resampler = {"num_queries": num_queries, "scope_windows": windows}
    if query_grid:
        resampler["query_grid"] = query_grid
    model, processor = build_tiny_checkpoint(seed=0, **resampler)
    height_px, width_px = grid_px
    processor.image_processor.size = {"height": height_px, "width": width_px}
    processor.image_processor.crop_size = {"height": height_px, "width": width_px}
    processor.image_processor.do_pad = False
    grid = (height_px // patch, width_px // patch)
    rows, cols = model.config.resampler_config.query_grid_shape
    bias = build_scope_bias(windows, rows, cols, *grid)
    anchors = query_anchors(rows, cols, *grid)
    picture = sample_image(size=48, seed=3)
    for query in range(num_queries):
        result = query_attention(model, processor, picture, query=query, interpolate_pos_encoding=True)
        assert result.grid_size == grid
        assert result.anchor == tuple(anchors[query].tolist())
        assert result.model_image.size == (width_px, height_px)
        for branch_index, branch in enumerate(result.branches):
            zero_set = (bias[branch_index, query] == 0).view(*grid).numpy()
            np.testing.assert_array_equal(branch.window_mask, zero_set)
            top, left, bottom, right = branch.window_tokens
            box = np.zeros(grid, dtype=bool)
            box[top : bottom + 1, left : right + 1] = True
            np.testing.assert_array_equal(box, zero_set)  # the rectangle drawn holds exactly the B == 0 tokens
            assert branch.window_pixels == (left * patch, top * patch, (right + 1) * patch, (bottom + 1) * patch)
            # the anchor lies inside its window, and the window is k tokens wide where the grid allows
            assert top <= result.anchor[0] <= bottom and left <= result.anchor[1] <= right
            assert bottom - top + 1 <= windows[branch_index] + 1 and right - left + 1 <= windows[branch_index] + 1
        if query == num_queries - 1:  # the heat map is the model's attention on the non-square grid too
            attention, _, _ = resampler_attention(model, processor, picture, interpolate_pos_encoding=True)
            for branch_index, branch in enumerate(result.branches):
                expected = attention[branch_index, query].view(*grid).numpy()
                np.testing.assert_allclose(branch.attention, expected, rtol=1e-5, atol=1e-7)


def test_default_query_is_nearest_the_centre_and_query_at_picks_the_nearest_anchor(tiny):
    model, processor = tiny
    picture = sample_image(size=64, seed=0)
    assert query_attention(model, processor, picture).query == 5  # anchors 2.5 / 4.5 tie around 3.5: lowest index
    # a 64 x 64 image is scaled by 1/2 to 32 px (patch 4): pixel (60, 4) -> token (row 0.0, col 7) -> query 3
    assert query_attention(model, processor, picture, query_at=(60, 4)).query == 3
    assert query_attention(model, processor, picture, query_at=(2, 62)).query == 12


def test_map_to_model_input_follows_the_image_processor(tiny):
    _, processor = tiny
    image_processor = processor.image_processor
    for size, point in [((80, 40), (70, 30)), ((40, 90), (5, 80)), ((64, 64), (10, 50))]:
        picture = Image.new("RGB", size, (255, 255, 255))
        picture.paste((0, 0, 0), (point[0] - 2, point[1] - 2, point[0] + 2, point[1] + 2))
        pixels = image_processor(images=picture, return_tensors="pt")["pixel_values"][0].mean(0)
        darkest = np.unravel_index(int(pixels.argmin()), pixels.shape)  # (y, x) of the marker in the model input
        x, y = map_to_model_input(image_processor, size, point)
        assert abs(x - darkest[1]) <= 1.5 and abs(y - darkest[0]) <= 1.5, (size, point, (x, y), darkest)


def test_png_has_the_input_and_one_panel_per_branch(tiny, image, tmp_path):
    model, processor = tiny
    output = tmp_path / "deep" / "attention.png"
    result = visualize(model, processor, image, output, query=6, panel_size=128, notes=["Q: where? A: here"])
    assert result.query == 6
    with Image.open(output) as written:
        assert written.format == "PNG"
        assert written.size == panel_layout(3, 128, num_notes=1)
        pixels = np.asarray(written.convert("RGB")).astype(int)
    rendered = np.asarray(render(result, image, panel_size=128, notes=["Q: where? A: here"])).astype(int)
    np.testing.assert_array_equal(pixels, rendered)
    # every branch panel carries the window outline (cyan) at the drawn rectangle's top-left corner
    from ms_llava.visualize import HEADER, MARGIN

    top = 2 * HEADER + MARGIN
    for index, branch in enumerate(result.branches):
        left_px, top_px, _, _ = branch.window_pixels
        x0 = MARGIN + (index + 1) * (128 + MARGIN) + int(left_px * 128 / 32)
        y0 = top + int(top_px * 128 / 32)
        assert tuple(pixels[y0, x0]) == (0, 230, 255)


def test_bad_inputs_raise_value_errors_naming_the_value(tiny, image, tmp_path):
    model, processor = tiny
    with pytest.raises(ValueError, match=r"\[0, 16\).*got 16"):
        query_attention(model, processor, image, query=16)
    with pytest.raises(ValueError, match="got -1"):
        query_attention(model, processor, image, query=-1)
    with pytest.raises(ValueError, match="got True"):
        query_attention(model, processor, image, query=True)
    with pytest.raises(ValueError, match="not both"):
        query_attention(model, processor, image, query=1, query_at=(1, 1))
    with pytest.raises(ValueError, match=r"query_at \(500.0, 1.0\) lies outside"):
        query_attention(model, processor, image, query_at=(500.0, 1.0))
    with pytest.raises(ValueError, match="PIL image, got ndarray"):
        query_attention(model, processor, np.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match=r"\.png file, got '.*out\.jpg'"):
        visualize(model, processor, image, tmp_path / "out.jpg")
    with pytest.raises(ValueError, match="panel_size must be an integer >= 64, got 10"):
        render(query_attention(model, processor, image), image, panel_size=10)
    with pytest.raises(ValueError, match="x,y in pixels.*got '3;4'"):
        parse_point("3;4")
    assert parse_point("3.5,4") == (3.5, 4.0)

    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from ms_llava.testing_utils import tiny_text_config, tiny_vision_config

    llava = LlavaForConditionalGeneration(
        LlavaConfig(vision_config=tiny_vision_config(), text_config=tiny_text_config(processor.tokenizer))
    )
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration with model_type 'llava'"):
        query_attention(llava, processor, image)
