import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

import ms_llava
from messages import chat
from ms_llava import MSLlavaForConditionalGeneration, MSLlavaModel, MSResampler
from ms_llava.testing_utils import build_tiny_checkpoint, sample_image


def prompt_inputs(processor, images, texts):
    prompts = [processor.apply_chat_template(chat(t, n), add_generation_prompt=True) for t, n in texts]
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


def test_llava_contract(tiny):
    model, _ = tiny
    assert isinstance(model.model, MSLlavaModel)
    assert isinstance(model.model.multi_modal_projector, MSResampler)
    names = {name for name, _ in model.model.named_children()}
    assert {"vision_tower", "multi_modal_projector", "language_model"} <= names
    assert "MSResampler" in model._no_split_modules
    assert model.supports_gradient_checkpointing


def test_forward_shapes_and_image_features(tiny, image):
    model, processor = tiny
    inputs = prompt_inputs(processor, [image], [("What is this?", 1)])
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 16
    with torch.no_grad():
        out = model(**inputs)
        features = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    assert out.logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert len(features) == 1 and features[0].shape == (16, 32)
    # transformers >= 5.24 returns the image encoder's output (image_hidden_states is deprecated there); older the tensor
    image_outputs = getattr(out, "image_outputs", None)
    projected = image_outputs.pooler_output[0] if image_outputs is not None else out.image_hidden_states
    torch.testing.assert_close(projected, features[0])


def test_image_features_land_on_the_placeholders_in_order(tiny):
    model, processor = tiny
    images = [sample_image(40, seed=2), sample_image(40, seed=3), sample_image(40, seed=4)]
    inputs = prompt_inputs(processor, images, [("Compare them.", 2), ("And this?", 1)])
    with torch.no_grad():
        logits = model(**inputs).logits
        features = torch.cat(model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output)
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        embeds[inputs["input_ids"] == model.config.image_token_id] = features  # row-major = image order
        expected = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(logits, expected)


def test_labels_give_a_loss_that_reaches_the_resampler(tiny, image):
    model, processor = tiny
    inputs = prompt_inputs(processor, [image], [("Describe.", 1)])
    labels = inputs["input_ids"].clone()
    labels[labels == model.config.image_token_id] = -100
    model.train()
    try:
        out = model(**inputs, labels=labels)
        out.loss.backward()
    finally:
        model.eval()
    assert torch.isfinite(out.loss)
    grads = [p.grad for p in model.model.multi_modal_projector.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)


def test_gradient_checkpointing_gives_the_same_gradients(image):
    model, processor = build_tiny_checkpoint(seed=1)
    inputs = prompt_inputs(processor, [image], [("Describe.", 1)])
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)

    def grads():
        model.zero_grad(set_to_none=True)
        model(**inputs, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    plain = grads()
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23; the older name is deprecated there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.language_model.gradient_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_wrong_total_image_tokens_raise_with_both_counts(tiny, image):
    model, processor = tiny
    inputs = prompt_inputs(processor, [image], [("Hi", 1)])
    ids = inputs["input_ids"].clone()
    first = (ids[0] == model.config.image_token_id).nonzero()[0].item()
    ids[0, first] = processor.tokenizer.convert_tokens_to_ids("A")  # 15 placeholders for one image
    with pytest.raises(ValueError, match=r"hold 15 image tokens, but 1 images need 16 \(M = 16 per image\)"):
        model(input_ids=ids, attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"])


def test_wrong_per_image_split_raises(tiny):
    model, processor = tiny
    images = [sample_image(40, seed=5), sample_image(40, seed=6)]
    text = "USER: " + "<image>" * 17 + " and " + "<image>" * 15 + " ASSISTANT:"
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    ids = processor.tokenizer(text, return_tensors="pt")["input_ids"]
    with pytest.raises(
        ValueError, match=r"a run of 17 image tokens at position \d+; every image needs exactly M = 16"
    ):
        model(input_ids=ids, pixel_values=pixel_values)


def test_image_placeholders_without_images_are_refused(tiny):
    """M placeholders without `pixel_values` would be read as text: `forward` and `generate` refuse them."""
    model, processor = tiny
    ids = processor.tokenizer("USER: " + "<image>" * 16 + "\nHi ASSISTANT:", return_tensors="pt")["input_ids"]
    with pytest.raises(ValueError, match=r"the prompt holds image tokens \(id \d+\) but no pixel_values"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="no pixel_values"):
        model.generate(input_ids=ids, max_new_tokens=2)
    # a generated image token (decoding, the images already in the cache) is no placeholder
    inputs = processor(images=sample_image(40, seed=5), text="USER: <image>\nHi ASSISTANT:", return_tensors="pt")
    forced = model.generate(
        **inputs, max_new_tokens=3, prefix_allowed_tokens_fn=lambda *_: [model.config.image_token_id]
    )
    assert forced[0, -3:].tolist() == [model.config.image_token_id] * 3


def test_a_prompt_longer_than_the_context_is_refused(tiny, image):
    """The language model's positions end at max_position_embeddings (512 here): a longer prompt is refused, in
    `forward` and `generate`, before any work; one that fits generates, also past nothing but its own length."""
    model, processor = tiny
    context = model.config.text_config.max_position_embeddings
    long_text = "USER: <image>\n" + "word " * context + "ASSISTANT:"
    inputs = processor(images=image, text=long_text, return_tensors="pt")
    assert inputs["input_ids"].shape[1] > context
    with pytest.raises(
        ValueError,
        match=rf"the prompt holds {inputs['input_ids'].shape[1]} tokens, more than the "
        rf"language model's context \(max_position_embeddings={context}\)",
    ):
        model.generate(**inputs, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(**inputs)


def test_generate_encodes_images_once(tiny, image):
    model, processor = tiny
    inputs = prompt_inputs(processor, [image], [("What is it?", 1)])
    calls = []
    hooks = [
        model.model.vision_tower.register_forward_hook(lambda *args: calls.append("vision")),
        model.model.multi_modal_projector.register_forward_hook(lambda *args: calls.append("projector")),
    ]
    try:
        out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    finally:
        for hook in hooks:
            hook.remove()
    assert out.shape[1] == inputs["input_ids"].shape[1] + 6
    assert calls == ["vision", "projector"]


def test_cached_generation_matches_uncached(tiny, image):
    model, processor = tiny
    inputs = prompt_inputs(processor, [image], [("What is it?", 1)])
    cached = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    uncached = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_batched_left_padded_generation_equals_one_by_one(tiny):
    model, processor = tiny
    assert processor.tokenizer.padding_side == "left"
    requests = [
        ([sample_image(40, seed=7)], ("What colour is the circle on the left?", 1)),
        ([sample_image(56, seed=8)], ("Count.", 1)),
        ([sample_image(30, seed=9), sample_image(64, seed=10)], ("Which image has more shapes?", 2)),
    ]
    settings = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}
    images = [img for imgs, _ in requests for img in imgs]
    batch = prompt_inputs(processor, images, [text for _, text in requests])
    batched = model.generate(**batch, **settings)[:, batch["input_ids"].shape[1] :]
    for row, (imgs, text) in enumerate(requests):
        single = prompt_inputs(processor, imgs, [text])
        alone = model.generate(**single, **settings)[:, single["input_ids"].shape[1] :]
        assert torch.equal(batched[row], alone[0]), f"request {row}"


def test_feature_layers_and_full_strategy(image):
    model, processor = build_tiny_checkpoint(seed=2)
    config = model.config
    config.vision_feature_layer = [-2, -1]
    config.vision_feature_select_strategy = "full"
    model = MSLlavaForConditionalGeneration(config).eval()
    assert model.model.multi_modal_projector.vision_hidden_size == 2 * config.vision_config.hidden_size
    inputs = prompt_inputs(processor, [image], [("Hi", 1)])
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_save_load_is_bit_exact(tiny, tiny_dir, image):
    model, processor = tiny
    loaded = AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()
    assert isinstance(loaded, MSLlavaForConditionalGeneration)
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for name in original:
        assert torch.equal(original[name], restored[name]), name
    inputs = prompt_inputs(processor, [image], [("Hi", 1)])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
    base = AutoModel.from_pretrained(tiny_dir)
    assert isinstance(base, MSLlavaModel)


def test_learnable_bias_survives_save_and_load(tmp_path, image):
    model, processor = build_tiny_checkpoint(seed=3, learnable_scope_bias=True)
    resampler = model.model.multi_modal_projector
    with torch.no_grad():
        resampler.learned_scope_bias.add_(0.25 * torch.randn_like(resampler.learned_scope_bias))
    model.save_pretrained(tmp_path)
    loaded = MSLlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.equal(loaded.model.multi_modal_projector.learned_scope_bias, resampler.learned_scope_bias)


def test_untrained_parameters_are_initialised_on_load(tmp_path):
    """A checkpoint without projector weights (a converted LLaVA, say) gets the documented init, not garbage."""
    model, _ = build_tiny_checkpoint(seed=4)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if "multi_modal_projector" not in k},
        tmp_path / "model.safetensors",
        metadata={"format": "pt"},
    )
    loaded = MSLlavaForConditionalGeneration.from_pretrained(tmp_path)
    resampler = loaded.model.multi_modal_projector
    assert torch.equal(resampler.input_layernorm.weight, torch.ones_like(resampler.input_layernorm.weight))
    assert torch.equal(resampler.output_proj.bias, torch.zeros_like(resampler.output_proj.bias))
    assert 0.01 < resampler.queries.std().item() < 0.03
    assert torch.isfinite(resampler.fusion.weight1).all()
    assert 0.3 < resampler.fusion.weight1.std().item() < 0.9  # N(0, 1/E), E = 3


def test_missing_weights_get_the_constructors_init_on_load(tmp_path):
    """from_pretrained initialises the weights a checkpoint lacks as MSLlavaForConditionalGeneration(config) does, in
    the vision tower (CLIP's own init, e.g. attention projections with std 1/sqrt(d) * (2 L)^-1/2, not 0.02), the
    projector and the language model; the weights it holds are kept. Compared over 8 seeds per key: values the
    constructor sets the same for every seed (norms, biases, the padding row) must be equal, the others must have
    the constructor's mean and standard deviation (within 6 standard errors)."""
    from safetensors.torch import load_file, save_file

    seeds = range(8)
    model, _ = build_tiny_checkpoint(seed=0)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    dropped_prefixes = (
        "model.vision_tower.embeddings.",
        "model.vision_tower.encoder.layers.0.",
        "model.vision_tower.post_layernorm.",
        "model.multi_modal_projector.",
        "model.language_model.embed_tokens.",
        "model.language_model.layers.1.",
        "lm_head.",
    )
    dropped = {key for key in saved if key.startswith(dropped_prefixes)}
    assert any("vision_tower.encoder.layers.0.self_attn" in key for key in dropped) and len(dropped) < len(saved)
    save_file({k: v for k, v in saved.items() if k not in dropped}, tmp_path / "model.safetensors")

    def states(build):
        result = []
        for seed in seeds:
            torch.manual_seed(seed)
            result.append(build().state_dict())
        return result

    constructed = states(lambda: MSLlavaForConditionalGeneration(model.config))
    loaded = states(lambda: MSLlavaForConditionalGeneration.from_pretrained(tmp_path))
    for key in saved.keys() - dropped:
        assert all(torch.equal(state[key], saved[key]) for state in loaded), key
    for key in sorted(dropped):
        reference = torch.stack([state[key] for state in constructed]).double()
        values = torch.stack([state[key] for state in loaded]).double()
        fixed = (reference == reference[0]).all(dim=0)  # what the constructor's init sets deterministically
        assert torch.equal(values[:, fixed], reference[:, fixed]), key
        if not fixed.all():
            reference, values = reference[:, ~fixed], values[:, ~fixed]
            n = reference.numel()
            log_ratio = (values.std() / reference.std()).log().abs().item()
            assert log_ratio < 6 / n**0.5, f"{key}: std {values.std():.4f}, the constructor's {reference.std():.4f}"
            gap = (values.mean() - reference.mean()).abs().item()
            assert gap < 6 * reference.std().item() * (2 / n) ** 0.5, f"{key}: mean off by {gap:.4f}"


def count_eager_resampler_calls(monkeypatch) -> list:
    """A list that gets one entry per call of the eager resampler attention (still computed) from now on."""
    from ms_llava import modeling_ms_llava

    calls = []
    eager = modeling_ms_llava.eager_attention_forward
    monkeypatch.setattr(
        modeling_ms_llava, "eager_attention_forward", lambda *a, **k: calls.append(1) or eager(*a, **k)
    )
    return calls


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attn_implementation_choice_is_followed(tiny_dir, tiny, attn, image, monkeypatch):

    model, processor = tiny
    loaded = AutoModelForImageTextToText.from_pretrained(tiny_dir, attn_implementation=attn).eval()
    calls = count_eager_resampler_calls(monkeypatch)
    inputs = prompt_inputs(processor, [image], [("Hi", 1)])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=1e-4, atol=1e-4)
    assert len(calls) == (1 if attn == "eager" else 0)
    loaded.set_attn_implementation("eager" if attn == "sdpa" else "sdpa")  # switching later works too
    with torch.no_grad():
        loaded(**inputs)
    assert len(calls) == 1


def attn_implementations(model) -> dict:
    config = model.config
    return {key: getattr(config, key)._attn_implementation for key in config.sub_configs} | {
        "": config._attn_implementation
    }


@pytest.mark.parametrize("rejected", ["foo", {"resampler_config": "foo"}])
def test_rejected_attn_implementation_leaves_the_model_as_it_was(tiny_dir, tiny, image, rejected):
    _, processor = tiny
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir, attn_implementation="eager").eval()
    inputs = prompt_inputs(processor, [image], [("Hi", 1)])
    with torch.no_grad():
        expected = model(**inputs).logits
    before = attn_implementations(model)
    assert set(before.values()) == {"eager"}
    with pytest.raises(ValueError, match='attn_implementation="foo"'):
        model.set_attn_implementation(rejected)
    assert attn_implementations(model) == before
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)


def test_attn_implementation_can_target_the_resampler_alone(tiny_dir, tiny, image, monkeypatch):

    _, processor = tiny
    model = AutoModelForImageTextToText.from_pretrained(
        tiny_dir, attn_implementation={"": "sdpa", "resampler_config": "eager"}
    ).eval()
    assert attn_implementations(model) == {
        "": "sdpa",
        "vision_config": "sdpa",
        "text_config": "sdpa",
        "resampler_config": "eager",
    }
    calls = count_eager_resampler_calls(monkeypatch)
    inputs = prompt_inputs(processor, [image], [("Hi", 1)])
    with torch.no_grad():
        model(**inputs)
    assert len(calls) == 1
    model.set_attn_implementation({"resampler_config": "sdpa"})
    assert set(attn_implementations(model).values()) == {"sdpa"}
    with torch.no_grad():
        model(**inputs)
    assert len(calls) == 1


def test_siglip_tower_without_cls_token(image):
    from transformers import SiglipVisionConfig

    from ms_llava import MSLlavaConfig
    from ms_llava.testing_utils import build_tiny_config, build_tiny_processor, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = build_tiny_config(tokenizer).to_dict()
    vision = SiglipVisionConfig(
        hidden_size=24, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=4
    )
    config = MSLlavaConfig(**{**config, "vision_config": vision, "vision_feature_select_strategy": "full"})
    model = MSLlavaForConditionalGeneration(config).eval()
    processor = build_tiny_processor(config, tokenizer)
    inputs = prompt_inputs(processor, [image], [("Hi", 1)])
    with torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
        tower = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2]
        assert tower.shape[1] == 64  # 8 x 8 patches, no CLS
        torch.testing.assert_close(features, model.model.multi_modal_projector(tower, grid_size=(8, 8))[0])
        assert torch.isfinite(model(**inputs).logits).all()
    config.vision_feature_select_strategy = "default"
    with pytest.raises(ValueError, match="no CLS token; use 'full'"):
        model.get_image_features(pixel_values=inputs["pixel_values"])


def test_text_only_and_image_prompts_in_one_batch(tiny):
    model, processor = tiny
    settings = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
    image = sample_image(40, seed=11)
    prompts = [
        "USER: Say something. ASSISTANT:",
        processor.apply_chat_template(chat("Hm?"), add_generation_prompt=True),
    ]
    batch = processor(images=[image], text=prompts, return_tensors="pt", padding=True)
    batched = model.generate(**batch, **settings)[:, batch["input_ids"].shape[1] :]
    text_only = processor(text=prompts[:1], return_tensors="pt")
    with_image = processor(images=[image], text=prompts[1:], return_tensors="pt")
    for row, single in enumerate([text_only, with_image]):
        alone = model.generate(**single, **settings)[:, single["input_ids"].shape[1] :]
        assert torch.equal(batched[row], alone[0]), f"prompt {row}"


REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockMsLlava(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "ms_llava" or name.startswith("ms_llava."):
                raise ImportError(f"{name} is blocked in this process")

    sys.meta_path.insert(0, BlockMsLlava())
    try:
        import ms_llava  # noqa: F401
        raise SystemExit("ms_llava is importable: the test would prove nothing")
    except ImportError:
        pass

    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = sys.argv[1]
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert "ms_llava" not in sys.modules
    assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=Image.open(sys.argv[2]), text=prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    from transformers import AutoModel, pipeline

    base = AutoModel.from_pretrained(path, trust_remote_code=True)
    assert type(base).__name__ == "MSLlavaModel", type(base)
    pipe = pipeline("image-text-to-text", model=path, trust_remote_code=True)
    messages[0]["content"][0]["image"] = Image.open(sys.argv[2])
    reply = pipe(text=messages, generate_kwargs={"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False})
    result = {"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"], "logits": logits}
    result["reply"] = reply[0]["generated_text"][-1]["content"]
    # the embedded default checkpoint holds the module files its auto_map names (links to the package's own)
    default = AutoModelForImageTextToText.from_pretrained(sys.argv[4], trust_remote_code=True)
    assert type(default).__module__.startswith("transformers_modules"), type(default).__module__
    default_processor = AutoProcessor.from_pretrained(sys.argv[4], trust_remote_code=True)
    default_inputs = default_processor(images=Image.open(sys.argv[2]), text=prompt, return_tensors="pt")
    result["default_tokens"] = default.generate(**default_inputs, max_new_tokens=3, do_sample=False)
    torch.save(result, sys.argv[3])
    """
)


@pytest.mark.slow
def test_remote_code_load_without_the_package(tiny, tiny_dir, image, tmp_path):
    """The tiny checkpoint and the embedded default checkpoint load through their own module files in a process that
    cannot import ms_llava, and give the package's outputs (every file their auto_map names is there)."""
    model, processor = tiny
    default_dir = ms_llava.default_checkpoint_path()
    for name in ("config.json", "processor_config.json", "tokenizer_config.json"):
        for entry in json.loads((default_dir / name).read_text())["auto_map"].values():
            assert (default_dir / f"{entry.split('.')[0]}.py").is_file(), (name, entry)
    image_path, result_path = tmp_path / "image.png", tmp_path / "result.pt"
    image.save(image_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    env["HF_HUB_OFFLINE"] = "1"
    run = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(tiny_dir), str(image_path), str(result_path), str(default_dir)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    remote = torch.load(result_path)
    inputs = processor(
        images=image, text=processor.apply_chat_template(chat("Hi"), add_generation_prompt=True), return_tensors="pt"
    )
    assert torch.equal(remote["input_ids"], inputs["input_ids"])
    assert torch.equal(remote["pixel_values"], inputs["pixel_values"])
    with torch.no_grad():
        assert torch.equal(remote["logits"], model(**inputs).logits)
    tokens = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    reply = processor.decode(tokens[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert remote["reply"] == reply.lstrip(" ")
    default = AutoModelForImageTextToText.from_pretrained(default_dir)
    default_processor = AutoProcessor.from_pretrained(default_dir)
    default_inputs = default_processor(
        images=image, text=processor.apply_chat_template(chat("Hi"), add_generation_prompt=True), return_tensors="pt"
    )
    assert torch.equal(remote["default_tokens"], default.generate(**default_inputs, max_new_tokens=3, do_sample=False))


def test_processor_from_pretrained_round_trip(tiny_dir, tiny):
    _, processor = tiny
    loaded = AutoProcessor.from_pretrained(tiny_dir)
    assert type(loaded) is type(processor)
    assert loaded.num_image_tokens == 16 and loaded.chat_template == processor.chat_template


def test_bfloat16_model_runs_and_generates(image):
    model, processor = build_tiny_checkpoint(seed=5)
    inputs = prompt_inputs(processor, [image], [("Hi", 1)])
    with torch.no_grad():
        reference = model(**inputs).logits
        model = model.to(torch.bfloat16)
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        logits = model(**inputs).logits
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), reference, rtol=0.1, atol=0.1)
    assert model.generate(**inputs, max_new_tokens=3, min_new_tokens=3).shape[1] == inputs["input_ids"].shape[1] + 3
