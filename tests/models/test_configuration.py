import json

import pytest
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig

from ms_llava import MSLlavaConfig, MSResamplerConfig


def test_defaults_follow_the_paper():
    config = MSLlavaConfig()
    resampler = config.resampler_config
    assert isinstance(resampler, MSResamplerConfig)
    assert resampler.num_queries == 144 and resampler.query_grid_shape == (12, 12)
    assert resampler.scope_windows == [2, 6, 24] and resampler.num_branches == 3
    assert resampler.fusion == "channel_mlp"
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert config.vision_grid_size == (24, 24)
    assert config.image_seq_length == 144
    # LlavaConfig's name for the image token id keeps working
    assert config.image_token_index == config.image_token_id == 32000


def test_non_square_query_grid():
    config = MSResamplerConfig(num_queries=12, query_grid=(3, 4))
    assert config.query_grid_shape == (3, 4)


def test_json_round_trip_and_auto_config(tmp_path):
    config = MSLlavaConfig(resampler_config={"num_queries": 36, "scope_windows": [2, 5], "scope_bias_strength": 2.5})
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "ms_llava"
    assert saved["resampler_config"]["num_queries"] == 36
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, MSLlavaConfig)
    assert loaded.resampler_config.to_dict() == config.resampler_config.to_dict()
    assert loaded.resampler_config.scope_windows == [2, 5]


@pytest.mark.parametrize(
    ("kwargs", "field", "value"),
    [
        ({"num_queries": 0}, "num_queries", "0"),
        ({"num_queries": 10}, "num_queries", "10"),
        ({"num_queries": 12, "query_grid": (3, 5)}, "query_grid", "(3, 5)"),
        ({"num_queries": 4, "query_grid": (2, -2)}, "query_grid", "-2"),
        ({"scope_windows": []}, "scope_windows", "[]"),
        ({"scope_windows": [2, 0]}, "scope_windows", "[2, 0]"),
        ({"scope_windows": [2, 2.5]}, "scope_windows", "2.5"),
        ({"scope_bias_strength": -1.0}, "scope_bias_strength", "-1.0"),
        ({"scope_bias_strength": float("nan")}, "scope_bias_strength", "nan"),
        ({"fusion": "sum"}, "fusion", "sum"),
        ({"fusion_hidden_size": 0}, "fusion_hidden_size", "0"),
        ({"hidden_size": 30, "num_attention_heads": 4}, "hidden_size", "30"),
        ({"learnable_scope_bias": "yes"}, "learnable_scope_bias", "yes"),
        ({"fusion_act": "relu6x"}, "fusion_act", "relu6x"),
        ({"initializer_range": -0.1}, "initializer_range", "-0.1"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps", "0.0"),
    ],
)
def test_bad_resampler_values_raise_value_error_naming_field_and_value(kwargs, field, value):
    # transformers' @strict configs: types checked declaratively, ranges and cross-field rules in validate_architecture
    with pytest.raises(StrictDataclassError) as error:
        MSResamplerConfig(**kwargs)
    assert field in str(error.value) and value in str(error.value)


@pytest.mark.parametrize(
    ("kwargs", "field", "value"),
    [
        ({"vision_feature_select_strategy": "cls"}, "vision_feature_select_strategy", "cls"),
        ({"vision_feature_layer": "last"}, "vision_feature_layer", "last"),
        ({"image_token_id": -3}, "image_token_id", "-3"),
        ({"resampler_config": {"fusion": "max"}}, "fusion", "max"),
    ],
)
def test_bad_model_values_raise_value_error(kwargs, field, value):
    with pytest.raises(StrictDataclassError) as error:
        MSLlavaConfig(**kwargs)
    assert field in str(error.value) and value in str(error.value)


def test_bad_value_in_saved_config_is_refused_on_load(tmp_path):
    MSLlavaConfig().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    saved["resampler_config"]["scope_windows"] = [3, -1]
    path.write_text(json.dumps(saved))
    with pytest.raises(StrictDataclassError, match=r"scope_windows.*\[3, -1\]"):
        AutoConfig.from_pretrained(tmp_path)


def test_image_seq_length_is_m_for_code_written_for_llava():
    """LlavaConfig's `image_seq_length` (read by code written for LLaVA) is M, and follows M when M changes."""
    config = MSLlavaConfig(resampler_config={"num_queries": 36})
    assert config.image_seq_length == config.resampler_config.num_queries == 36
    config.resampler_config.num_queries = 64
    assert config.image_seq_length == 64
    with pytest.raises(ValueError, match=r"image_seq_length=100.*num_queries.*M = 64"):
        config.image_seq_length = 100  # one source of truth: M is set in resampler_config
    assert config.image_seq_length == config.resampler_config.num_queries == 64
    config.image_seq_length = 64  # the same value is accepted (a config.json may carry it)
    assert MSLlavaConfig(resampler_config={"num_queries": 16}, image_seq_length=16).image_seq_length == 16
    with pytest.raises(ValueError, match=r"image_seq_length=576.*M = 144"):
        MSLlavaConfig(image_seq_length=576)


def test_image_seq_length_round_trips_through_config_json(tmp_path):
    MSLlavaConfig(resampler_config={"num_queries": 36}).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    assert "image_seq_length" not in saved  # M is stored once, in resampler_config
    assert AutoConfig.from_pretrained(tmp_path).image_seq_length == 36
    saved["image_seq_length"] = 36  # written by a tool that serialises LLaVA's field: loads
    path.write_text(json.dumps(saved))
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.image_seq_length == loaded.resampler_config.num_queries == 36
    loaded.save_pretrained(tmp_path / "again")
    assert "image_seq_length" not in json.loads((tmp_path / "again" / "config.json").read_text())
    saved["image_seq_length"] = 576  # disagrees with M: refused, naming both values
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"image_seq_length=576.*M = 36"):
        AutoConfig.from_pretrained(tmp_path)


def test_below_the_supported_transformers_the_model_files_say_so_in_one_line(monkeypatch):
    """The package and every checkpoint's remote code load configuration_ms_llava.py first: below transformers 5.18
    it raises one ImportError naming the version needed and the one found (seen on 5.16.1: docs/serving.md)."""
    import runpy

    import transformers

    import ms_llava.configuration_ms_llava as configuration

    monkeypatch.setattr(transformers, "__version__", "5.16.1")
    with pytest.raises(ImportError, match=r"^MS-LLaVA needs transformers >= 5\.18, found 5\.16\.1: pip install -U"):
        runpy.run_path(configuration.__file__)
