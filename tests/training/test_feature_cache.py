"""The frozen vision tower's feature cache (ms_llava.training.feature_cache; `train(..., cache_vision_features=True)`).

The cache must change nothing but the time: the per-step losses and the trained weights equal an uncached run's, on
MS-LLaVA and on transformers' LLaVA (its MLP projector over every token), and the saved checkpoint holds the real
tower. The cache keeps what the model's own image path hands its projector; the data set yields it with the same tokens
and labels, and a pre-hook feeds it back as `inputs_embeds`; nothing of the model is replaced. Refusals name what
cannot be cached.
"""

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

from ms_llava import MSLlavaProcessor
from ms_llava.testing_utils import build_tiny_checkpoint, build_tiny_processor, build_tiny_tokenizer
from ms_llava.training import train
from ms_llava.training.data import RightPaddingCollator, SupervisedDataset, load_training_records
from ms_llava.training.feature_cache import build_cache, check_cacheable, vision_features_input

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = {"dataloader_num_workers": 0, "save_steps": 1000, "warmup_ratio": 0.1, "global_batch_size": 8}
STEPS = {"learning_rate": 1e-2, "max_steps": 6}


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


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["ms_llava", "llava"])
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_the_cache_gives_the_same_losses_and_weights(architecture, stage, tiny_dir, shapes, tmp_path):
    start = tiny_dir if architecture == "ms_llava" else tiny_llava(tmp_path / "llava")
    data = shapes["caption24"] if stage == "pretrain" else shapes["qa24"]
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


@pytest.mark.slow
def test_a_later_run_in_the_same_process_reuses_the_cache(tiny_dir, shapes, tmp_path, caplog):
    # Shared explicitly: a cache built once and handed to each run (no state kept between runs by the module).
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    records = load_training_records(shapes["qa24"], shapes["images"])
    images = [image for index in range(len(records)) for image in records[index].images]
    cache = build_cache(model, AutoProcessor.from_pretrained(tiny_dir), images)
    caplog.set_level(logging.INFO)
    caplog.clear()
    for name in ("a", "b"):
        train(
            tiny_dir,
            "finetune",
            shapes["qa24"],
            shapes["images"],
            tmp_path / name,
            cache_vision_features=True,
            feature_cache=cache,
            **RUN,
            max_steps=1,
        )
    assert caplog.text.count("vision feature cache: reused (24 images)") == 2
    assert "vision feature cache: 24 images" not in caplog.text  # never built again
    other = build_cache(model, AutoProcessor.from_pretrained(tiny_dir), images[:1])
    with pytest.raises(ValueError, match="the feature_cache given lacks 23 of the 24 images"):
        train(
            tiny_dir,
            "finetune",
            shapes["qa24"],
            shapes["images"],
            tmp_path / "c",
            cache_vision_features=True,
            feature_cache=other,
            **RUN,
            max_steps=1,
        )
    with pytest.raises(ValueError, match="feature_cache is used with cache_vision_features=True only"):
        train(
            tiny_dir,
            "finetune",
            shapes["qa24"],
            shapes["images"],
            tmp_path / "d",
            feature_cache=cache,
            **RUN,
            max_steps=1,
        )


@pytest.mark.slow
def test_text_only_records_train_with_the_flag(tiny_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    records = [
        {"id": f"t{i}", "conversations": [{"from": "human", "value": "a red circle"}, {"from": "gpt", "value": "red"}]}
        for i in range(8)
    ]
    (tmp_path / "text.json").write_text(json.dumps(records))
    result = train(
        tiny_dir,
        "finetune",
        tmp_path / "text.json",
        None,
        tmp_path / "out",
        cache_vision_features=True,
        **RUN,
        max_steps=2,
    )
    assert result.global_step == 2
    assert "the kept records hold no image, nothing to cache" in caplog.text


def test_the_cache_holds_the_selected_features_and_the_data_set_yields_them(tiny, shapes):
    model, processor = tiny
    records = load_training_records(shapes["qa24"], shapes["images"])
    images = [image for index in range(len(records)) for image in records[index].images]
    cache = build_cache(model, processor, images)
    assert len(cache) == len(set(images))
    tower, config = model.model.vision_tower, model.config
    assert "forward" not in vars(tower) and not tower._forward_pre_hooks and not tower._forward_hooks
    assert not model.model.multi_modal_projector._forward_pre_hooks  # the capturing hook is gone
    pixel_values = processor.image_processor(images=[Image.open(images[0])], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = tower(pixel_values, output_hidden_states=True).hidden_states[config.vision_feature_layer]
        assert config.vision_feature_select_strategy == "default"  # the CLS token is dropped
        torch.testing.assert_close(cache[images[0]], hidden[0, 1:], rtol=0, atol=1e-6)
        from_pixels = model.model.get_image_features(pixel_values=pixel_values).pooler_output[0]
        args, kwargs = cache.projector_args
        from_cache = model.model.multi_modal_projector(cache[images[0]][None], *args, **kwargs)[0]
        torch.testing.assert_close(from_cache, from_pixels, rtol=0, atol=1e-6)
    kept = list(range(len(records)))
    plain = SupervisedDataset(records, kept, processor, None)
    cached = SupervisedDataset(records, kept, processor, None, cache)
    for index in kept:  # the same tokens and labels; features in place of pixels
        expected, got = plain[index], cached[index]
        assert torch.equal(got["input_ids"], expected["input_ids"]) and torch.equal(got["labels"], expected["labels"])
        assert "pixel_values" not in got
        assert torch.equal(got["vision_features"], torch.stack([cache[image] for image in records[index].images]))
    batch = RightPaddingCollator(0)([cached[0], cached[1]])
    assert batch["vision_features"].shape == (2, *cache.features.shape[1:])


@pytest.mark.parametrize("architecture", ["ms_llava", "llava"])
def test_the_model_takes_cached_features_for_the_block_only(architecture, tiny, tmp_path):
    """Inside `vision_features_input` the model (MS-LLaVA, transformers' LLaVA) takes `vision_features` in place of
    `pixel_values` with the same logits; both at once, or features that do not fill the image tokens, are refused;
    after the block the hook is gone."""
    model, processor = tiny
    if architecture == "llava":
        model = LlavaForConditionalGeneration.from_pretrained(tiny_llava(tmp_path / "llava")).eval()
        processor = AutoProcessor.from_pretrained(tmp_path / "llava")
    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "red.png")
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.open(tmp_path / "red.png")},
                {"type": "text", "text": "color?"},
            ],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=True, return_tensors="pt"
    )
    text = {key: value for key, value in inputs.items() if key != "pixel_values"}
    cache = build_cache(model, processor, [tmp_path / "red.png"])
    features = cache[tmp_path / "red.png"][None]
    hooks = dict(model.model._forward_pre_hooks)
    with torch.no_grad(), vision_features_input(model, cache):
        torch.testing.assert_close(
            model(**text, vision_features=features).logits, model(**inputs).logits, rtol=0, atol=1e-6
        )
        with pytest.raises(ValueError, match="got both pixel_values and vision_features"):
            model(**inputs, vision_features=features)
        with pytest.raises(ValueError):  # a feature row short
            model(**text, vision_features=features[:, 1:])
        with pytest.raises(ValueError, match=r"image tokens for \(2, "):
            model(**text, vision_features=torch.cat([features, features]))
    assert dict(model.model._forward_pre_hooks) == hooks  # the hook is gone after the block


def test_images_in_memory_a_training_tower_and_dropout_are_refused(tiny, shapes, tmp_path):
    model, processor = tiny
    with pytest.raises(ValueError, match="needs the images as files; got a Image"):
        build_cache(model, processor, [Image.new("RGB", (32, 32))])
    parameter = next(model.model.vision_tower.parameters())
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


@pytest.mark.slow
def test_the_train_command_takes_the_flag(tiny_dir, shapes, tmp_path, capsys):
    from ms_llava_cli import main

    code = main(
        [
            "train",
            "--stage",
            "pretrain",
            "--model",
            str(tiny_dir),
            "--data",
            str(shapes["caption24"]),
            "--image-folder",
            str(shapes["images"]),
            "--output-dir",
            str(tmp_path / "out"),
            "--max-steps",
            "2",
            "--num-workers",
            "0",
            "--cache-vision-features",
        ]
    )
    assert code == 0
    assert "trained pretrain: 2 steps" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "ms_llava"
