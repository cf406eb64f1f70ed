"""The frozen vision tower's feature cache (ms_llava.training.feature_cache; `train(..., cache_vision_features=True)`).

The cache must change nothing but the time: the per-step losses and the trained weights equal an uncached run's, on
MS-LLaVA and on transformers' LLaVA (its MLP projector over every token), and the saved checkpoint holds the real
tower. Refusals name what cannot be cached.
"""

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import LlavaConfig, LlavaForConditionalGeneration

from ms_llava import MSLlavaProcessor
from ms_llava.testing_utils import (
    build_tiny_checkpoint,
    build_tiny_processor,
    build_tiny_tokenizer,
    write_shapes_dataset,
)
from ms_llava.training import train
from ms_llava.training.data import SupervisedDataset, load_training_records
from ms_llava.training.feature_cache import build_cache, cached_vision_tower, check_cacheable, vision_tower_of

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = {"dataloader_num_workers": 0, "save_steps": 1000, "warmup_ratio": 0.1, "global_batch_size": 8}
STEPS = {"learning_rate": 1e-2, "max_steps": 6}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cache_shapes")
    return {
        "caption": write_shapes_dataset(directory, "caption", 24, seed=0),
        "qa": write_shapes_dataset(directory, "qa", 48, seed=1),
        "images": directory / "images",
    }


def tiny_llava(directory: Path) -> Path:
    """transformers' LLaVA with the tiny tower and LLM (MLP projector over all 64 patch tokens), saved."""
    ms_model, _ = build_tiny_checkpoint(seed=0)
    tokenizer = build_tiny_tokenizer()
    config = LlavaConfig(
        vision_config=ms_model.config.vision_config,
        text_config=ms_model.config.text_config,
        image_token_id=ms_model.config.image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.save_pretrained(directory)
    processor = build_tiny_processor(ms_model.config, tokenizer)
    MSLlavaProcessor(
        image_processor=processor.image_processor, tokenizer=tokenizer, num_image_tokens=64
    ).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("architecture", ["ms_llava", "llava"])
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_the_cache_gives_the_same_losses_and_weights(architecture, stage, tiny_dir, shapes, tmp_path):
    start = tiny_dir if architecture == "ms_llava" else tiny_llava(tmp_path / "llava")
    data = shapes["caption"] if stage == "pretrain" else shapes["qa"]
    args = (start, stage, data, shapes["images"])
    plain = train(*args, tmp_path / "plain", **RUN, **STEPS)
    cached = train(*args, tmp_path / "cached", cache_vision_features=True, **RUN, **STEPS)
    assert [step for step, _ in cached.losses] == list(range(1, 7))
    torch.testing.assert_close(
        [loss for _, loss in cached.losses], [loss for _, loss in plain.losses], rtol=0, atol=1e-6
    )
    expected, got = (
        load_file(tmp_path / "plain" / "model.safetensors"),
        load_file(tmp_path / "cached" / "model.safetensors"),
    )
    assert expected.keys() == got.keys()
    tower = [key for key in got if "vision_tower" in key]
    assert tower
    start_weights = load_file(Path(start) / "model.safetensors")
    for key in tower:  # the real (frozen) tower was saved, not a stand-in
        assert torch.equal(got[key], start_weights[key]), key
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-5, msg=key)


def test_a_later_run_in_the_same_process_reuses_the_cache(tiny_dir, shapes, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    train(tiny_dir, "finetune", shapes["qa"], shapes["images"], tmp_path / "a", cache_vision_features=True, **RUN,
          max_steps=1)  # fmt: skip
    train(tiny_dir, "finetune", shapes["qa"], shapes["images"], tmp_path / "b", cache_vision_features=True, **RUN,
          max_steps=1)  # fmt: skip
    assert "vision feature cache: reused (48 images)" in caplog.text


def test_text_only_records_train_with_the_flag(tiny_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    records = [
        {"id": f"t{i}", "conversations": [{"from": "human", "value": "a red circle"}, {"from": "gpt", "value": "red"}]}
        for i in range(8)
    ]
    (tmp_path / "text.json").write_text(json.dumps(records))
    result = train(tiny_dir, "finetune", tmp_path / "text.json", None, tmp_path / "out", cache_vision_features=True,
                   **RUN, max_steps=2)  # fmt: skip
    assert result.global_step == 2
    assert "the kept records hold no image, nothing to cache" in caplog.text


def test_the_tower_is_restored_and_real_pixels_under_the_cache_are_refused(tiny, shapes):
    model, processor = tiny
    records = load_training_records(shapes["qa"], shapes["images"])
    images = [image for index in range(len(records)) for image in records[index].images]
    cache = build_cache(model, processor, images)
    assert len(cache.rows) == len(set(images))
    tower, _ = vision_tower_of(model)
    layer = model.config.vision_feature_layer  # the layer the projector reads (the only one cached)
    pixel_values = processor.image_processor(images=[Image.open(images[0])], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        reference = tower(pixel_values, output_hidden_states=True).hidden_states[layer]
        with cached_vision_tower(model, cache):
            assert "forward" in vars(tower)
            with pytest.raises(ValueError, match="not cache rows"):
                tower(pixel_values)
            dataset = SupervisedDataset(records, [0], processor, None, cache)
            stand_in = dataset[0]["pixel_values"]
            assert stand_in.shape == pixel_values.shape
            looked_up = tower(stand_in, output_hidden_states=True).hidden_states[layer]
    assert "forward" not in vars(tower)
    torch.testing.assert_close(looked_up, reference, rtol=0, atol=1e-6)


def test_images_in_memory_a_training_tower_and_dropout_are_refused(tiny, shapes, tmp_path):
    model, processor = tiny
    with pytest.raises(ValueError, match="needs the images as files; got a Image"):
        build_cache(model, processor, [Image.new("RGB", (32, 32))])
    tower, _ = vision_tower_of(model)
    parameter = next(tower.parameters())
    parameter.requires_grad_(True)
    try:
        with pytest.raises(ValueError, match="needs a frozen vision tower, but .* parameters train"):
            check_cacheable(model)
    finally:
        parameter.requires_grad_(False)
    with_dropout, _ = build_tiny_checkpoint(seed=0)
    with_dropout.requires_grad_(False)
    with_dropout.model.vision_tower.config.attention_dropout = 0.1
    with pytest.raises(ValueError, match="active dropout \\{'attention_dropout': 0.1\\}"):
        check_cacheable(with_dropout)


def test_the_train_command_takes_the_flag(tiny_dir, shapes, tmp_path, capsys):
    from ms_llava.cli import main

    code = main(["train", "--stage", "pretrain", "--model", str(tiny_dir), "--data", str(shapes["caption"]),
                 "--image-folder", str(shapes["images"]), "--output-dir", str(tmp_path / "out"), "--max-steps", "2",
                 "--num-workers", "0", "--cache-vision-features"])  # fmt: skip
    assert code == 0
    assert "trained pretrain: 2 steps" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "ms_llava"
