"""`ms-llava convert original-to-hf` on tiny checkpoints of the original LLaVA code base's format: bit-exact carry-over
(sharded `.bin` or safetensors, with the tower or from --vision-tower, stage 1 with --base-llm), the `<image>` token
added, parity against plain transformers modules, and what is refused, by name."""

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    CLIPVisionModel,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
)

from llava_checkpoints import QUIET, leftovers, original_to_hf_name, save_original, tensors_of
from messages import chat
from ms_llava import MSLlavaForConditionalGeneration, MSLlavaProcessor
from ms_llava.conversion import ConversionError, convert_llava_to_ms_llava, convert_original_to_hf, streaming
from ms_llava.testing_utils import build_tiny_tokenizer, sample_image, tiny_text_config
from ms_llava_cli import main

ROOT = Path(__file__).resolve().parents[2]
EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")
PARITY = {
    "language model logits (text-only prompt)": 0.0,
    "vision tower hidden states (random image)": 0.0,
    "image features (tower, selection, projector)": 0.0,
}


def assert_carried_over(original: dict[str, torch.Tensor], output: Path) -> int:
    """Every original tensor is in `output` under its transformers name, bit for bit (same dtype); the embeddings
    keep their rows and gain the `<image>` row, drawn around their mean (mean resizing). Returns the original vocab."""
    written = tensors_of(output)
    vocab = original["model.embed_tokens.weight"].shape[0]
    for name, tensor in original.items():
        target = written[original_to_hf_name(name)]
        assert target.dtype == tensor.dtype, name
        if name in EMBEDDINGS:
            assert target.shape == (vocab + 1, tensor.shape[1]) and torch.equal(target[:vocab], tensor), name
            torch.testing.assert_close(target[vocab].double(), tensor.double().mean(dim=0), rtol=0, atol=1e-5)
        else:
            assert torch.equal(target, tensor), name
    return vocab


@pytest.mark.slow
@pytest.mark.parametrize(
    ("projector_type", "weights"),
    [("mlp2x_gelu", "bin"), ("mlp2x_gelu", "safetensors"), ("ms_resampler", "bin"), ("ms_resampler", "safetensors")],
)
def test_original_to_hf_carries_everything_over_and_adds_the_image_token(projector_type, weights, clip_dir, tmp_path):
    original = save_original(tmp_path / "orig", projector_type, clip_dir, weights=weights)
    report = convert_original_to_hf(tmp_path / "orig", tmp_path / "hf", max_shard_size="50KB", **QUIET)

    assert report.parity == PARITY  # against LlamaForCausalLM, CLIPVisionModel and the projector on the originals
    assert len(tensors_of(tmp_path / "hf")) == len(original)  # nothing created, nothing dropped
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf")
    ms = projector_type == "ms_resampler"
    assert type(model) is (MSLlavaForConditionalGeneration if ms else LlavaForConditionalGeneration)
    vocab = assert_carried_over(original, tmp_path / "hf")
    # <image> was added as the next id, the embeddings grown by one row
    assert model.config.image_token_id == vocab and model.config.text_config.vocab_size == vocab + 1
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    tokenizer, source = (
        AutoTokenizer.from_pretrained(tmp_path / "hf"),
        AutoTokenizer.from_pretrained(tmp_path / "orig"),
    )
    assert tokenizer.get_vocab() == {**source.get_vocab(), "<image>": vocab}
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    assert isinstance(processor, MSLlavaProcessor) == ms and processor.image_token == "<image>"
    assert processor.image_processor.do_pad  # image_aspect_ratio "pad"
    assert list(processor.image_processor.image_mean) == [0.48145466, 0.4578275, 0.40821073]  # the CLIP folder's
    prompt = processor.apply_chat_template(chat("What is it?"), add_generation_prompt=True)
    inputs = processor(images=sample_image(40), text=prompt, return_tensors="pt")
    assert (inputs["input_ids"] == vocab).sum() == (16 if ms else 64)  # M, or LLaVA's 8 x 8 patches
    generated = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 2
    if not ms:  # the LLaVA output is what `convert llava-to-ms-llava` takes
        report = convert_llava_to_ms_llava(tmp_path / "hf", tmp_path / "ms", num_queries=16, **QUIET)
        assert set(report.parity.values()) == {0.0}


@pytest.mark.slow
def test_stage1_projector_with_base_llm_and_vision_tower(clip_dir, tmp_path):
    """Stage 1 writes `mm_projector.bin` beside config.json: the LLM comes from --base-llm, the tower from
    --vision-tower or else config.json's mm_vision_tower, each carried over bit for bit."""
    tokenizer = build_tiny_tokenizer(with_image_token=False)
    full = save_original(
        tmp_path / "full", "ms_resampler", clip_dir, "safetensors", with_tower=False, tokenizer=tokenizer
    )
    base, stage1 = tmp_path / "vicuna", tmp_path / "stage1"
    llama = LlamaForCausalLM(tiny_text_config(tokenizer))
    llama.load_state_dict({name: t for name, t in full.items() if not name.startswith("model.mm_projector.")})
    llama.save_pretrained(base)
    tokenizer.save_pretrained(base)
    stage1.mkdir()
    (stage1 / "config.json").write_bytes((tmp_path / "full" / "config.json").read_bytes())
    torch.save({n: t for n, t in full.items() if n.startswith("model.mm_projector.")}, stage1 / "mm_projector.bin")

    with pytest.raises(ConversionError, match=r"is a stage-1 checkpoint \(mm_projector\.bin only\): pass --base-llm"):
        convert_original_to_hf(stage1, tmp_path / "hf", vision_tower=clip_dir, **QUIET)
    config = json.loads((stage1 / "config.json").read_text())
    (stage1 / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "mm_vision_tower"}))
    with pytest.raises(ConversionError, match=r"config\.json has no mm_vision_tower: pass --vision-tower"):
        convert_original_to_hf(stage1, tmp_path / "hf", base_llm=base, **QUIET)
    with pytest.raises(ConversionError, match=r"--base-llm is for a stage-1 checkpoint .*full"):
        convert_original_to_hf(tmp_path / "full", tmp_path / "hf", base_llm=base, vision_tower=clip_dir, **QUIET)
    assert not (tmp_path / "hf").exists()
    report = convert_original_to_hf(stage1, tmp_path / "hf", base_llm=base, vision_tower=clip_dir, **QUIET)
    assert report.parity == PARITY
    assert_carried_over(full, tmp_path / "hf")
    written = tensors_of(tmp_path / "hf")
    clip = CLIPVisionModel.from_pretrained(clip_dir).state_dict()
    assert len(written) == len(full) + len(clip)
    for name, tensor in clip.items():
        assert torch.equal(written[f"model.vision_tower.{name}"], tensor), name
    # without --vision-tower, config.json's mm_vision_tower (here the local CLIP folder) gives the tower
    (stage1 / "config.json").write_text(json.dumps(config))
    convert_original_to_hf(stage1, tmp_path / "hf2", base_llm=base, check_parity=False, **QUIET)
    assert all(torch.equal(tensor, written[name]) for name, tensor in tensors_of(tmp_path / "hf2").items())


def test_unknown_key_in_original_checkpoint_is_named(clip_dir, tmp_path):
    source = tmp_path / "orig"
    tensors = save_original(source, "mlp2x_gelu", clip_dir, weights="safetensors")
    tensors["model.mm_projector.4.weight"] = torch.zeros(32, 32)  # an mlp3x_gelu layer
    del tensors["model.norm.weight"]
    save_file(tensors, source / "model.safetensors")
    with pytest.raises(ConversionError) as error:
        convert_original_to_hf(source, tmp_path / "out", **QUIET)
    assert "source keys the key map does not know: model.mm_projector.4.weight (model.safetensors)" in str(error.value)
    assert "target keys no source key fills: model.language_model.norm.weight" in str(error.value)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("mm_projector_type", "mlp3x_gelu", r"unknown mm_projector_type 'mlp3x_gelu' \(known: mlp2x_gelu, ms_resampl"),
        ("mm_projector_type", None, r"unknown mm_projector_type 'linear'"),  # the original code base's default
        ("model_type", "llava_mistral", r"model_type 'llava_mistral' \(Llama-based LLaVA only"),
        ("mm_vision_select_feature", "cls", r"mm_vision_select_feature 'cls' \(patch or cls_patch\)"),
        ("image_aspect_ratio", "anyres", r"image_aspect_ratio 'anyres' \(LLaVA-NeXT's\)"),
        ("mm_use_im_start_end", True, r"mm_use_im_start_end true"),
    ],
)
def test_settings_without_equivalent_are_named(field, value, message, clip_dir, tmp_path):
    source = tmp_path / "orig"
    save_original(source, "mlp2x_gelu", clip_dir, weights="safetensors")
    config = json.loads((source / "config.json").read_text())
    config[field] = value
    (source / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    with pytest.raises(ConversionError, match=rf"orig/config\.json: cannot convert .*{message}"):
        convert_original_to_hf(source, tmp_path / "out", **QUIET)
    assert not (tmp_path / "out").exists()


def test_a_missing_shard_and_a_pickled_object_are_named(clip_dir, tmp_path):
    source = tmp_path / "orig"
    save_original(source, "mlp2x_gelu", clip_dir)
    shard = source / "pytorch_model-00001-of-00003.bin"
    state_dict = torch.load(shard, weights_only=True)
    state_dict["model.norm.weight"] = _PickledObject()  # anything but tensors would run code on unpickling
    torch.save(state_dict, shard)
    with pytest.raises(ValueError, match=r"pytorch_model-00001-of-00003\.bin is not a plain state dict"):
        convert_original_to_hf(source, tmp_path / "out", **QUIET)
    (source / "pytorch_model-00002-of-00003.bin").unlink()
    with pytest.raises(ValueError, match=r"lists shards that are missing: pytorch_model-00002-of-00003\.bin"):
        convert_original_to_hf(source, tmp_path / "out", **QUIET)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


class _PickledObject:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.slow
def test_command_line_converts_reports_and_refuses_to_overwrite(clip_dir, tmp_path, capsys, monkeypatch):
    """`ms-llava convert original-to-hf`: the report printed; a second run into the same folder refused; the parity
    limit skips the check with its reason; the script in conversion_scripts/ is the same command."""
    save_original(tmp_path / "orig", "ms_resampler", clip_dir, weights="safetensors")
    args = ["convert", "original-to-hf", "--source", str(tmp_path / "orig"), "--output", str(tmp_path / "hf")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "created: 1 new row(s) (<image>) by mean resizing: 2 keys" in printed
    assert "image features (tower, selection, projector): max |difference| = 0" in printed
    assert "note: config.json fields not used: mm_hidden_size, mm_use_im_patch_token, tune_mm_mlp_adapter" in printed
    assert main(args) == 1 and "already holds a checkpoint" in capsys.readouterr().err
    assert main([*args[:3], str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "error: --source" in err and "no such folder" in err and "Traceback" not in err
    monkeypatch.setattr(streaming, "PARITY_MAX_PARAMETERS", 1000)
    assert main([*args, "--overwrite"]) == 0
    assert "parameters > 1,000: too large to build both models" in capsys.readouterr().out
    assert isinstance(AutoProcessor.from_pretrained(tmp_path / "hf"), MSLlavaProcessor)
    monkeypatch.setattr(sys, "argv", ["convert_original_llava_to_hf.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "conversion_scripts" / "convert_original_llava_to_hf.py"), run_name="__main__")
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert all(flag in help_text for flag in ("--source", "--output", "--vision-tower", "--base-llm", "--overwrite"))
