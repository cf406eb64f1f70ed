"""`ms_llava.compose`: a new MS-LLaVA from a vision encoder and a language model (the tiny parts of
`ms_llava.testing_utils.write_tiny_part`).

Fast lane: the tokenizer and template rules, bad parts, the command line's options. Slow: compose itself (bit-exact
carry-over, the new rows, the processor, the ChatML assistant mask token by token), the docs' quick path, and the
whole path for two part pairs (compose, train stage 1, generate, save, reload with the package and as remote code).
"""

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from isolation import hub_subprocess_env, run_python
from llava_checkpoints import QUIET, TINY_RESAMPLER, tensors_of
from ms_llava import LLAVA_1_5_CHAT_TEMPLATE, MSLlavaConfig
from ms_llava.compose import CHATML_CHAT_TEMPLATE, compose
from ms_llava.conversion.streaming import fresh_resampler, tokenizer_surgery
from ms_llava.testing_utils import (
    CLIP_PREPROCESSING,
    PARTS_CORPUS,
    SIGLIP_PREPROCESSING,
    train_bpe_tokenizer,
    write_shapes_dataset,
)
from ms_llava.training.data import Conversation, encode_conversation
from ms_llava_cli import main

DOCS = Path(__file__).resolve().parents[2] / "docs" / "compose.md"


# --------------------------------------------------------------------------------------------- weights


@pytest.mark.slow
@pytest.mark.parametrize("tower", ["clip", "clip-full"])
def test_tower_and_llm_are_carried_over_bit_exactly_and_new_rows_are_the_mean(parts, composed, tower):
    output = composed(tower, "llama")
    weights = tensors_of(output)
    checked = 0
    for name, tensor in tensors_of(parts(tower)).items():
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
    for name, tensor in tensors_of(parts("llama")).items():
        target = "model.language_model." + name.removeprefix("model.") if name.startswith("model.") else name
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            vocab = tensor.shape[0]
            grown = weights[target]
            assert grown.shape == (vocab + 1, tensor.shape[1])  # + <image>; the unk token pads, as LLaVA-1.5
            assert torch.equal(grown[:vocab], tensor), target
            # reference: the plain mean of the rows, in float64 (mean resizing draws within 1e-9 of the covariance)
            torch.testing.assert_close(grown[vocab].double(), tensor.double().mean(dim=0), rtol=0, atol=1e-5)
        else:
            assert torch.equal(weights[target], tensor), target
        checked += 1
    assert checked == len(weights) - 10  # every tensor but the 10 of the fresh MS-Resampler
    config = json.loads((output / "config.json").read_text())
    for name, tensor in fresh_resampler(MSLlavaConfig.from_pretrained(output), seed=3).items():
        assert torch.equal(weights[name], tensor), name
    assert config["text_config"]["vocab_size"] == vocab + 1
    assert config["vision_feature_select_strategy"] == "default"  # CLIP has a CLS token
    assert config["vision_feature_layer"] == -2


@pytest.mark.slow
def test_processor_config_and_template_follow_the_parts(composed):
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

    output = composed("siglip", "qwen2")
    config = json.loads((output / "config.json").read_text())
    assert config["vision_feature_select_strategy"] == "full"  # SigLIP has no CLS token
    processor = AutoProcessor.from_pretrained(output)
    assert list(processor.image_processor.image_mean) == SIGLIP_PREPROCESSING["image_mean"] == [0.5] * 3
    assert processor.image_processor.resample == SIGLIP_PREPROCESSING["resample"]
    assert processor.chat_template == CHATML_CHAT_TEMPLATE
    # tied embeddings (as Qwen2.5-3B): no lm_head is written, the embedding grows by <image> only
    assert "lm_head.weight" not in tensors_of(output)
    generation = json.loads((output / "generation_config.json").read_text())
    assert processor.tokenizer.convert_tokens_to_ids("<|im_end|>") in generation["eos_token_id"]


@pytest.mark.slow
def test_chatml_masks_exactly_the_assistant_tokens(composed):
    """Training a composed Qwen2 model: the labels are the assistant replies and their <|im_end|>, token by token,
    against a reference built from the rendered text's character spans."""
    from PIL import Image

    processor = AutoProcessor.from_pretrained(composed("siglip", "qwen2"))
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": [{"type": "text", "text": "What shape is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A circle."}]},
    ]
    conversation = Conversation(messages=messages, images=[Image.new("RGB", (32, 32), "red")], record_id="r")
    example = encode_conversation(processor, conversation)
    image = "<image>" * processor.num_image_tokens
    pieces = [  # ChatML written out by hand, the assistant spans by character, tokenised with offsets
        ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", False),
        (f"<|im_start|>user\n{image}\nWhat colour is the shape?<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False),
        ("red<|im_end|>", True),
        ("\n<|im_start|>user\nWhat shape is it?<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False),
        ("A circle.<|im_end|>", True),
        ("\n", False),
    ]
    text, spans, position = "".join(piece for piece, _ in pieces), [], 0
    for piece, is_assistant in pieces:
        spans += [(position, position + len(piece))] if is_assistant else []
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


@pytest.mark.slow
def test_any_vit_that_automodel_loads_is_a_tower(parts, tmp_path):
    from transformers import ViTConfig, ViTModel

    from ms_llava.testing_utils import _VISION

    ViTModel(ViTConfig(**_VISION)).save_pretrained(tmp_path / "vit")
    report = compose(tmp_path / "vit", parts("llama"), tmp_path / "out", **TINY_RESAMPLER, **QUIET)
    assert set(report.parity.values()) == {0.0} and len(report.parity) == 2
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vision_config"]["model_type"] == "vit" and config["vision_feature_select_strategy"] == "default"
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    assert list(processor.image_processor.image_mean) == [0.5, 0.5, 0.5]  # no preprocessor config: 0.5
    assert any("no preprocessor_config.json" in note for note in report.notes)


# --------------------------------------------------------------------------------------------- tokenizer, template, bad parts


def test_a_pad_token_is_added_only_when_the_llm_has_neither_pad_nor_unk():
    tokenizer = train_bpe_tokenizer(PARTS_CORPUS, 300, ["<|endoftext|>"], eos_token="<|endoftext|>")
    size = len(tokenizer)
    added, _ = tokenizer_surgery(tokenizer)
    assert added == ["<image>", "<pad>"] and len(tokenizer) == size + 2
    assert tokenizer.pad_token == "<pad>"
    assert tokenizer.encode("<pad><image>", add_special_tokens=False) == [size + 1, size]


def test_bad_parts_settings_and_templates_are_named_before_writing(parts, tmp_path):
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=300)).save_pretrained(gpt2)
    AutoTokenizer.from_pretrained(parts("llama")).save_pretrained(gpt2)
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}", encoding="utf-8")
    cases = [
        ("llama", "llama", {}, r"--vision-tower .*expected a vision transformer.*model_type 'llama'"),
        ("clip", "clip", {}, r"--language-model .*expected a decoder-only causal language model.*'clip_vision_model'"),
        ("clip", gpt2, {}, r"'gpt2'.*does not have the standard decoder layout"),
        (
            "siglip",
            "llama",
            {"vision_feature_select_strategy": "default"},
            r"drops the CLS token, but this vision tower \(siglip\) has none",
        ),
        ("clip", "llama", {"vision_feature_layer": 5}, r"--vision-feature-layer 5: the tower has 2 layers"),
        ("clip", "llama", {"num_queries": 100}, r"finer than the visual token grid"),
        ("clip", "llama", {"chat_template": str(template)}, r"plain.jinja: the template has no \{% generation %\}"),
        (
            "clip",
            "mistral",
            {"chat_template": "llm"},
            "--chat-template llm: the language model's own chat template is missing",
        ),
        ("clip", "llama", {"chat_template": "nope"}, r"'nope': neither one of vicuna_v1, chatml, llm"),
        (
            "clip",
            "llama",
            {"chat_template": "chatml"},
            r"chatml: the language model's tokenizer has no <\|im_start\|> or <\|im_end",
        ),
    ]
    for index, (tower, llm, settings, message) in enumerate(cases):
        llm = parts(llm) if isinstance(llm, str) else llm
        with pytest.raises(ValueError, match=message):
            compose(parts(tower), llm, tmp_path / f"out{index}", **{**TINY_RESAMPLER, **settings}, **QUIET)
        assert not (tmp_path / f"out{index}").exists()


@pytest.mark.slow
def test_command_line_sizes_the_resampler_and_refuses_an_existing_output(parts, tmp_path, capsys):
    output = tmp_path / "cli"
    arguments = [
        "compose",
        "--vision-tower",
        str(parts("clip")),
        "--language-model",
        str(parts("qwen2")),
        "--output",
        str(output),
        "--num-queries",
        "16",
        "--scope-windows",
        "2",
        "4",
        "8",
        "--seed",
        "3",
        "--resampler-hidden-size",
        "12",
        "--resampler-heads",
        "3",
        "--chat-template",
        "vicuna_v1",
    ]
    assert main(arguments) == 0
    assert "parity: language model logits" in capsys.readouterr().out
    resampler = json.loads((output / "config.json").read_text())["resampler_config"]
    assert (resampler["num_queries"], resampler["scope_windows"]) == (16, [2, 4, 8])
    assert (resampler["hidden_size"], resampler["num_attention_heads"]) == (12, 3)
    assert AutoProcessor.from_pretrained(output).chat_template == LLAVA_1_5_CHAT_TEMPLATE
    assert main(arguments) == 1  # exists: refused, named
    assert "pass --overwrite" in capsys.readouterr().err


def test_compose_shares_the_converters_options(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["compose", "--help"])
    assert exited.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for option in (
        "--fusion {channel_mlp,mean,attention,concat_mlp}",
        "--vision-feature-layer",
        "--chat-template",
        "--vision-feature-select-strategy {default,full}",
        "--max-shard-size",
        "--no-parity",
        "--seed",
        "--resampler-hidden-size D",
        "--resampler-heads H",
        "--num-queries M",
        "576 tokens -> 144",
        "(default 1024",
        "(default 16)",
    ):
        assert option in help_text, option


# --------------------------------------------------------------------------------------------- the docs' quick path


def quick_path_commands() -> list[list[str]]:
    """The commands of docs/compose.md's quick path (the block after `<!-- quick-path -->`), split as a shell would."""
    block = re.search(r"<!-- quick-path -->\n```bash\n(.+?)\n```", DOCS.read_text(encoding="utf-8"), flags=re.S)
    assert block, "docs/compose.md lost its quick path"
    lines = block.group(1).replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip() and not line.startswith("#")]


@pytest.mark.slow
def test_the_docs_quick_path_runs_as_written(tmp_path, monkeypatch, capsys, one_thread):
    """docs/compose.md's quick path, run in this process from the doc's text: tiny parts, compose, data, stage 1 and
    the held-out accuracy."""
    commands = quick_path_commands()
    assert [command[:2] for command in commands] == [
        ["ms-llava", "tiny"],
        ["ms-llava", "compose"],
        ["ms-llava", "tiny"],
        ["ms-llava", "train"],
        ["ms-llava", "tiny"],
    ]
    monkeypatch.chdir(tmp_path)
    for command in commands:
        assert main(command[1:]) == 0, command
    accuracy = float(
        capsys.readouterr().out.strip().splitlines()[-1]
    )  # the last command's, from the held-out questions
    assert 0 <= accuracy <= 1
    assert sorted(path.name for path in (tmp_path / "parts").iterdir()) == ["llama", "qwen2", "vision"]
    composed = MSLlavaConfig.from_pretrained(tmp_path / "tiny-ms-llava").resampler_config
    assert (composed.num_queries, composed.hidden_size) == (16, 32)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "runs" / "stage1")
    assert type(model).__name__ == "MSLlavaForConditionalGeneration"


# --------------------------------------------------------------------------------------------- the whole path (slow)

REMOTE_GENERATE = """
    import json, sys
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    results = []
    for path, image_path, prompt in json.loads(sys.argv[1]):
        model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        assert not type(model).__module__.startswith("ms_llava"), type(model).__module__
        inputs = processor(images=Image.open(image_path).convert("RGB"), text=prompt, return_tensors="pt")
        with torch.no_grad():
            results.append(model.generate(**inputs, max_new_tokens=4, do_sample=False)[0].tolist())
    print(json.dumps(results))
"""


@pytest.mark.slow
def test_compose_train_generate_save_reload(parts, tmp_path, one_thread):
    """For a Vicuna-like Llama with CLIP and a ChatML Qwen2 (tied embeddings) with SigLIP: compose, stage 1 lowers the
    loss and trains the projector only, generate equals greedy decoding of the model's own logits, save and reload
    give the same tokens, and so does the saved checkpoint as remote code in a fresh process without the package."""
    from PIL import Image

    from ms_llava.training import train

    data = write_shapes_dataset(tmp_path / "data", "caption", 16, seed=0)
    image_path = next((tmp_path / "data" / "images").iterdir())
    remote, expected = [], []
    for tower, llm in (("clip", "llama"), ("siglip", "qwen2")):
        composed_dir, stage1 = tmp_path / f"{llm}-composed", tmp_path / f"{llm}-stage1"
        compose(parts(tower), parts(llm), composed_dir, **TINY_RESAMPLER, **QUIET)
        result = train(
            composed_dir,
            "pretrain",
            data,
            tmp_path / "data" / "images",
            stage1,
            global_batch_size=4,
            learning_rate=1e-2,
            num_train_epochs=3,
            dataloader_num_workers=0,
            save_steps=1000,
            warmup_ratio=0.0,
        )
        losses = [loss for _, loss in result.losses]
        assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
        trained, source = tensors_of(stage1), tensors_of(composed_dir)  # stage 1 trained the projector only
        changed = {name for name in source if not torch.equal(trained[name], source[name])}
        assert changed and all(name.startswith("model.multi_modal_projector.") for name in changed)

        model = AutoModelForImageTextToText.from_pretrained(stage1).eval()
        processor = AutoProcessor.from_pretrained(stage1)
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the picture."}]}
        ]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=Image.open(image_path).convert("RGB"), text=prompt, return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            ids = inputs["input_ids"]  # greedy reference: the argmax of the model's own logits, one token at a time
            for _ in range(generated.shape[1] - ids.shape[1]):
                logits = model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[:, -1]
                ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        assert generated.shape[1] > inputs["input_ids"].shape[1] and torch.equal(generated, ids)
        saved = tmp_path / f"{llm}-saved"
        model.save_pretrained(saved)
        processor.save_pretrained(saved)
        with torch.no_grad():
            reloaded = AutoModelForImageTextToText.from_pretrained(saved).eval()
            assert torch.equal(reloaded.generate(**inputs, max_new_tokens=4, do_sample=False), generated)
        remote.append((str(saved), str(image_path), prompt))
        expected.append(generated[0].tolist())
    env = hub_subprocess_env("http://127.0.0.1:9", tmp_path / "hf")
    run = run_python(REMOTE_GENERATE, json.dumps(remote), env=env, cwd=tmp_path)
    assert json.loads(run.stdout.strip().splitlines()[-1]) == expected
