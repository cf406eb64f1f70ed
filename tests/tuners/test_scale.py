"""ScAle adapter (ms_llava.tuners.scale): PEFT format, identity at init, token scope, cache, merge, LoRA coexistence,
architectures, training; and which of transformers' adapter methods take the installed peft."""

from __future__ import annotations

import json
import types
from importlib.metadata import version

import pytest
import torch
from packaging.version import Version
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.peft_types import PeftType
from safetensors.torch import load_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.integrations.peft import MIN_PEFT_VERSION

from messages import chat
from ms_llava.testing_utils import build_tiny_checkpoint, tiny_vision_config
from ms_llava.training import MSLlavaTrainingArguments, train
from ms_llava.tuners.scale import (
    DEFAULT_TARGET_MODULES,
    SCOPE_START_KWARG,
    ScaleConfig,
    ScaleLayer,
    _add_peft_type_member,
    register_scale_peft_method,
    scale_layers,
    scale_parameter_count,
    scope_mask,
)
from ms_llava_cli import main

SMALL = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
# transformers refuses a peft older than MIN_PEFT_VERSION (0.22.0 from transformers 5.24 on) in these adapter methods
# of its models (not in load_adapter), and in save_pretrained of a model holding adapters it loaded.
NEEDS_MIN_PEFT = ("add_adapter", "set_adapter", "enable_adapters", "disable_adapters", "active_adapters")
NEEDS_MIN_PEFT += ("get_adapter_state_dict", "delete_adapter", "save_pretrained")
NATIVE_ADAPTER_API = Version(version("peft")) >= Version(MIN_PEFT_VERSION)


# one thread: training runs are small, and with two their timing (and DDP's gloo) gets erratic on a 2-core machine
pytestmark = pytest.mark.usefixtures("one_thread")


def llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=60, num_key_value_heads=2, **{**SMALL, **overrides})
    return LlamaForCausalLM(config).eval()


def randomise(model, seed: int = 1, adapter: str = "default") -> None:
    """Nonzero scalars, so that the adapter changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in scale_layers(model).values():
            theta = layer.scale_theta[adapter]
            theta.copy_(torch.randn(theta.shape, generator=generator))


def ids(batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 60, (batch, length), generator=torch.Generator().manual_seed(seed))


def disable_all_adapters(model) -> None:
    """transformers' `disable_adapters()` where it takes this peft, else PEFT's own switch on each tuner layer."""
    if NATIVE_ADAPTER_API:
        return model.disable_adapters()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(False)


# --------------------------------------------------------------------------------------------- PEFT registration


def test_scale_is_a_registered_peft_type_and_registration_is_idempotent():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    member = PeftType.SCALE
    assert member is PeftType("SCALE") is PeftType["SCALE"] and member.value.lower() == "scale"
    assert member in list(PeftType) and isinstance(member, PeftType) and member == "SCALE"
    count = len(PeftType)
    register_scale_peft_method()
    assert _add_peft_type_member("SCALE") is member and len(PeftType) == count
    assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is ScaleConfig
    assert PEFT_TYPE_TO_PREFIX_MAPPING[member] == "scale_"
    assert PEFT_TYPE_TO_TUNER_MAPPING[member].__name__ == "ScaleModel"
    assert ScaleConfig().peft_type is member


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bound": 0}, "bound must be a number in \\(0, 1\\].*got 0"),
        ({"bound": 1.5}, "got 1.5"),
        ({"token_scope": "first"}, "token_scope must be one of \\['last', 'all'\\], got 'first'"),
        ({"layers_to_transform": [-1]}, "layers_to_transform .* got \\[-1\\]"),
        ({"scale_attention": False, "scale_mlp": False}, "leave nothing to scale"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save must be None, got \\['lm_head'\\]"),
    ],
)
def test_bad_config_values_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScaleConfig(**kwargs)


# --------------------------------------------------------------------------------------------- the adapter itself


def test_identity_at_init_and_only_the_scalars_train():
    base = llama()
    x = ids()
    reference = base(x).logits
    model = get_peft_model(base, ScaleConfig(token_scope="all"))
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable == {
        f"base_model.model.model.layers.{i}.{kind}.scaler.scale_theta.default"
        for i in (0, 1)
        for kind in ("self_attn", "mlp")
    }
    assert model.get_nb_trainable_parameters()[0] == 2 * (4 + 1)
    assert torch.equal(model(x).logits, reference)  # bit-exact


def reference_forward(base, thetas: dict, bound: float, mask: torch.Tensor | None, x: torch.Tensor, **kwargs):
    """The definition, written out with explicit hooks: o_proj's input, head h's slice scaled by 1 + b tanh(theta_h);
    the MLP output scaled by 1 + b tanh(theta); at the positions of `mask` (None: all)."""
    handles = []
    for index, layer in enumerate(base.model.layers):
        attention_theta, mlp_theta = thetas[index]
        head_dim = layer.self_attn.head_dim

        def scale_heads(module, args, theta=attention_theta, head_dim=head_dim):
            (hidden,) = args
            scaled = hidden.clone()
            for head in range(theta.numel()):
                columns = slice(head * head_dim, (head + 1) * head_dim)
                factor = 1 + bound * torch.tanh(theta[head])
                positions = mask if mask is not None else torch.ones(hidden.shape[:2], dtype=torch.bool)
                scaled[..., columns][positions] = hidden[..., columns][positions] * factor
            return (scaled,)

        def scale_mlp(module, args, output, theta=mlp_theta):
            factor = 1 + bound * torch.tanh(theta[0])
            if mask is None:
                return output * factor
            return torch.where(mask.unsqueeze(-1), output * factor, output)

        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(scale_heads))
        handles.append(layer.mlp.register_forward_hook(scale_mlp))
    try:
        return base(x, **kwargs).logits
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("token_scope", ["all", "last"])
def test_the_adapter_equals_the_definition(token_scope):
    reference_model = llama()
    model = get_peft_model(llama(), ScaleConfig(token_scope=token_scope, bound=0.7))
    randomise(model)
    layers = scale_layers(model)
    thetas = {
        i: (
            layers[f"base_model.model.model.layers.{i}.self_attn.scaler"].scale_theta["default"].detach(),
            layers[f"base_model.model.model.layers.{i}.mlp.scaler"].scale_theta["default"].detach(),
        )
        for i in (0, 1)
    }
    x = ids()
    mask = None
    if token_scope == "last":
        mask = torch.zeros(x.shape, dtype=torch.bool)
        mask[:, -1] = True
    with torch.no_grad():
        expected = reference_forward(reference_model, thetas, 0.7, mask, x)
        actual = model(x).logits
    assert (expected - reference_model(x).logits).abs().max() > 1e-3
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


def test_only_the_scoped_positions_change():
    base = llama()
    x = ids(length=9)
    with torch.no_grad():
        reference = base(x).logits
        model = get_peft_model(base, ScaleConfig())
        randomise(model)
        prefill = model(x).logits  # rule 4: the last position only
        from_start = model(x, **{SCOPE_START_KWARG: 5}).logits  # rule 1: positions 5..8
        labels = torch.full_like(x, -100)
        labels[:, 6:] = x[:, 6:]  # supervised tokens 6..8 -> scoped positions 5, 6, 7
        training = model(x, labels=labels).logits
    assert torch.equal(prefill[:, :-1], reference[:, :-1]) and (prefill[:, -1] - reference[:, -1]).abs().min() > 0
    assert torch.equal(from_start[:, :5], reference[:, :5])
    assert ((from_start[:, 5:] - reference[:, 5:]).abs().amax(-1) > 0).all()
    assert torch.equal(training[:, :5], reference[:, :5])
    # the label rule and the explicit start scale positions 5..7 alike (position 8 predicts nothing)
    assert torch.equal(training[:, :8], from_start[:, :8])
    assert torch.equal(training[:, 8], from_start[:, 8]) is False


def test_scope_mask_rules():
    x = torch.zeros(2, 5, dtype=torch.long)
    left_padded = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    right_padded = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert scope_mask((), {"input_ids": x, "attention_mask": left_padded})[:, -1].all()
    assert scope_mask((), {"input_ids": x, "attention_mask": left_padded}).sum() == 2
    right = scope_mask((), {"input_ids": x, "attention_mask": right_padded})
    assert right.nonzero().tolist() == [[0, 2], [1, 4]]
    assert scope_mask((x,), {}).nonzero().tolist() == [[0, 4], [1, 4]]
    assert scope_mask((), {"input_ids": x}, start=torch.tensor([1, 3])).sum() == 4 + 2
    holding = types.SimpleNamespace(get_seq_length=lambda: 3)  # a KV cache that holds tokens: decoding
    for name in ("past_key_values", "cache"):  # transformers >= 5.24's generate passes `cache`
        assert scope_mask((), {"input_ids": x, name: holding}).all()
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 5, -100, 6, 7]])
    assert scope_mask((), {"input_ids": x, "labels": labels}).nonzero().tolist() == [
        [0, 1],
        [0, 2],
        [1, 0],
        [1, 2],
        [1, 3],
    ]


def test_disable_adapter_gives_the_base_model_back():
    base = llama()
    x = ids()
    reference = base(x).logits
    model = get_peft_model(base, ScaleConfig(token_scope="all"))
    randomise(model)
    with torch.no_grad():
        assert (model(x).logits - reference).abs().max() > 1e-3
        with model.disable_adapter():
            assert torch.equal(model(x).logits, reference)
        unloaded = model.unload()
        assert torch.equal(unloaded(x).logits, reference)
    assert not scale_layers(unloaded) and not hasattr(unloaded, "peft_config")


def test_save_load_round_trip_with_peft_and_transformers(tmp_path):
    model = get_peft_model(llama(), ScaleConfig(layers_to_transform=[1], bound=0.5))
    randomise(model)
    x = ids()
    with torch.no_grad():
        expected = model(x).logits
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SCALE" and saved["layers_to_transform"] == [1] and saved["bound"] == 0.5
    assert sorted(load_file(tmp_path / "adapter_model.safetensors")) == [
        "base_model.model.model.layers.1.mlp.scaler.scale_theta",
        "base_model.model.model.layers.1.self_attn.scaler.scale_theta",
    ]
    assert isinstance(PeftConfig.from_pretrained(tmp_path), ScaleConfig)
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(llama(), tmp_path)
        assert torch.equal(loaded(x).logits, expected)
        plain = llama()
        plain.load_adapter(str(tmp_path), adapter_name="spatial")  # on every transformers version
        assert torch.equal(plain(x).logits, expected)
        disable_all_adapters(plain)
        assert torch.equal(plain(x).logits, llama()(x).logits)
        with model.disable_adapter():  # PEFT's own
            assert torch.equal(model(x).logits, llama()(x).logits)
    adders = [lambda m: inject_adapter_in_model(ScaleConfig(), m, adapter_name="new")]  # PEFT's own
    if NATIVE_ADAPTER_API:  # refused otherwise: test_the_adapter_methods_that_need_a_newer_peft
        adders.append(lambda m: m.add_adapter(ScaleConfig(), adapter_name="new"))
    for add in adders:
        fresh = llama()
        add(fresh)
        assert len(scale_layers(fresh)) == 4 and torch.equal(fresh(x).logits, llama()(x).logits)


def test_the_adapter_methods_that_need_a_newer_peft(tmp_path):
    """On transformers >= 5.24 with peft < 0.22, exactly NEEDS_MIN_PEFT refuse (ValueError naming the version);
    `load_adapter` and PEFT's own API work on every version (the other tests use them there)."""
    model = get_peft_model(llama(), ScaleConfig(token_scope="all"))
    randomise(model)
    model.save_pretrained(tmp_path / "scale")
    plain = llama()
    plain.load_adapter(str(tmp_path / "scale"), adapter_name="spatial")
    calls = {
        "add_adapter": lambda: plain.add_adapter(ScaleConfig(), adapter_name="new"),
        "set_adapter": lambda: plain.set_adapter("spatial"),
        "enable_adapters": plain.enable_adapters,
        "disable_adapters": plain.disable_adapters,
        "active_adapters": plain.active_adapters,
        "get_adapter_state_dict": lambda: plain.get_adapter_state_dict("spatial"),
        "delete_adapter": lambda: plain.delete_adapter("new"),
        "save_pretrained": lambda: plain.save_pretrained(tmp_path / "saved"),
    }
    refused = []
    for name, call in calls.items():
        try:
            call()
        except ValueError as error:
            assert f"please use a version >= {MIN_PEFT_VERSION}" in str(error), (name, error)
            refused.append(name)
    assert tuple(refused) == (() if NATIVE_ADAPTER_API else NEEDS_MIN_PEFT)


def test_all_tokens_merge_equals_unmerged_and_last_token_refuses():
    model = get_peft_model(llama(attention_bias=True, mlp_bias=True), ScaleConfig(token_scope="all"))
    randomise(model)
    x = ids()
    with torch.no_grad():
        expected = model(x).logits
        model.merge_adapter()
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-5, atol=1e-5)
        merged = model.merge_and_unload()
        assert not scale_layers(merged) and not merged._forward_pre_hooks
        torch.testing.assert_close(merged(x).logits, expected, rtol=1e-5, atol=1e-5)
    last = get_peft_model(llama(), ScaleConfig())
    randomise(last)
    with pytest.raises(ValueError, match="token_scope='last'.*cannot be merged"):
        last.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        last.merge_adapter()
    assert scale_layers(last)  # nothing was unloaded


# --------------------------------------------------------------------------------------------- generation


def test_cached_generation_equals_the_uncached_forward_under_the_rule(tiny, image):
    model, processor = tiny
    prompts = [
        processor.apply_chat_template(chat("What is in the image?"), add_generation_prompt=True),
        processor.apply_chat_template(chat("Describe the picture."), add_generation_prompt=True),
    ]
    inputs = processor(images=[image, image], text=prompts, padding=True, return_tensors="pt")
    peft_model = get_peft_model(build_tiny_checkpoint(seed=0)[0], ScaleConfig())
    randomise(peft_model, seed=3)
    with torch.no_grad():
        out = peft_model.generate(
            **inputs, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        prompt_length = inputs["input_ids"].shape[1]
        sequences = out.sequences
        full = peft_model(
            input_ids=sequences,
            pixel_values=inputs["pixel_values"],
            attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(sequences[:, prompt_length:])], dim=1),
            use_cache=False,
            **{SCOPE_START_KWARG: prompt_length - 1},
        ).logits
        base_full = model(input_ids=sequences, pixel_values=inputs["pixel_values"], use_cache=False).logits
    cached = torch.stack(out.logits, dim=1)  # [batch, new tokens, vocab]
    uncached = full[:, prompt_length - 1 : -1]
    torch.testing.assert_close(uncached, cached, rtol=1e-4, atol=1e-4)
    assert torch.equal(uncached.argmax(-1), sequences[:, prompt_length:])
    assert (base_full[:, prompt_length - 1 : -1] - cached).abs().max() > 1e-3  # the adapter does act


def test_cached_greedy_generation_on_llama_matches_uncached_decoding():
    model = get_peft_model(llama(), ScaleConfig())
    randomise(model, seed=2)
    prompt = ids(batch=1, length=6)
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        sequence = prompt
        for _ in range(6):  # uncached: the whole sequence each step, scope from the last prompt token
            logits = model(sequence, use_cache=False, **{SCOPE_START_KWARG: prompt.shape[1] - 1}).logits
            sequence = torch.cat([sequence, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, sequence)


# --------------------------------------------------------------------------------------------- architectures


def seeded(model_class, config, seed: int = 0):
    torch.manual_seed(seed)
    return model_class(config).eval()


def tiny_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=tiny_vision_config(),
        text_config=LlamaConfig(vocab_size=60, num_key_value_heads=2, **SMALL),
        image_token_id=59,
    )
    return LlavaForConditionalGeneration(config).eval()


@pytest.mark.parametrize(
    "build",
    [
        lambda: build_tiny_checkpoint(seed=0)[0],
        tiny_llava,
        llama,
        lambda: seeded(Qwen2ForCausalLM, Qwen2Config(vocab_size=60, num_key_value_heads=2, **SMALL)),
        lambda: seeded(MistralForCausalLM, MistralConfig(vocab_size=60, num_key_value_heads=2, **SMALL)),
    ],
    ids=["ms_llava", "llava", "llama", "qwen2", "mistral"],
)
def test_architectures_adapt_the_language_model_only(build):
    base = build()
    vision_modules = [name for name, _ in base.named_modules() if "vision_tower" in name]
    model = get_peft_model(base, ScaleConfig())
    wrapped = sorted(name.removeprefix("base_model.model.") for name in scale_layers(model))
    prefix = "model.language_model." if vision_modules else "model."
    assert wrapped == [f"{prefix}layers.{i}.{kind}.scaler" for i in (0, 1) for kind in ("mlp", "self_attn")]
    assert not any("vision_tower" in name for name in scale_layers(model))
    assert model.get_nb_trainable_parameters()[0] == 10
    x = ids(batch=1, length=5)
    with torch.no_grad():
        if vision_modules:  # text only through the VLM: no image token in the ids
            assert torch.equal(model(input_ids=x).logits, build()(input_ids=x).logits)
        else:
            assert torch.equal(model(x).logits, build()(x).logits)


def test_a_pattern_reaching_into_the_vision_tower_is_refused():
    with pytest.raises(ValueError, match="vision tower.*narrow target_modules"):
        get_peft_model(tiny_llava(), ScaleConfig(target_modules=r".*layers\.\d+\.(self_attn|mlp)"))
    names = [name for name, _ in tiny_llava().named_modules()]
    import re

    vision = [n for n in names if n.startswith("model.vision_tower") and re.search(r"\.(self_attn|mlp)$", n)]
    assert vision and not any(re.fullmatch(DEFAULT_TARGET_MODULES, n) for n in vision)


def test_llava_1_5_7b_dimensions_give_1056_parameters():
    text = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32064
    )
    config = LlavaConfig(text_config=text, image_token_id=32000)
    assert scale_parameter_count(text) == 32 * 32 + 32 == 1056
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model = get_peft_model(model, ScaleConfig())
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 1056 and total > 7e9
    assert scale_parameter_count(text, layers=[0, 1]) == 66


def test_scale_and_lora_coexist_on_one_base(tmp_path):
    x = ids()
    lora = get_peft_model(
        llama(), LoraConfig(target_modules=["q_proj", "o_proj", "down_proj"], init_lora_weights=False)
    )
    lora.save_pretrained(tmp_path / "lora")
    scale = get_peft_model(llama(), ScaleConfig())
    randomise(scale)
    scale.save_pretrained(tmp_path / "scale")
    with torch.no_grad():
        # reference: LoRA merged into the weights, then ScAle on top
        merged = PeftModel.from_pretrained(llama(), tmp_path / "lora").merge_and_unload()
        expected = PeftModel.from_pretrained(merged, tmp_path / "scale")(x).logits
        for order in (("lora", "scale"), ("scale", "lora")):
            both = llama()
            for name in order:
                both.load_adapter(str(tmp_path / name), adapter_name=name)
            torch.testing.assert_close(both(x).logits, expected, rtol=1e-5, atol=1e-5)
            # LoRA's module names are the plain model's: ScAle renames nothing
            lora_names = sorted(n for n, _ in both.named_parameters() if "lora_A" in n)
            assert lora_names == sorted(
                n.removeprefix("base_model.model.").replace(".default.", ".lora.")
                for n, _ in lora.named_parameters()
                if "lora_A" in n
            )
        disable_all_adapters(both)
        assert torch.equal(both(x).logits, llama()(x).logits)


# --------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def qa(shapes):
    return shapes["qa8"], shapes["images"]


RUN = {"global_batch_size": 4, "max_steps": 3, "dataloader_num_workers": 0, "save_steps": 100}


@pytest.mark.slow
def test_training_with_scale_changes_only_the_scalars(tiny_dir, qa, tmp_path):
    from transformers import AutoModelForImageTextToText

    data, images = qa
    result = train(tiny_dir, "finetune", data, images, tmp_path / "scale", adapter="scale", **RUN)
    assert result.adapter and result.adapter_type == "scale" and result.global_step == 3
    names = {p.name for p in (tmp_path / "scale").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "processor_config.json"} <= names
    assert "model.safetensors" not in names
    weights = load_file(tmp_path / "scale" / "adapter_model.safetensors")
    assert all(".scaler.scale_theta" in key and ".language_model." in key for key in weights)
    assert sum(t.numel() for t in weights.values()) == 10 and all(t.abs().max() > 0 for t in weights.values())
    record = json.loads((tmp_path / "scale" / "ms_llava_training.json").read_text())["stages"][-1]
    assert record["adapter"]["type"] == "scale" and record["learning_rate"] == 2e-2
    assert record["adapter"]["token_scope"] == "last" and record["trained"] == ["model.language_model"]
    base = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    adapted = PeftModel.from_pretrained(base, tmp_path / "scale")
    trained = {n for n, p in adapted.named_parameters() if "scale_theta" in n}
    assert len(trained) == 4
    assert all(torch.equal(before[k], v) for k, v in adapted.get_base_model().state_dict().items() if k in before)
    plain = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    plain.load_adapter(str(tmp_path / "scale"))
    x = torch.tensor([[1, 5, 9, 11, 20, 7]])
    with torch.no_grad():
        assert torch.equal(plain(input_ids=x).logits, adapted(input_ids=x).logits)


def test_training_refuses_combinations_that_make_no_sense(tiny_dir, qa, tmp_path):
    cases = [
        ({"adapter": "scale", "lora": True}, "adapter='scale' cannot be combined with lora=True"),
        ({"adapter": "scale", "projector_learning_rate": 1e-3}, "projector_learning_rate=0.001"),
        ({"adapter": "scale", "merge_lora": True}, "merge_lora needs lora=True"),
        ({"scale_bound": 0.5}, "scale_bound set ScAle options, which need adapter='scale' \\(got None\\)"),
        ({"adapter": "scale", "scale_bound": 2.0}, "scale_bound must be a number in \\(0, 1\\], got 2.0"),
        ({"adapter": "scale", "scale_token_scope": "first"}, "scale_token_scope must be 'last' or 'all', got 'first'"),
        ({"adapter": "scale", "scale_layers": []}, "scale_layers must be a non-empty list"),
        ({"adapter": "prefix"}, "adapter must be one of \\['lora', 'scale'\\] or None, got 'prefix'"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            MSLlavaTrainingArguments.for_stage("finetune", **overrides)
    with pytest.raises(ValueError, match="use stage 'finetune', got 'pretrain'"):
        MSLlavaTrainingArguments.for_stage("pretrain", adapter="scale")
    assert MSLlavaTrainingArguments.for_stage("finetune", adapter="lora").lora
    assert MSLlavaTrainingArguments.for_stage("finetune", lora=True).adapter == "lora"


@pytest.mark.slow
def test_train_command_with_scale(tiny_dir, qa, tmp_path, capsys):
    data, images = qa
    common = ["train", "--stage", "finetune", "--adapter", "scale", "--model", str(tiny_dir), "--data", str(data)]
    status = main(
        [*common, "--image-folder", str(images), "--output-dir", str(tmp_path / "out"), "--global-batch-size", "4"]
        + ["--max-steps", "2", "--num-workers", "0", "--scale-layers", "1", "--scale-token-scope", "all"]
        + ["--scale-bound", "0.5"]
    )
    assert status == 0 and "ScAle adapter and processor in" in capsys.readouterr().out
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["layers_to_transform"], config["token_scope"], config["bound"]) == (
        "SCALE",
        [1],
        "all",
        0.5,
    )
    assert main([*common, "--lora", "--output-dir", str(tmp_path / "bad")]) != 0
    assert "adapter='scale' cannot be combined with lora=True" in capsys.readouterr().err


def test_scale_layer_is_a_peft_tuner_layer():
    model = get_peft_model(llama(), ScaleConfig(scale_mlp=False, layers_to_transform=0))
    (layer,) = scale_layers(model).values()
    assert isinstance(layer, ScaleLayer) and layer.kind == "attention" and layer.num_scalars == 4
    assert layer.head_dim == 8


@pytest.mark.slow
def test_scale_training_with_activation_checkpointing_gives_the_same_losses(tiny_dir, qa, tmp_path):
    data, images = qa
    runs = [
        train(
            tiny_dir,
            "finetune",
            data,
            images,
            tmp_path / f"gc-{flag}",
            adapter="scale",
            gradient_checkpointing=flag,
            **RUN,
        )
        for flag in (False, True)
    ]
    assert runs[0].losses == runs[1].losses and len(runs[0].losses) == 3
