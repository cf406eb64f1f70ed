"""Conversion scripts: LLaVA -> MS-LLaVA, original LLaVA format <-> transformers, on tiny odd-sized random models."""

import json
import re
import runpy
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from llava_checkpoints import save_llava
from messages import chat
from ms_llava import MSLlavaConfig, MSLlavaForConditionalGeneration, MSLlavaProcessor
from ms_llava.conversion.checkpoint_io import ConversionError, check_output, read_checkpoint
from ms_llava.conversion.llava import convert_llava_to_ms_llava
from ms_llava.conversion.llava import main as llava_main
from ms_llava.conversion.original import (
    DEFAULT_MM_VISION_TOWER,
    ORIGINAL_TOWER_PREFIX,
    convert_hf_to_original,
    convert_original_to_hf,
    output_mm_vision_tower,
)
from ms_llava.conversion.original import main as original_main
from ms_llava.modeling_ms_llava import MSResampler
from ms_llava.testing_utils import build_tiny_tokenizer, sample_image, tiny_text_config, tiny_vision_config

ROOT = Path(__file__).resolve().parents[2]
HUB_4X_BUFFER = "vision_tower.vision_model.embeddings.position_ids"
RESAMPLER = {"num_queries": 16, "scope_windows": [2, 4, 8], "hidden_size": 20, "num_attention_heads": 2}


def quiet(_line: str) -> None:
    pass


def tensors_of(path) -> dict[str, torch.Tensor]:
    return {source.name: source.load().clone() for source in read_checkpoint(path)}


def assert_same_tensors(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]):
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and torch.equal(actual[name], tensor), name


# --------------------------------------------------------------------------------------------------------------------
# Tiny source checkpoints
# --------------------------------------------------------------------------------------------------------------------


def tokenizer_without_image_token() -> PreTrainedTokenizerFast:
    """Like an original LLaVA tokenizer: no <image> token (the original code base splices id -200 instead)."""
    return build_tiny_tokenizer(with_image_token=False)


def rewrite_weights(source: Path, target: Path, rename, extra: dict | None = None) -> Path:
    """A copy of `source` whose weights are one safetensors file with every key renamed by `rename` (plus `extra`)."""
    target.mkdir()
    for path in source.iterdir():
        if "safetensors" not in path.name:
            (target / path.name).write_bytes(path.read_bytes())
    tensors = {rename(name): tensor for name, tensor in tensors_of(source).items()}
    save_file({**tensors, **(extra or {})}, target / "model.safetensors")
    return target


def to_new_layout(name: str) -> str:
    for old, new in (
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    ):
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def to_hub_4x_layout(name: str) -> str:
    """llava-hf/llava-1.5-7b-hf's layout (transformers 4.x): old prefixes, CLIP weights under vision_model."""
    return "vision_tower.vision_model." + name[len("vision_tower.") :] if name.startswith("vision_tower.") else name


@pytest.fixture(scope="module")
def llava_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    saved = save_llava(root / "saved")
    return {
        "saved by transformers 5": saved,
        "new layout": rewrite_weights(saved, root / "new", to_new_layout),
        # with the position_ids buffer that CLIP checkpoints of transformers < 4.31 carried
        "4.x hub layout": rewrite_weights(
            saved, root / "hub4x", to_hub_4x_layout, {HUB_4X_BUFFER: torch.arange(65)[None]}
        ),
    }


def original_config(tokenizer_vocab: int, projector_type: str, tokenizer, mm_vision_tower: str) -> dict:
    config = tiny_text_config(tokenizer, tokenizer_vocab).to_dict()
    for name in ("rope_parameters", "dtype", "transformers_version", "architectures"):
        config.pop(name, None)
    config.update(
        architectures=["LlavaLlamaForCausalLM"],
        model_type="llava_llama",
        rope_theta=10000.0,
        torch_dtype="float32",
        mm_vision_tower=mm_vision_tower,
        mm_hidden_size=24,
        mm_projector_type=projector_type,
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        image_aspect_ratio="pad",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        mm_patch_merge_type="flat",
        tune_mm_mlp_adapter=False,
        use_mm_proj=True,
    )
    if projector_type == "ms_resampler":
        config["mm_resampler_config"] = dict(RESAMPLER, fusion="channel_mlp", fusion_hidden_size=5)
    return config


def projector_tensors(projector_type: str, tokenizer) -> dict[str, torch.Tensor]:
    if projector_type == "mlp2x_gelu":
        return {
            "model.mm_projector.0.weight": torch.randn(32, 24),
            "model.mm_projector.0.bias": torch.randn(32),
            "model.mm_projector.2.weight": torch.randn(32, 32),
            "model.mm_projector.2.bias": torch.randn(32),
        }
    config = MSLlavaConfig(
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config(tokenizer),
        resampler_config=dict(RESAMPLER, fusion_hidden_size=5),
    )
    resampler = MSResampler(config)
    return {
        f"model.mm_projector.{name}": tensor.detach() + 0.01 * torch.randn_like(tensor)
        for name, tensor in resampler.state_dict().items()
    }


def save_bin_shards(tensors: dict[str, torch.Tensor], directory: Path, parts: int = 3):
    names = sorted(tensors)
    weight_map = {}
    for part in range(parts):
        file_name = f"pytorch_model-{part + 1:05d}-of-{parts:05d}.bin"
        chunk = {name: tensors[name] for name in names[part::parts]}
        torch.save(chunk, directory / file_name)
        weight_map.update(dict.fromkeys(chunk, file_name))
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def make_original(
    directory: Path, projector_type: str, clip_dir: Path, weights="bin", with_tower=True, tokenizer=None
) -> dict[str, torch.Tensor]:
    """An original-format LLaVA checkpoint: Llama weights (model.*, lm_head.*), model.mm_projector.*, optionally the
    CLIP tower under model.vision_tower.vision_tower.vision_model.*, an original config.json (mm_vision_tower: the
    local CLIP directory `clip_dir`, as researchers' own checkpoints often have) and a tokenizer. Returns the
    tensors."""
    tokenizer = tokenizer or tokenizer_without_image_token()
    directory.mkdir(parents=True)
    torch.manual_seed(1)
    tensors = dict(LlamaForCausalLM(tiny_text_config(tokenizer)).state_dict())
    tensors.update(projector_tensors(projector_type, tokenizer))
    if with_tower:
        tower = CLIPVisionModel(tiny_vision_config()).state_dict()
        tensors.update({ORIGINAL_TOWER_PREFIX + name: tensor for name, tensor in tower.items()})
    tensors = {name: tensor.detach().clone().contiguous() for name, tensor in tensors.items()}
    if weights == "bin":
        save_bin_shards(tensors, directory)
    else:
        save_file(tensors, directory / "model.safetensors")
    (directory / "config.json").write_text(
        json.dumps(original_config(len(tokenizer), projector_type, tokenizer, str(clip_dir)))
    )
    tokenizer.save_pretrained(directory)
    return tensors


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A transformers CLIPVisionModel directory, with a CLIP preprocessor config (the --vision-tower of stage 1)."""
    directory = tmp_path_factory.mktemp("clip")
    torch.manual_seed(2)
    CLIPVisionModel(tiny_vision_config()).save_pretrained(directory)
    preprocessor = {
        "crop_size": {"height": 32, "width": 32},
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "size": {"shortest_edge": 32},
        "image_processor_type": "CLIPImageProcessor",
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return directory


# --------------------------------------------------------------------------------------------------------------------
# LLaVA -> MS-LLaVA
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["saved by transformers 5", "new layout", "4.x hub layout"])
def test_llava_to_ms_llava_carries_tower_lm_tokenizer_over_bit_exactly(llava_dirs, layout, tmp_path):
    source = llava_dirs[layout]
    report = convert_llava_to_ms_llava(source, tmp_path / "out", num_queries=16, scope_windows=[2, 4, 8], log=quiet)
    output = tmp_path / "out"

    assert report.parity == {
        "language model logits (text-only prompt)": 0.0,
        "vision tower hidden states (random image)": 0.0,
    }
    projector_keys = [key for key in tensors_of(source) if "multi_modal_projector" in key]
    assert len(projector_keys) == 4
    expected_dropped = {"MLP projector replaced by MS-Resampler": projector_keys}
    if layout == "4.x hub layout":
        expected_dropped["buffer recomputed by transformers"] = [HUB_4X_BUFFER]
    assert report.dropped == expected_dropped
    source_model = LlavaForConditionalGeneration.from_pretrained(source)
    converted = AutoModelForImageTextToText.from_pretrained(output)
    assert isinstance(converted, MSLlavaForConditionalGeneration)
    converted_state = converted.state_dict()
    for name, tensor in source_model.state_dict().items():
        if "multi_modal_projector" not in name:
            assert torch.equal(converted_state[name], tensor), name
    assert converted.config.image_token_id == source_model.config.image_token_id == 4
    assert converted.config.vision_feature_layer == -2
    assert converted.config.vision_feature_select_strategy == "default"
    assert converted.config.resampler_config.num_queries == 16

    # tokenizer and chat template carried over, processor set to M
    processor = AutoProcessor.from_pretrained(output)
    source_processor = AutoProcessor.from_pretrained(source)
    assert isinstance(processor, MSLlavaProcessor) and processor.num_image_tokens == 16
    assert (output / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    assert (output / "chat_template.jinja").read_bytes() == (source / "chat_template.jinja").read_bytes()
    assert processor.chat_template == source_processor.chat_template
    assert processor.tokenizer.get_vocab() == source_processor.tokenizer.get_vocab()
    assert processor.image_processor.size == source_processor.image_processor.size
    assert processor.image_processor.crop_size == source_processor.image_processor.crop_size


def test_converted_checkpoint_generates(llava_dirs, tmp_path):
    convert_llava_to_ms_llava(llava_dirs["saved by transformers 5"], tmp_path / "out", num_queries=16, log=quiet)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    prompt = processor.apply_chat_template(chat("What is it?"), add_generation_prompt=True)
    inputs = processor(images=sample_image(40), text=prompt, return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 16
    output = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 3


def test_resampler_is_freshly_initialised_like_init_weights(llava_dirs, tmp_path):
    convert_llava_to_ms_llava(
        llava_dirs["new layout"],
        tmp_path / "out",
        num_queries=16,
        scope_bias_strength=3.0,
        fusion="mean",
        seed=7,
        log=quiet,
    )
    written = tensors_of(tmp_path / "out")
    config = MSLlavaConfig.from_pretrained(tmp_path / "out")
    assert config.resampler_config.fusion == "mean" and config.resampler_config.scope_bias_strength == 3.0
    torch.manual_seed(7)
    expected = MSResampler(config).state_dict()  # reset_parameters: what _init_weights runs
    for name, tensor in expected.items():
        assert torch.equal(written[f"model.multi_modal_projector.{name}"], tensor), name
    assert torch.equal(written["model.multi_modal_projector.input_layernorm.weight"], torch.ones(24))
    assert 0.015 < written["model.multi_modal_projector.queries"].std() < 0.025


def test_sharded_output_loads_with_from_pretrained(llava_dirs, tmp_path, capsys):
    args = ["--source", str(llava_dirs["saved by transformers 5"]), "--output", str(tmp_path / "out")]
    assert llava_main([*args, "--num-queries", "16", "--max-shard-size", "40KB"]) == 0
    printed = capsys.readouterr().out
    assert "dropped: MLP projector replaced by MS-Resampler: 4 keys" in printed
    assert "peak resident memory (RSS)" in printed and "max |difference| = 0" in printed
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 3
    for shard in shards:  # at most 40 kB of tensors, unless one tensor alone is larger
        tensors_in_shard = [name for name, file in index["weight_map"].items() if file == shard]
        assert (tmp_path / "out" / shard).stat().st_size < 42_000 or len(tensors_in_shard) == 1
    model = MSLlavaForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert sorted(model.state_dict()) == sorted(index["weight_map"])


def test_write_safetensors_shards_are_indexed_within_the_size_and_loaded_one_shard_at_a_time(tmp_path):
    """Every shard opens with safetensors.safe_open and holds exactly what the index's weight_map says; the weight map
    covers every key; a shard exceeds the size only when one tensor alone does; at most one shard's tensors are alive
    while writing (what bounds the conversions' memory)."""
    from safetensors import safe_open

    from ms_llava.conversion.checkpoint_io import TensorSource, write_safetensors

    alive = weakref.WeakSet()
    peak_alive_bytes = 0

    def source(name, values: torch.Tensor) -> TensorSource:
        def load():
            nonlocal peak_alive_bytes
            tensor = values.clone()
            alive.add(tensor)
            peak_alive_bytes = max(peak_alive_bytes, sum(t.nbytes for t in alive))
            return tensor

        return TensorSource(name, values.dtype, tuple(values.shape), load, "test")

    torch.manual_seed(0)
    expected = {f"layers.{i}.weight": torch.randn(10 + 7 * i, 25) for i in range(12)}  # 1,000 to 8,700 bytes
    expected["embed.weight"] = torch.randn(130, 25)  # 13,000 bytes: alone in a shard above the size
    expected.update({"bf16": torch.randn(3, 5).bfloat16(), "int": torch.arange(6), "empty": torch.zeros(0, 4)})
    expected["scalar"] = torch.tensor(2.5)
    tied = torch.randn(7, 3)  # two keys, one storage (weights tied in a .bin): save_file would refuse them as is
    entries = [(name, source(name, tensor)) for name, tensor in expected.items()]
    entries += [("tied.a", TensorSource("tied.a", tied.dtype, (7, 3), lambda: tied, "test"))]
    entries += [("tied.b", TensorSource("tied.b", tied.dtype, (7, 3), lambda: tied, "test"))]
    expected.update({"tied.a": tied, "tied.b": tied})
    max_shard_size = 10_000
    weight_map = write_safetensors(entries, tmp_path, max_shard_size)

    assert peak_alive_bytes <= 13_000
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map and sorted(weight_map) == sorted(expected)
    assert index["metadata"] == {
        "total_parameters": sum(tensor.numel() for tensor in expected.values()),
        "total_size": sum(tensor.nbytes for tensor in expected.values()),
    }
    shards = sorted(set(weight_map.values()))
    assert len(shards) > 3 and shards == sorted(path.name for path in tmp_path.glob("model-*.safetensors"))
    for shard in shards:
        with safe_open(str(tmp_path / shard), framework="pt") as handle:
            assert sorted(handle.keys()) == sorted(name for name, file in weight_map.items() if file == shard)
            assert handle.metadata() == {"format": "pt"}  # what transformers' from_pretrained expects
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        assert sum(t.nbytes for t in tensors.values()) <= max_shard_size or list(tensors) == ["embed.weight"], shard
        for name, tensor in tensors.items():
            assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name

    # under the size: one model.safetensors and no index
    single = tmp_path / "single"
    single.mkdir()
    assert set(write_safetensors(entries, single, 10**9).values()) == {"model.safetensors"}
    assert sorted(path.name for path in single.iterdir()) == ["model.safetensors"]
    assert_same_tensors(expected, tensors_of(single))


def test_non_llava_source_and_bad_settings_are_refused(llava_dirs, tmp_path):
    with pytest.raises(ConversionError, match=r"num_queries \(M\) must be a perfect square"):
        convert_llava_to_ms_llava(llava_dirs["new layout"], tmp_path / "out", num_queries=15, log=quiet)
    with pytest.raises(ConversionError, match="finer than the visual token grid"):
        convert_llava_to_ms_llava(llava_dirs["new layout"], tmp_path / "out", num_queries=144, log=quiet)
    (tmp_path / "ms").mkdir()
    (tmp_path / "ms" / "config.json").write_text(json.dumps({"model_type": "ms_llava"}))
    with pytest.raises(ConversionError, match="expected a transformers LLaVA checkpoint"):
        convert_llava_to_ms_llava(tmp_path / "ms", tmp_path / "out", num_queries=16, log=quiet)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------------------------
# Bad inputs: a clear error and no output directory
# --------------------------------------------------------------------------------------------------------------------


def leftovers(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.name.startswith(".out"))


def test_missing_shard_is_named(clip_dir, tmp_path):
    source = tmp_path / "orig"
    make_original(source, "mlp2x_gelu", clip_dir)
    (source / "pytorch_model-00002-of-00003.bin").unlink()
    with pytest.raises(ConversionError, match=r"lists shards that do not exist: pytorch_model-00002-of-00003\.bin"):
        convert_original_to_hf(source, tmp_path / "out", log=quiet)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_truncated_safetensors_is_refused(llava_dirs, tmp_path):
    source = rewrite_weights(llava_dirs["new layout"], tmp_path / "src", lambda name: name)
    data = (source / "model.safetensors").read_bytes()
    (source / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(ConversionError, match=r"model\.safetensors: not a valid safetensors file \(truncated"):
        convert_llava_to_ms_llava(source, tmp_path / "out", num_queries=16, log=quiet)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_unknown_key_is_named(llava_dirs, tmp_path):
    source = rewrite_weights(llava_dirs["new layout"], tmp_path / "src", lambda name: name)
    tensors = load_file(source / "model.safetensors")
    tensors["model.image_newline"] = torch.zeros(32)
    save_file(tensors, source / "model.safetensors")
    with pytest.raises(ConversionError, match=r"source keys the key map does not know: model\.image_newline"):
        convert_llava_to_ms_llava(source, tmp_path / "out", num_queries=16, log=quiet)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_unknown_key_in_original_checkpoint_is_named(clip_dir, tmp_path):
    source = tmp_path / "orig"
    tensors = make_original(source, "mlp2x_gelu", clip_dir, weights="safetensors")
    tensors["model.mm_projector.4.weight"] = torch.zeros(32, 32)  # an mlp3x_gelu layer
    del tensors["model.norm.weight"]
    save_file(tensors, source / "model.safetensors")
    with pytest.raises(ConversionError) as error:
        convert_original_to_hf(source, tmp_path / "out", log=quiet)
    assert "source keys the key map does not know: model.mm_projector.4.weight" in str(error.value)
    assert "target keys no source key fills: model.language_model.norm.weight" in str(error.value)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_unknown_projector_type_is_refused(clip_dir, tmp_path):
    source = tmp_path / "orig"
    make_original(source, "mlp2x_gelu", clip_dir, weights="safetensors")
    config = json.loads((source / "config.json").read_text())
    config["mm_projector_type"] = "mlp3x_gelu"
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"unknown mm_projector_type 'mlp3x_gelu'"):
        convert_original_to_hf(source, tmp_path / "out", log=quiet)
    assert not (tmp_path / "out").exists()


def test_bin_files_are_read_with_weights_only(clip_dir, tmp_path):
    source = tmp_path / "orig"
    make_original(source, "mlp2x_gelu", clip_dir)
    shard = source / "pytorch_model-00001-of-00003.bin"
    state_dict = torch.load(shard, weights_only=True)
    state_dict["model.norm.weight"] = _PickledObject()  # anything but tensors would run code on unpickling
    torch.save(state_dict, shard)
    with pytest.raises(
        ConversionError,
        match=r"pytorch_model-00001-of-00003\.bin: cannot be read with torch\.load\(weights_only=True\)",
    ):
        convert_original_to_hf(source, tmp_path / "out", log=quiet)
    assert not (tmp_path / "out").exists()


class _PickledObject:
    def __reduce__(self):
        return (print, ("this must never run",))


def previous_checkpoint(directory: Path, model_type: str = "ms_llava") -> Path:
    """A directory that looks like an earlier conversion's output (what --overwrite may replace)."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": model_type}))
    return directory


def test_non_empty_output_is_kept_unless_overwrite(llava_dirs, tmp_path):
    previous_checkpoint(tmp_path / "out")  # --overwrite replaces only what looks like a conversion's output
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="exists and is not empty; pass --overwrite"):
        convert_llava_to_ms_llava(llava_dirs["new layout"], tmp_path / "out", num_queries=16, log=quiet)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    convert_llava_to_ms_llava(llava_dirs["new layout"], tmp_path / "out", num_queries=16, overwrite=True, log=quiet)
    # --overwrite replaces the checkpoint's files only: the user's own file is kept (issue 18)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine" and (tmp_path / "out" / "config.json").is_file()
    assert not leftovers(tmp_path)


def test_a_failure_after_writing_leaves_the_previous_output(llava_dirs, tmp_path, monkeypatch):
    """Everything is written to a temporary sibling first: a late failure (here a parity mismatch) removes it and keeps
    what --output held."""
    import ms_llava.conversion.llava

    monkeypatch.setattr(ms_llava.conversion.llava, "check_llava_parity", lambda *args: {"logits": 1e-3})
    previous_checkpoint(tmp_path / "out")  # --overwrite replaces only what looks like a conversion's output
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="parity check failed"):
        convert_llava_to_ms_llava(
            llava_dirs["new layout"], tmp_path / "out", num_queries=16, overwrite=True, log=quiet
        )
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["config.json", "keep.txt"]
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {"model_type": "ms_llava"}
    assert not leftovers(tmp_path)


def test_overwrite_replaces_a_previous_conversion_output(llava_dirs, tmp_path):
    """What the conversions write (model_type ms_llava, llava_llama; no subdirectory) is what --overwrite replaces."""
    source = llava_dirs["new layout"]
    convert_llava_to_ms_llava(source, tmp_path / "out", num_queries=16, check_parity=False, log=quiet)
    assert not [path for path in (tmp_path / "out").iterdir() if path.is_dir()]
    report = convert_llava_to_ms_llava(
        source, tmp_path / "out", num_queries=16, seed=3, overwrite=True, check_parity=False, log=quiet
    )
    assert report.output == tmp_path / "out" and MSLlavaConfig.from_pretrained(tmp_path / "out").model_type
    convert_hf_to_original(tmp_path / "out", tmp_path / "orig", mm_vision_tower="tiny", check_parity=False, log=quiet)
    convert_hf_to_original(
        tmp_path / "out", tmp_path / "orig", mm_vision_tower="tiny2", overwrite=True, check_parity=False, log=quiet
    )
    assert json.loads((tmp_path / "orig" / "config.json").read_text())["mm_vision_tower"] == "tiny2"
    assert not leftovers(tmp_path)


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ("project folder", r"it has no config\.json, so it is not a checkpoint written by a conversion"),
        ("config.json of another model", r"its config\.json has model_type 'clip_vision_model', not one"),
        ("config.json that is not JSON", r"its config\.json cannot be read as JSON"),
        ("config.json that is a list", r"its config\.json has model_type None"),
        ("checkpoint with a subdirectory", r"it has subdirectories, which the conversions never write: \.git"),
    ],
)
def test_overwrite_refuses_what_is_not_a_conversion_output(setup, reason, llava_dirs, tmp_path):
    """--overwrite never deletes a directory that does not look like a checkpoint a conversion wrote; the error names
    the path and why, and nothing in it changes."""
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    if setup == "project folder":
        (output / "src").mkdir()
        (output / "src" / "main.py").write_text("print('mine')")
    elif setup == "config.json of another model":
        (output / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    elif setup == "config.json that is not JSON":
        (output / "config.json").write_text("{not json")
    elif setup == "config.json that is a list":
        (output / "config.json").write_text("[]")
    else:
        (output / "config.json").write_text(json.dumps({"model_type": "llava"}))
        (output / ".git").mkdir()
    before = sorted(str(path.relative_to(output)) for path in output.rglob("*"))
    for overwrite in (True, False):
        with pytest.raises(
            ConversionError, match=rf"--output {re.escape(str(output))} exists and is not empty.*{reason}"
        ):
            convert_llava_to_ms_llava(
                llava_dirs["new layout"], output, num_queries=16, overwrite=overwrite, check_parity=False, log=quiet
            )
    assert sorted(str(path.relative_to(output)) for path in output.rglob("*")) == before
    assert (output / "notes.txt").read_text() == "mine"
    assert not leftovers(tmp_path)


def test_overwrite_never_replaces_the_working_directory(llava_dirs, tmp_path, monkeypatch, capsys):
    """`--output . --overwrite` in a folder (even one that looks like a checkpoint) is refused, and so is a folder
    that contains the working directory."""
    project = previous_checkpoint(tmp_path / "project")
    (project / "keep.txt").write_text("mine")
    (project / "sub").mkdir()
    monkeypatch.chdir(project)
    args = ["--source", str(llava_dirs["new layout"]), "--num-queries", "16", "--no-parity", "--overwrite"]
    assert llava_main([*args, "--output", "."]) == 1
    assert f"--output {project} cannot be written or replaced: it is the current working directory" in (
        capsys.readouterr().err
    )
    monkeypatch.chdir(project / "sub")
    assert llava_main([*args, "--output", ".."]) == 1
    assert "cannot be written or replaced: it contains the current working directory" in capsys.readouterr().err
    assert sorted(path.name for path in project.iterdir()) == ["config.json", "keep.txt", "sub"]
    assert not leftovers(tmp_path)


def test_overwrite_never_replaces_home_or_a_root(llava_dirs, tmp_path, monkeypatch):
    home = previous_checkpoint(tmp_path / "home")  # even a home that looks like a checkpoint
    (home / "keep.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    for output in (home, tmp_path / "link-to-home"):
        if output.name == "link-to-home":
            output.symlink_to(home, target_is_directory=True)
        with pytest.raises(ConversionError, match=r"cannot be written or replaced: it is the home directory"):
            convert_llava_to_ms_llava(
                llava_dirs["new layout"], output, num_queries=16, overwrite=True, check_parity=False, log=quiet
            )
    assert sorted(path.name for path in home.iterdir()) == ["config.json", "keep.txt"]
    # a folder holding the home directory, and a filesystem root: the check alone, nothing is converted
    with pytest.raises(ConversionError, match=r"it contains the home directory"):
        check_output(tmp_path, overwrite=True)
    with pytest.raises(ConversionError, match=r"--output / cannot be written or replaced: it is a filesystem root"):
        check_output("/", overwrite=True)
    assert not leftovers(tmp_path)


def test_conversions_share_the_parity_limit_image_token_and_failure_reporting(
    llava_dirs, clip_dir, tmp_path, monkeypatch
):
    from ms_llava.conversion import checkpoint_io
    from ms_llava.conversion import llava as convert_llava
    from ms_llava.conversion import original as convert_original

    assert all(hasattr(checkpoint_io, name) for name in checkpoint_io.__all__)
    assert checkpoint_io.parity_skip_reason(False, 10) == "--no-parity"
    assert checkpoint_io.parity_skip_reason(True, 10) is None
    assert checkpoint_io.parity_skip_reason(True, 1_500_000_000) is None  # the limit itself is still checked
    assert checkpoint_io.parity_skip_reason(True, 2_000_000_000) == (
        "2,000,000,000 parameters > 1,500,000,000: too large to build both models"
    )

    # one implementation serves both modules: the size limit, and the failure messages each module always gave
    monkeypatch.setattr(checkpoint_io, "PARITY_MAX_PARAMETERS", 1000)
    report = convert_llava_to_ms_llava(llava_dirs["new layout"], tmp_path / "a", num_queries=16, log=quiet)
    assert report.parity == {} and report.parity_skipped.endswith("parameters > 1,000: too large to build both models")
    assert report.tensors_written == len(tensors_of(tmp_path / "a")) and report.peak_rss > 0 and report.seconds > 0
    report = convert_hf_to_original(tmp_path / "a", tmp_path / "b", mm_vision_tower="tiny", log=quiet)
    assert report.parity == {} and report.parity_skipped.endswith("parameters > 1,000: too large to build both models")
    make_original(tmp_path / "orig", "mlp2x_gelu", clip_dir, weights="safetensors")
    report = convert_original_to_hf(tmp_path / "orig", tmp_path / "hf", log=quiet)
    assert report.parity == {} and report.parity_skipped.endswith("parameters > 1,000: too large to build both models")
    # the image token original-to-hf adds is the one the LLaVA -> MS-LLaVA output and its source use
    for directory in (tmp_path / "hf", tmp_path / "a", llava_dirs["new layout"]):
        processor = AutoProcessor.from_pretrained(directory)
        image_token_id = AutoConfig.from_pretrained(directory).image_token_id
        assert processor.image_token == "<image>", directory
        assert processor.tokenizer.convert_ids_to_tokens(image_token_id) == "<image>", directory
    monkeypatch.undo()
    monkeypatch.setattr(convert_llava, "check_llava_parity", lambda *args: {"logits": 1e-3})
    with pytest.raises(
        ConversionError, match=r"^parity check failed, the carried-over parts differ: \{'logits': 0\.001\}$"
    ):
        convert_llava_to_ms_llava(llava_dirs["new layout"], tmp_path / "c", num_queries=16, log=quiet)
    monkeypatch.setattr(convert_original, "check_original_parity", lambda *args: {"logits": 0.0, "tower": 2.0})
    with pytest.raises(ConversionError, match=r"^parity check failed: \{'tower': 2\.0\}$"):
        convert_hf_to_original(tmp_path / "a", tmp_path / "d", mm_vision_tower="tiny", log=quiet)
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_hub_sources_download_the_shared_patterns(tmp_path, clip_dir, monkeypatch):
    """--source, --base-llm and --vision-tower given as Hub ids download HUB_ALLOW_PATTERNS (plus *.bin for original
    checkpoints, which are often .bin)."""
    import huggingface_hub

    from ms_llava.conversion.checkpoint_io import HUB_ALLOW_PATTERNS

    asked = []

    def fake_snapshot_download(repo_id, allow_patterns):
        asked.append((repo_id, allow_patterns))
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(ConversionError, match="downloading it from the Hub failed: offline"):
        convert_llava_to_ms_llava("org/llava", tmp_path / "a", log=quiet)
    with pytest.raises(ConversionError, match="downloading it from the Hub failed: offline"):
        convert_original_to_hf("org/original", tmp_path / "b", log=quiet)
    with pytest.raises(ConversionError, match="downloading it from the Hub failed: offline"):
        convert_hf_to_original("org/hf", tmp_path / "c", log=quiet)
    make_original(tmp_path / "local", "mlp2x_gelu", clip_dir)  # a local source, with the base LLM on the Hub
    with pytest.raises(ConversionError, match="downloading it from the Hub failed: offline"):
        convert_original_to_hf(tmp_path / "local", tmp_path / "d", base_llm="org/vicuna", log=quiet)
    for _, patterns in asked:  # configs, safetensors weights, tokenizers of every kind and chat templates
        assert {"*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"} <= set(patterns)
    assert asked == [
        ("org/llava", HUB_ALLOW_PATTERNS),
        ("org/original", [*HUB_ALLOW_PATTERNS, "*.bin"]),
        ("org/hf", HUB_ALLOW_PATTERNS),
        ("org/vicuna", [*HUB_ALLOW_PATTERNS, "*.bin"]),  # a base LLM is often .bin too
    ]
    assert "*.bin" not in asked[0][1] and "*.bin" not in asked[2][1]  # transformers checkpoints: safetensors only


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    assert original_main(["--source", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")]) == 1
    assert "error: " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------------------------
# Original format <-> transformers
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("projector_type", "weights"),
    [("mlp2x_gelu", "bin"), ("mlp2x_gelu", "safetensors"), ("ms_resampler", "bin"), ("ms_resampler", "safetensors")],
)
def test_original_to_hf_to_original_round_trip(projector_type, weights, clip_dir, tmp_path):
    source = tmp_path / "orig"
    original = make_original(source, projector_type, clip_dir, weights=weights)
    report = convert_original_to_hf(source, tmp_path / "hf", max_shard_size="50KB", log=quiet)

    assert set(report.parity.values()) == {0.0} and len(report.parity) == 3
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf")
    expected_class = (
        LlavaForConditionalGeneration if projector_type == "mlp2x_gelu" else MSLlavaForConditionalGeneration
    )
    assert type(model) is expected_class
    # <image> was added as the next id, the embeddings grown by one row (the mean of the others)
    vocab = original["model.embed_tokens.weight"].shape[0]
    assert model.config.image_token_id == vocab and model.config.text_config.vocab_size == vocab + 1
    embed = model.get_input_embeddings().weight
    assert torch.equal(embed[:vocab], original["model.embed_tokens.weight"])
    torch.testing.assert_close(embed[vocab], original["model.embed_tokens.weight"].mean(0))
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    assert processor.image_processor.do_pad  # image_aspect_ratio "pad"
    prompt = processor.apply_chat_template(chat("What is it?"), add_generation_prompt=True)
    inputs = processor(images=sample_image(40), text=prompt, return_tensors="pt")
    model.generate(**inputs, max_new_tokens=2, do_sample=False)

    # the source's mm_vision_tower (a local CLIP directory, not LLaVA-1.5's tower) is recorded in the HF config
    assert model.config.vision_config.mm_vision_tower == str(clip_dir)

    report = convert_hf_to_original(tmp_path / "hf", tmp_path / "back", strip_image_token=True, log=quiet)
    assert set(report.parity.values()) == {0.0}
    assert_same_tensors(original, tensors_of(tmp_path / "back"))
    config, source_config = (json.loads((d / "config.json").read_text()) for d in (tmp_path / "back", source))
    assert config["mm_vision_tower"] == source_config["mm_vision_tower"] == str(clip_dir)
    for name in (
        "mm_vision_tower",
        "mm_projector_type",
        "mm_vision_select_layer",
        "mm_vision_select_feature",
        "image_aspect_ratio",
        "vocab_size",
        "hidden_size",
        "rope_theta",
        "mm_hidden_size",
    ):
        assert config[name] == source_config[name], name
    if projector_type == "ms_resampler":  # every field written out, the source's values kept
        written = config["mm_resampler_config"]
        assert {name: written[name] for name in source_config["mm_resampler_config"]} == source_config[
            "mm_resampler_config"
        ]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "back")
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(source).get_vocab()


def test_stage1_projector_with_base_llm_and_vision_tower(clip_dir, tmp_path):
    tokenizer = tokenizer_without_image_token()
    full = make_original(
        tmp_path / "full", "ms_resampler", clip_dir, weights="safetensors", with_tower=False, tokenizer=tokenizer
    )
    base = tmp_path / "vicuna"
    language_model = {name: tensor for name, tensor in full.items() if not name.startswith("model.mm_projector.")}
    llama = LlamaForCausalLM(tiny_text_config(tokenizer))
    llama.load_state_dict(language_model)
    llama.save_pretrained(base)
    tokenizer.save_pretrained(base)
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    (stage1 / "config.json").write_bytes((tmp_path / "full" / "config.json").read_bytes())
    torch.save({n: t for n, t in full.items() if n.startswith("model.mm_projector.")}, stage1 / "mm_projector.bin")

    with pytest.raises(ConversionError, match="pass --base-llm"):
        convert_original_to_hf(stage1, tmp_path / "hf", vision_tower=clip_dir, log=quiet)
    with pytest.raises(ConversionError, match="holds no vision tower weights.*pass --vision-tower"):
        convert_original_to_hf(stage1, tmp_path / "hf", base_llm=base, log=quiet)
    report = convert_original_to_hf(stage1, tmp_path / "hf", base_llm=base, vision_tower=clip_dir, log=quiet)
    assert set(report.parity.values()) == {0.0} and len(report.parity) == 3
    hf_model = MSLlavaForConditionalGeneration.from_pretrained(tmp_path / "hf")
    clip = CLIPVisionModel.from_pretrained(clip_dir)
    for name, tensor in clip.state_dict().items():
        assert torch.equal(hf_model.model.vision_tower.state_dict()[name], tensor), name

    convert_hf_to_original(
        tmp_path / "hf", tmp_path / "back", strip_image_token=True, exclude_vision_tower=True, log=quiet
    )
    assert_same_tensors(full, tensors_of(tmp_path / "back"))
    source_config = json.loads((stage1 / "config.json").read_text())
    assert json.loads((tmp_path / "back" / "config.json").read_text())["mm_vision_tower"] == str(clip_dir)
    assert source_config["mm_vision_tower"] == str(clip_dir)
    convert_hf_to_original(tmp_path / "hf", tmp_path / "back_with_tower", strip_image_token=True, log=quiet)
    expected = dict(full, **{ORIGINAL_TOWER_PREFIX + name: t for name, t in clip.state_dict().items()})
    assert_same_tensors(expected, tensors_of(tmp_path / "back_with_tower"))
    config = json.loads((tmp_path / "back_with_tower" / "config.json").read_text())
    assert config["unfreeze_mm_vision_tower"] is True  # the original code base then uses the stored tower
    assert config["mm_vision_tower"] == source_config["mm_vision_tower"]


def test_transformers_llava_to_original_and_back(llava_dirs, clip_dir, tmp_path):
    """A transformers LLaVA (with <image> already in its vocabulary) goes to the original format and back unchanged."""
    source = llava_dirs["4.x hub layout"]
    with pytest.raises(ConversionError, match=r"--strip-image-token: <image> \(id 4\) is not the last of the 400"):
        convert_hf_to_original(source, tmp_path / "orig", strip_image_token=True, log=quiet)
    report = convert_hf_to_original(source, tmp_path / "orig", mm_vision_tower=str(clip_dir), log=quiet)
    assert set(report.parity.values()) == {0.0}
    written = tensors_of(tmp_path / "orig")
    assert "model.mm_projector.0.weight" in written and "model.mm_projector.2.bias" in written
    assert any(name.startswith(ORIGINAL_TOWER_PREFIX) for name in written)
    convert_original_to_hf(tmp_path / "orig", tmp_path / "hf", log=quiet)
    before = LlavaForConditionalGeneration.from_pretrained(source).state_dict()
    after = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").state_dict()
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


def test_hf_to_original_does_not_name_another_tower_clip_vit_l_336(llava_dirs, tmp_path):
    """A transformers LLaVA records no mm_vision_tower: LLaVA-1.5's tower name is written only for a tower of its
    dimensions, so the tiny tower needs --mm-vision-tower."""
    message = (
        r"the vision tower \(hidden_size 24, image_size 32, patch_size 4\) is not openai/clip-vit-large-patch14-336 "
        r"\(hidden_size 1024, image_size 336, patch_size 14\) and the checkpoint records no mm_vision_tower .*"
        r"pass --mm-vision-tower"
    )
    for exclude in (False, True):
        with pytest.raises(ConversionError, match=message):
            convert_hf_to_original(
                llava_dirs["new layout"],
                tmp_path / "orig",
                exclude_vision_tower=exclude,
                check_parity=False,
                log=quiet,
            )
    assert not (tmp_path / "orig").exists() and not leftovers(tmp_path)


def test_output_mm_vision_tower_rule():
    vit_l_336 = CLIPVisionConfig(hidden_size=1024, num_attention_heads=16, image_size=336, patch_size=14)
    assert output_mm_vision_tower(vit_l_336, None, Path("src")) == DEFAULT_MM_VISION_TOWER
    assert output_mm_vision_tower(vit_l_336, "my/clip", Path("src")) == "my/clip"
    vit_l_336.mm_vision_tower = "/data/clip-vit-large-patch14-336"  # recorded by original-to-hf
    assert output_mm_vision_tower(vit_l_336, None, Path("src")) == "/data/clip-vit-large-patch14-336"
    assert output_mm_vision_tower(vit_l_336, "my/clip", Path("src")) == "my/clip"
    for other in ({"image_size": 224}, {"patch_size": 16, "image_size": 224}, {"hidden_size": 768}):
        config = CLIPVisionConfig(
            **{"hidden_size": 1024, "num_attention_heads": 16, "image_size": 336, "patch_size": 14, **other}
        )
        with pytest.raises(ConversionError, match=r"src: the vision tower .* pass --mm-vision-tower"):
            output_mm_vision_tower(config, None, Path("src"))
        config.mm_vision_tower = "openai/clip-vit-base-patch16"
        assert output_mm_vision_tower(config, None, Path("src")) == "openai/clip-vit-base-patch16"


def test_mm_vision_tower_survives_hf_save_load_and_llava_to_ms_llava(clip_dir, tmp_path):
    """original (mm_vision_tower: a local CLIP directory) -> HF LLaVA -> MS-LLaVA -> original: the name comes back."""
    make_original(tmp_path / "orig", "mlp2x_gelu", clip_dir, weights="safetensors")
    convert_original_to_hf(tmp_path / "orig", tmp_path / "hf", check_parity=False, log=quiet)
    stored = json.loads((tmp_path / "hf" / "config.json").read_text())["vision_config"]
    assert stored["mm_vision_tower"] == str(clip_dir)
    convert_llava_to_ms_llava(tmp_path / "hf", tmp_path / "ms", num_queries=16, check_parity=False, log=quiet)
    assert MSLlavaConfig.from_pretrained(tmp_path / "ms").vision_config.mm_vision_tower == str(clip_dir)
    convert_hf_to_original(tmp_path / "ms", tmp_path / "back", check_parity=False, log=quiet)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["mm_vision_tower"] == str(clip_dir)
    # an explicit --mm-vision-tower wins over the recorded one
    original_main(
        ["--direction", "hf-to-original", "--source", str(tmp_path / "hf"), "--output", str(tmp_path / "named")]
        + ["--mm-vision-tower", "org/my-clip", "--no-parity"]
    )
    assert json.loads((tmp_path / "named" / "config.json").read_text())["mm_vision_tower"] == "org/my-clip"


def test_memory_benchmark_synthesises_llava_1_5_7b_keys_and_shapes():
    """benchmarks/conversion_memory.py's synthetic checkpoints have exactly the keys and shapes of LLaVA-1.5-7B as
    transformers builds it (checked on the meta device: no memory), in both layouts."""
    import importlib.util

    from ms_llava.conversion.checkpoint_io import build_on_meta, expected_state_dict_shapes
    from ms_llava.conversion.llava import canonical_llava_key
    from ms_llava.conversion.original import key_rules, original_to_hf_key

    spec = importlib.util.spec_from_file_location("conversion_memory", ROOT / "benchmarks" / "conversion_memory.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    assert "torch" not in vars(benchmark)  # the driver stays light (see its docstring)
    assert benchmark.parse_size("4.95GB") == 4_950_000_000 and benchmark.parse_size("2GiB") == 2 * 2**30

    for vocab, shapes in ((32064, benchmark.llava_hf_shapes(32)), (32000, benchmark.original_shapes(32))):
        config = LlavaConfig(
            vision_config=benchmark.clip_config().to_dict(),
            text_config=benchmark.llama_config(32, vocab).to_dict(),
            image_token_index=31999,
        )
        expected, _ = expected_state_dict_shapes(build_on_meta(LlavaForConditionalGeneration, config))
        if vocab == 32000:
            rules = key_rules("mlp2x_gelu")
            renamed = {original_to_hf_key(name, rules): shape for name, shape in shapes.items()}
            renamed = {
                name.replace("model.vision_tower.vision_model.", "model.vision_tower."): s
                for name, s in renamed.items()
            }
        else:
            renamed = {canonical_llava_key(name, expected): shape for name, shape in shapes.items()}
        assert renamed == expected
        assert sum(benchmark.numel(shape) for shape in shapes.values()) == sum(
            benchmark.numel(shape) for shape in expected.values()
        )
    assert len(benchmark.original_shapes(32)) == 686
    # llava-hf/llava-1.5-7b-hf's 7,063,427,072 parameters, in float16
    assert benchmark.checkpoint_bytes(benchmark.llava_hf_shapes(32)) == 2 * 7_063_427_072


@pytest.mark.slow  # starts a subprocess
def test_wrapper_scripts_run(llava_dirs, tmp_path, monkeypatch, capsys):
    """The two conversion_scripts/ wrappers run as plain scripts."""
    script = ROOT / "conversion_scripts" / "convert_original_llava_to_hf.py"
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            "--direction",
            "hf-to-original",
            "--source",
            str(llava_dirs["new layout"]),
            "--output",
            str(tmp_path / "orig"),
            "--no-parity",
            # the tiny tower is not LLaVA-1.5's and the source records none: the name must be given
            "--mm-vision-tower",
            "tiny/clip-vision",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "parity: skipped (--no-parity)" in result.stdout
    assert json.loads((tmp_path / "orig" / "config.json").read_text())["mm_vision_tower"] == "tiny/clip-vision"
    with pytest.raises(SystemExit) as exit_info:  # the other wrapper, run as __main__ in this process
        monkeypatch.setattr(sys, "argv", ["convert_llava_to_ms_llava.py", "--help"])
        runpy.run_path(str(ROOT / "conversion_scripts" / "convert_llava_to_ms_llava.py"), run_name="__main__")
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--source", "--output", "--num-queries", "--scope-windows", "--scope-bias-strength", "--fusion"):
        assert flag in help_text


def test_add_cli_registers_the_three_subcommands(llava_dirs, tmp_path, capsys):
    """What `ms-llava convert ...` is made of: each module's add_cli on one subparsers object."""
    import argparse

    from ms_llava.conversion import llava as convert_llava
    from ms_llava.conversion import original as convert_original

    parser = argparse.ArgumentParser(prog="ms-llava convert")
    subparsers = parser.add_subparsers(dest="conversion", required=True)
    convert_llava.add_cli(subparsers)
    convert_original.add_cli(subparsers)
    assert set(subparsers.choices) == {"llava-to-ms-llava", "original-to-hf", "hf-to-original"}
    args = parser.parse_args(
        ["llava-to-ms-llava", "--source", str(llava_dirs["new layout"]), "--output", str(tmp_path / "out")]
        + ["--num-queries", "16", "--scope-windows", "2", "8", "--scope-bias-strength", "2.5", "--fusion", "attention"]
    )
    assert args.handler(args) == 0
    resampler = MSLlavaConfig.from_pretrained(tmp_path / "out").resampler_config
    assert (resampler.scope_windows, resampler.scope_bias_strength, resampler.fusion) == ([2, 8], 2.5, "attention")
    args = parser.parse_args(
        ["hf-to-original", "--source", str(tmp_path / "out"), "--output", str(tmp_path / "orig")]
        + ["--mm-vision-tower", "tiny/clip-vision"]  # the tiny tower is not LLaVA-1.5's and the source records none
    )
    assert args.handler(args) == 0
    assert json.loads((tmp_path / "orig" / "config.json").read_text())["mm_projector_type"] == "ms_resampler"
    args = parser.parse_args(["original-to-hf", "--source", str(tmp_path / "orig"), "--output", str(tmp_path / "out")])
    assert args.handler(args) == 1  # --output is not empty
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
