"""What a serving engine's Transformers backend reads from MS-LLaVA, checked without the engine.

vLLM's Transformers backend (`vllm serve DIR --model-impl transformers --trust-remote-code`, docs/serving.md) resolves
the class through config.json's `auto_map["AutoModel"]` and `is_backend_compatible()`, sets the *text* config's
`_attn_implementation` to its own registered attention function (which looks up its KV cache by `module.layer_idx`),
builds the model with `AutoModel.from_config`, calls `model.get_image_features(pixel_values)` and reads
`.pooler_output`, and splits the prompt's image placeholders with the processor's `_get_num_multimodal_tokens` and
`mm_token_type_ids`. vLLM itself does not install here: the tests emulate those calls with transformers alone.
"""

import json

import pytest
import torch
from transformers import (
    AttentionInterface,
    AutoConfig,
    AutoModel,
    AutoProcessor,
    LlavaConfig,
    LlavaModel,
)
from transformers.dynamic_module_utils import get_class_from_dynamic_module
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_outputs import BaseModelOutputWithPooling

import ms_llava  # noqa: F401  (registers the Auto classes)
from ms_llava.testing_utils import sample_image

ENGINE = "engine_attn"
engine_calls: list[int] = []


def engine_attention(module, query, key, value, attention_mask, **kwargs):
    """Stands in for vLLM's `vllm_flash_attention_forward`: it needs `module.layer_idx` (vLLM indexes its attention
    instances, and so its KV cache, by it) and otherwise computes what SDPA computes."""
    if not hasattr(module, "layer_idx"):
        raise RuntimeError(f"engine attention called from {type(module).__name__}, which has no layer_idx")
    engine_calls.append(module.layer_idx)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ENGINE, engine_attention)


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """The tiny base model (AutoModel, SDPA throughout), one prompt with two images, and its outputs."""
    model = AutoModel.from_pretrained(tiny_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_dir)
    images = [sample_image(size=48, seed=1), sample_image(size=40, seed=2)]
    inputs = processor(images=images, text="USER: <image>\n<image>\nWhat is this? ASSISTANT:", return_tensors="pt")
    with torch.no_grad():
        vision_features = model.get_vision_features(inputs["pixel_values"])
        features = model.get_image_features(inputs["pixel_values"]).pooler_output
        hidden = model(**inputs).last_hidden_state
    return {
        "model": model,
        "inputs": inputs,
        "vision_features": vision_features,
        "features": features,
        "hidden": hidden,
    }


def remote_classes(folder):
    """The config and AutoModel classes named by `folder`'s config.json auto_map, imported from its module files."""
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    config_class = get_class_from_dynamic_module(auto_map["AutoConfig"], folder)
    model_class = get_class_from_dynamic_module(auto_map["AutoModel"], folder)
    assert model_class.__module__.startswith("transformers_modules"), model_class.__module__
    return config_class, model_class


def engine_model(tiny_dir, reference, how: str):
    """The tiny base model with the engine's attention function set `how`, holding the reference's weights."""
    if how == "text config, before building (vLLM)":
        # The classes of the checkpoint's own files (remote code), as the backend resolves them through auto_map (here
        # `ms_llava` is imported, and the Auto classes would take its registered classes instead).
        config_class, model_class = remote_classes(tiny_dir)
        config = config_class.from_pretrained(tiny_dir)
        config.text_config._attn_implementation = ENGINE
        model = model_class._from_config(config)  # what AutoModel.from_config does with auto_map["AutoModel"]
        model.load_state_dict(reference["model"].state_dict())
        return model.eval()
    model = AutoModel.from_pretrained(tiny_dir).eval()
    model.set_attn_implementation(
        {
            "set_attn_implementation, text config": {"text_config": ENGINE},
            "set_attn_implementation, top-level and text config": {"": ENGINE, "text_config": ENGINE},
            "set_attn_implementation, every config": ENGINE,
        }[how]
    )
    return model


ENGINE_SETTINGS = [
    "text config, before building (vLLM)",
    "set_attn_implementation, text config",
    "set_attn_implementation, top-level and text config",
    "set_attn_implementation, every config",
]


def test_the_stand_in_engine_function_fails_without_layer_idx(reference):
    """The check below can fail: called from the resampler (no layer_idx), the engine's function raises."""
    resampler = reference["model"].multi_modal_projector
    query = torch.randn(1, 2, 3, 4)
    with pytest.raises(RuntimeError, match="MSResampler, which has no layer_idx"):
        engine_attention(resampler, query, query, query, None)


@pytest.mark.parametrize("how", ENGINE_SETTINGS)
def test_the_resampler_never_runs_an_engine_attention_function(tiny_dir, reference, how):
    """Whichever config carries the engine's function, the resampler runs SDPA (its outputs equal the SDPA model's,
    bit for bit) and the language model runs the engine's function in every layer."""
    model = engine_model(tiny_dir, reference, how)
    assert model.config.text_config._attn_implementation == ENGINE
    num_layers = model.config.text_config.num_hidden_layers
    inputs = reference["inputs"]
    with torch.no_grad():
        features = model.get_image_features(vision_features=reference["vision_features"]).pooler_output
        for got, expected in zip(features, reference["features"], strict=True):
            assert torch.equal(got, expected)

        engine_calls.clear()
        text = {key: inputs[key] for key in ("input_ids", "attention_mask")}
        hidden = model(**text, vision_features=reference["vision_features"]).last_hidden_state
        assert sorted(set(engine_calls)) == list(range(num_layers))  # the LM attends through the engine
        torch.testing.assert_close(hidden, reference["hidden"], rtol=0, atol=0)  # the stand-in computes SDPA

        if how != "set_attn_implementation, every config":
            # From the pixels too. Given as one string, the implementation reaches every sub-config, the vision
            # tower's included: CLIP's attention has no layer_idx either, and a real engine sets the text config only.
            features = model.get_image_features(inputs["pixel_values"]).pooler_output
            for got, expected in zip(features, reference["features"], strict=True):
                assert torch.equal(got, expected)


def test_get_image_features_returns_what_the_backend_reads(reference):
    """`get_image_features(pixel_values)`, called positionally as vLLM's backend does, returns a ModelOutput (not a
    tuple) whose `pooler_output` is a list with one `(M, text_hidden)` tensor per image, the type transformers' own
    LLaVA returns, and exactly the embeddings `forward` puts at the image placeholders."""
    model, inputs = reference["model"], reference["inputs"]
    config = model.config
    with torch.no_grad():
        output = model.get_image_features(inputs["pixel_values"])
    assert isinstance(output, BaseModelOutputWithPooling) and not isinstance(output, tuple)
    features = output.pooler_output
    num_images = inputs["pixel_values"].shape[0]
    assert isinstance(features, list) and len(features) == num_images == 2
    for tensor in features:
        assert tensor.shape == (config.resampler_config.num_queries, config.text_config.hidden_size)

    # transformers' LLaVA, at the same tower, returns the same type: a list of per-image tensors in pooler_output
    llava = LlavaModel(
        LlavaConfig(vision_config=config.vision_config, text_config=config.text_config, image_token_id=1)
    ).eval()
    with torch.no_grad():
        llava_output = llava.get_image_features(inputs["pixel_values"])
    assert type(llava_output) is type(output) and isinstance(llava_output.pooler_output, list)

    # what the backend does with a non-tensor pooler_output: it takes it as the per-image embeddings
    with torch.no_grad():
        image_hidden_states = model(**inputs).image_hidden_states
    torch.testing.assert_close(torch.cat(features), image_hidden_states.reshape(-1, config.text_config.hidden_size))


def test_processor_token_counts_split_the_placeholders_per_image(tiny_dir):
    """vLLM asks `_get_num_multimodal_tokens` for the placeholder count of a 10000 x 10000 image (the maximum) and of
    each request image, and splits the positions where `mm_token_type_ids == 1` by those counts: each run must be one
    image's M placeholders, whatever the image's size."""
    processor = AutoProcessor.from_pretrained(tiny_dir)
    m = AutoConfig.from_pretrained(tiny_dir).resampler_config.num_queries
    assert processor._get_num_multimodal_tokens(image_sizes=([10_000, 10_000],))["num_image_tokens"] == [m]

    images = [sample_image(size=size, seed=seed) for seed, size in enumerate((48, 37, 200))]
    sizes = [(image.height, image.width) for image in images]
    counts = processor._get_num_multimodal_tokens(image_sizes=sizes)
    assert counts["num_image_tokens"] == [m, m, m] and counts["num_image_patches"] == [1, 1, 1]

    text = "USER: <image>\nfirst <image>\nsecond <image>\nthird ASSISTANT:"
    processed = processor(images=images, text=text, return_mm_token_type_ids=True, return_tensors="pt")
    token_types = processed["mm_token_type_ids"]
    positions = torch.where(token_types == 1)[1]
    runs = torch.split(positions, counts["num_image_tokens"])
    assert len(runs) == 3
    input_ids = processed["input_ids"][0]
    for run in runs:
        assert torch.equal(run, torch.arange(int(run[0]), int(run[0]) + m))  # contiguous
        assert bool((input_ids[run] == processor.image_token_id).all())
    assert int((input_ids == processor.image_token_id).sum()) == int(token_types.sum()) == 3 * m


def test_saved_auto_map_lets_the_backend_resolve_the_model(tiny_dir):
    """config.json's auto_map names AutoModel (vLLM resolves a remote-code model through it), the model class
    through which the checkpoint loads, and the processor; the remote-code AutoModel class is backend-compatible
    (`_supports_attention_backend`, which vLLM checks) and loads the weights. (Loading through AutoModel with
    trust_remote_code in a process without `ms_llava`: tests/models/test_modeling.py, test_remote_code_load_without_the_package.)"""
    saved = json.loads((tiny_dir / "config.json").read_text())
    assert saved["auto_map"] == {
        "AutoConfig": "configuration_ms_llava.MSLlavaConfig",
        "AutoModel": "modeling_ms_llava.MSLlavaModel",
        "AutoModelForImageTextToText": "modeling_ms_llava.MSLlavaForConditionalGeneration",
    }
    processor_config = json.loads((tiny_dir / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_ms_llava.MSLlavaProcessor"
    for name in ("configuration", "modeling", "processing", "image_processing"):
        assert (tiny_dir / f"{name}_ms_llava.py").is_file()

    _, model_class = remote_classes(tiny_dir)
    assert model_class.__name__ == "MSLlavaModel" and model_class.is_backend_compatible()
    model = model_class.from_pretrained(tiny_dir)
    local = AutoModel.from_pretrained(tiny_dir)
    for (name, value), (_, expected) in zip(model.state_dict().items(), local.state_dict().items(), strict=True):
        assert torch.equal(value, expected), name
