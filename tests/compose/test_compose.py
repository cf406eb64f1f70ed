"""`ms_llava.compose`: a new MS-LLaVA from a vision encoder and a language model (tiny parts built with transformers).

Fast lane: compose itself (bit-exact carry-over, the new rows, the processor, the chat template's assistant mask token
by token, the command line, bad parts). Slow: the whole path for {CLIP, SigLIP} x {Llama, Qwen2, Mistral}: compose,
train stage 1, generate, save, reload with the package and through remote code.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from compose_parts import CLIP_PREPROCESSING, SIGLIP_PREPROCESSING, TINY_RESAMPLER, bpe_tokenizer
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from isolation import hub_subprocess_env, run_python
from ms_llava import LLAVA_1_5_CHAT_TEMPLATE, MSLlavaConfig
from ms_llava.compose import CHATML_CHAT_TEMPLATE, compose, tokenizer_surgery
from ms_llava.compose import main as compose_main
from ms_llava.conversion import llava as convert_llava
from ms_llava.conversion.checkpoint_io import read_checkpoint
from ms_llava.testing_utils import write_shapes_dataset
from ms_llava.training.data import Conversation, encode_conversation
from ms_llava_cli import main as cli_main

QUIET = {"log": lambda line: None}


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    return {source.name: source.load() for source in read_checkpoint(directory)}


@pytest.fixture(scope="module")
def composed(parts, tmp_path_factory):
    """`composed(tower, llm)`: the directory of the composed checkpoint (once per module)."""
    root = tmp_path_factory.mktemp("composed")
    done = {}

    def get(tower: str, llm: str) -> Path:
        if (tower, llm) not in done:
            output = root / f"{tower}-{llm}"
            compose(parts(tower), parts(llm), output, seed=3, **TINY_RESAMPLER, **QUIET)
            done[tower, llm] = output
        return done[tower, llm]

    return get


# --------------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("tower", ["clip", "clip-full"])
def test_tower_and_llm_are_carried_over_bit_exactly_and_new_rows_are_the_mean(parts, composed, tower):
    output = composed(tower, "llama")
    weights = load_weights(output)
    tower_source, llm_source = load_weights(parts(tower)), load_weights(parts("llama"))
    checked = 0
    for name, tensor in tower_source.items():
        if name.startswith("text_model.") or name in (
            "logit_scale",
            "visual_projection.weight",
            "text_projection.weight",
        ):
            continue
        target = "model.vision_tower." + name.removeprefix("vision_model.")
        assert weights[target].dtype == tensor.dtype and torch.equal(weights[target], tensor), target
        checked += 1
    vocab = None
    for name, tensor in llm_source.items():
        target = "model.language_model." + name.removeprefix("model.") if name.startswith("model.") else name
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            vocab = tensor.shape[0]
            grown = weights[target]
            assert grown.shape == (vocab + 1, tensor.shape[1])  # + <image>; the unk token pads, as LLaVA-1.5
            assert torch.equal(grown[:vocab], tensor), target
            # reference: the plain mean of the rows, in float64
            assert torch.equal(grown[vocab], tensor.double().mean(dim=0).to(tensor.dtype)), target
        else:
            assert torch.equal(weights[target], tensor), target
        checked += 1
    assert checked == len(weights) - 10  # every tensor but the 10 of the fresh MS-Resampler
    config = json.loads((output / "config.json").read_text())
    fresh = convert_llava.initial_resampler_tensors(MSLlavaConfig.from_pretrained(output), seed=3, dtype=torch.float32)
    for name, tensor in fresh.items():
        assert torch.equal(weights[name], tensor), name
    assert config["text_config"]["vocab_size"] == vocab + 1
    assert config["vision_feature_select_strategy"] == "default"  # CLIP has a CLS token
    assert config["vision_feature_layer"] == -2


def test_processor_and_config_agree_on_the_image_token_and_follow_the_clip_tower(composed):
    output = composed("clip", "llama")
    processor = AutoProcessor.from_pretrained(output)
    config = json.loads((output / "config.json").read_text())
    assert processor.image_token_id == config["image_token_id"] == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert processor.tokenizer.encode("<image>", add_special_tokens=False) == [config["image_token_id"]]
    assert processor.num_image_tokens == config["resampler_config"]["num_queries"] == 16
    assert processor.tokenizer.pad_token == "<unk>"
    assert processor.chat_template == LLAVA_1_5_CHAT_TEMPLATE
    image_processor = processor.image_processor
    assert list(image_processor.image_mean) == CLIP_PREPROCESSING["image_mean"]
    assert list(image_processor.image_std) == CLIP_PREPROCESSING["image_std"]
    assert image_processor.crop_size == {"height": 32, "width": 32} and image_processor.do_pad
    generation = json.loads((output / "generation_config.json").read_text())
    assert generation["pad_token_id"] == processor.tokenizer.pad_token_id


def test_siglip_tower_keeps_every_token_and_its_own_mean_std(composed):
    output = composed("siglip", "qwen2")
    config = json.loads((output / "config.json").read_text())
    assert config["vision_feature_select_strategy"] == "full"  # SigLIP has no CLS token
    processor = AutoProcessor.from_pretrained(output)
    assert list(processor.image_processor.image_mean) == SIGLIP_PREPROCESSING["image_mean"] == [0.5] * 3
    assert processor.image_processor.resample == SIGLIP_PREPROCESSING["resample"]
    assert processor.chat_template == CHATML_CHAT_TEMPLATE
    # tied embeddings (as Qwen2.5-3B): no lm_head is written, the embedding grows by <image> only
    assert "lm_head.weight" not in load_weights(output)
    generation = json.loads((output / "generation_config.json").read_text())
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in generation["eos_token_id"]


def test_chatml_masks_exactly_the_assistant_tokens(composed):
    """Training a composed Qwen2 model: the labels are the assistant replies and their <|im_end|>, token by token,
    against a reference built from the rendered text's character spans."""
    processor = AutoProcessor.from_pretrained(composed("siglip", "qwen2"))
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": [{"type": "text", "text": "What shape is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A circle."}]},
    ]
    from PIL import Image

    conversation = Conversation(messages=messages, images=[Image.new("RGB", (32, 32), "red")], record_id="r")
    example = encode_conversation(processor, conversation)
    # The reference: ChatML written out by hand, the assistant spans by character, tokenised with offsets.
    image = "<image>" * processor.num_image_tokens
    pieces = [
        ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", False),
        (f"<|im_start|>user\n{image}\nWhat colour is the shape?<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False),
        ("red<|im_end|>", True),
        ("\n<|im_start|>user\nWhat shape is it?<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False),
        ("A circle.<|im_end|>", True),
        ("\n", False),
    ]
    text = "".join(piece for piece, _ in pieces)
    spans, position = [], 0
    for piece, is_assistant in pieces:
        if is_assistant:
            spans.append((position, position + len(piece)))
        position += len(piece)
    encoded = processor.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    expected_labels = [
        token if any(start <= begin and end <= stop for start, stop in spans) else -100
        for token, (begin, end) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
    ]
    assert example["input_ids"].tolist() == encoded["input_ids"]
    assert example["labels"].tolist() == expected_labels
    answer_tokens = [token for token in expected_labels if token != -100]
    assert processor.tokenizer.decode(answer_tokens) == "red<|im_end|>A circle.<|im_end|>"


# --------------------------------------------------------------------------------------------- tokenizer, template


def test_a_pad_token_is_added_only_when_the_llm_has_neither_pad_nor_unk():
    tokenizer = bpe_tokenizer(["<|endoftext|>"], eos_token="<|endoftext|>")
    size = len(tokenizer)
    added, _ = tokenizer_surgery(tokenizer)
    assert added == ["<image>", "<pad>"] and len(tokenizer) == size + 2
    assert tokenizer.pad_token == "<pad>" and tokenizer.encode("<pad><image>", add_special_tokens=False) == [
        size + 1,
        size,
    ]


def test_the_chat_template_option(parts, tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}", encoding="utf-8")
    with pytest.raises(ValueError, match=r"plain.jinja: the template has no \{% generation %\}"):
        compose(parts("clip"), parts("llama"), tmp_path / "a", chat_template=str(template), **TINY_RESAMPLER, **QUIET)
    with pytest.raises(ValueError, match="--chat-template llm: the language model's own chat template is missing"):
        compose(parts("clip"), parts("llama"), tmp_path / "b", chat_template="llm", **TINY_RESAMPLER, **QUIET)
    with pytest.raises(ValueError, match=r"'nope': neither one of vicuna_v1, chatml, llm"):
        compose(parts("clip"), parts("llama"), tmp_path / "c", chat_template="nope", **TINY_RESAMPLER, **QUIET)
    with pytest.raises(ValueError, match=r"chatml: the language model's tokenizer has no <\|im_start\|> or <\|im_end"):
        compose(parts("clip"), parts("llama"), tmp_path / "e", chat_template="chatml", **TINY_RESAMPLER, **QUIET)
    compose(parts("clip"), parts("qwen2"), tmp_path / "d", chat_template="vicuna_v1", **TINY_RESAMPLER, **QUIET)
    assert AutoProcessor.from_pretrained(tmp_path / "d").chat_template == LLAVA_1_5_CHAT_TEMPLATE
    assert not any((tmp_path / name).exists() for name in "abce")


# --------------------------------------------------------------------------------------------- bad parts


def test_bad_parts_and_settings_are_named(parts, tmp_path):
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=300)).save_pretrained(gpt2)
    AutoTokenizer.from_pretrained(parts("llama")).save_pretrained(gpt2)
    cases = [
        (parts("llama"), parts("llama"), {}, r"--vision-tower .*expected a vision transformer.*model_type 'llama'"),
        (parts("clip"), parts("clip"), {}, r"--language-model .*expected a decoder-only causal language model.*'clip_vision_model'"),
        (parts("clip"), gpt2, {}, r"'gpt2'.*does not have the standard decoder layout"),
        (parts("siglip"), parts("llama"), {"vision_feature_select_strategy": "default"}, "drops the CLS token, but this vision tower \\(siglip\\) has none"),
        (parts("clip"), parts("llama"), {"vision_feature_layer": 5}, r"--vision-feature-layer 5: the tower has 2 layers"),
        (parts("clip"), parts("llama"), {"num_queries": 100}, r"finer than the visual token grid"),
    ]  # fmt: skip
    for index, (tower, llm, settings, message) in enumerate(cases):
        options = {**TINY_RESAMPLER, **settings}
        with pytest.raises(ValueError, match=message):
            compose(tower, llm, tmp_path / f"out{index}", **options, **QUIET)
        assert not (tmp_path / f"out{index}").exists()


# --------------------------------------------------------------------------------------------- command line


def test_command_line(parts, tmp_path, capsys):
    output = tmp_path / "cli"
    arguments = ["--vision-tower", str(parts("clip")), "--language-model", str(parts("llama")),
                 "--output", str(output), "--num-queries", "16", "--scope-windows", "2", "4", "8", "--seed", "3"]  # fmt: skip
    assert compose_main(arguments) == 0
    assert "parity: language model logits" in capsys.readouterr().out
    config = json.loads((output / "config.json").read_text())
    assert config["resampler_config"]["num_queries"] == 16 and config["resampler_config"]["scope_windows"] == [2, 4, 8]
    assert compose_main(arguments) == 1  # exists: refused, named
    assert "pass --overwrite" in capsys.readouterr().err


def test_ms_llava_compose_is_registered_with_the_converters_options(capsys):
    with pytest.raises(SystemExit) as exited:
        cli_main(["compose", "--help"])
    assert exited.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--fusion {channel_mlp,mean,attention,concat_mlp}", "--vision-feature-layer", "--chat-template",
                   "--vision-feature-select-strategy {default,full}", "--max-shard-size", "--no-parity", "--seed"):  # fmt: skip
        assert option in help_text


# --------------------------------------------------------------------------------------------- the whole path (slow)

REMOTE_GENERATE = """
    import json, sys
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path, image_path, prompt = sys.argv[1:4]
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    assert not type(model).__module__.startswith("ms_llava"), type(model).__module__
    inputs = processor(images=Image.open(image_path).convert("RGB"), text=prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    print(json.dumps(output[0].tolist()))
"""


@pytest.mark.slow
@pytest.mark.parametrize("llm", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_compose_train_generate_save_reload(parts, tmp_path, tower, llm, one_thread):
    composed_dir = tmp_path / "composed"
    compose(parts(tower), parts(llm), composed_dir, **TINY_RESAMPLER, **QUIET)
    data = write_shapes_dataset(tmp_path / "data", "caption", 16, seed=0)
    from ms_llava.training import train

    result = train(
        composed_dir, "pretrain", data, tmp_path / "data" / "images", tmp_path / "stage1",
        global_batch_size=4, learning_rate=1e-2, num_train_epochs=3, dataloader_num_workers=0, save_steps=1000,
        warmup_ratio=0.0,
    )  # fmt: skip
    losses = [loss for _, loss in result.losses]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    # stage 1 trained the projector only: the carried-over parts are still the sources' tensors
    trained, source = load_weights(tmp_path / "stage1"), load_weights(composed_dir)
    changed = {name for name in source if not torch.equal(trained[name], source[name])}
    assert changed and all(name.startswith("model.multi_modal_projector.") for name in changed)

    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "stage1").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "stage1")
    from PIL import Image

    image_path = next((tmp_path / "data" / "images").iterdir())
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the picture."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=Image.open(image_path).convert("RGB"), text=prompt, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        # greedy reference: the argmax of the model's own logits, one token at a time
        ids = inputs["input_ids"]
        for _ in range(generated.shape[1] - ids.shape[1]):
            logits = model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
    assert torch.equal(generated, ids)

    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    processor.save_pretrained(saved)
    reloaded = AutoModelForImageTextToText.from_pretrained(saved).eval()
    with torch.no_grad():
        assert torch.equal(reloaded.generate(**inputs, max_new_tokens=4, do_sample=False), generated)
    env = hub_subprocess_env("http://127.0.0.1:9", tmp_path / "hf")
    run = run_python(REMOTE_GENERATE, saved, image_path, prompt, env=env, cwd=tmp_path)
    assert json.loads(run.stdout.strip().splitlines()[-1]) == generated[0].tolist()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_any_vit_that_automodel_loads_is_a_tower(parts, tmp_path):
    from compose_parts import vision_kwargs
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(**vision_kwargs())).save_pretrained(tmp_path / "vit")
    report = compose(tmp_path / "vit", parts("llama"), tmp_path / "out", **TINY_RESAMPLER, **QUIET)
    assert set(report.parity.values()) == {0.0} and len(report.parity) == 2
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vision_config"]["model_type"] == "vit" and config["vision_feature_select_strategy"] == "default"
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    assert list(processor.image_processor.image_mean) == [0.5, 0.5, 0.5]  # no preprocessor config: 0.5
    assert any("no preprocessor_config.json" in note for note in report.notes)
