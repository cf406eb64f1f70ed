"""Quantized loading with bitsandbytes (4-bit NF4 and 8-bit, on CPU): MS-Resampler stays unquantized for every
caller (declared on the model class), the vision tower and the LLM are quantized as in transformers' LLaVA, lm_head is
not, and the quantized model runs and generates.

bitsandbytes compiles its CPU dequantization with torch.compile at the first 4-bit forward (about 10-15 s here); the
forward tests run it eagerly instead (`eager_bitsandbytes`), which computes the same dequantization, on
`tiny64_dir` (tests/quantized_tiny.py: bitsandbytes' CPU inference path needs widths in multiples of 64).
"""

import copy

import pytest
import torch
from transformers import AutoModel, AutoModelForImageTextToText, BitsAndBytesConfig

import ms_llava  # noqa: F401  (registers the Auto classes)
from ms_llava import MSLlavaForConditionalGeneration
from quantized_tiny import write_tiny64_checkpoint

bnb = pytest.importorskip("bitsandbytes", reason="quantized loading needs bitsandbytes (the test extra installs it)")

PROMPT = "USER: <image>\nWhat is in the image? ASSISTANT:"
QUANTIZED = {"4bit": bnb.nn.Linear4bit, "8bit": bnb.nn.Linear8bitLt}

pytestmark = pytest.mark.usefixtures("one_thread")


def quantization(bits: str, **kwargs) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(**({"load_in_4bit": True} if bits == "4bit" else {"load_in_8bit": True}), **kwargs)


def linear_kinds(model, prefix: str) -> set[type]:
    return {type(module) for name, module in model.named_modules() if name.startswith(prefix) and _linear(module)}


def _linear(module) -> bool:
    return isinstance(module, torch.nn.Linear)


@pytest.fixture
def eager_bitsandbytes():
    # torch's own config patch: monkeypatch.setattr on torch._dynamo.config left `disable` deleted (hidden) after the
    # test, and every later torch.compile (flex attention) failed with "torch._dynamo.config.disable does not exist"
    with torch._dynamo.config.patch(disable=True):
        yield


@pytest.fixture(scope="module")
def tiny64_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny64")
    write_tiny64_checkpoint(path)
    return path


@pytest.fixture
def inputs(tiny64_dir, image):
    from transformers import AutoProcessor

    return dict(AutoProcessor.from_pretrained(tiny64_dir)(images=image, text=PROMPT, return_tensors="pt"))


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
@pytest.mark.parametrize("skip", [None, ["lm_head"]], ids=["default-skips", "caller-skip-list"])
def test_quantized_loading_keeps_the_resampler_and_quantizes_tower_and_llm(tiny_dir, bits, skip):
    """Whatever skip list the caller passes (none, or one without the resampler), the resampler is not converted."""
    model = MSLlavaForConditionalGeneration.from_pretrained(
        tiny_dir, quantization_config=quantization(bits, llm_int8_skip_modules=skip)
    )
    quantized = QUANTIZED[bits]
    assert linear_kinds(model, "model.multi_modal_projector") == {torch.nn.Linear}
    assert linear_kinds(model, "model.language_model") == {quantized}
    assert linear_kinds(model, "model.vision_tower") == {quantized}  # as transformers' LLaVA: nothing declared
    assert type(model.lm_head) is torch.nn.Linear
    reference = MSLlavaForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32)
    resampler = dict(model.model.multi_modal_projector.named_parameters())
    for name, param in reference.model.multi_modal_projector.named_parameters():
        assert torch.equal(resampler[name], param), name


def test_the_base_model_class_keeps_the_resampler_too(tiny_dir):
    model = AutoModel.from_pretrained(tiny_dir, quantization_config=quantization("4bit"))
    assert linear_kinds(model, "multi_modal_projector") == {torch.nn.Linear}
    assert linear_kinds(model, "language_model") == {bnb.nn.Linear4bit}


def test_float16_loading_keeps_the_resampler_in_float32(tiny_dir, tiny, image):
    """As BLIP-2's Q-Former: `_keep_in_fp32_modules` keeps the resampler in float32 when the model loads in float16
    (transformers' own rule for the declaration); everything else is float16, and the model runs and generates."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir, dtype=torch.float16)
    projector = {param.dtype for name, param in model.named_parameters() if "multi_modal_projector" in name}
    rest = {param.dtype for name, param in model.named_parameters() if "multi_modal_projector" not in name}
    assert projector == {torch.float32} and rest == {torch.float16}
    _, processor = tiny
    inputs = processor(images=image, text=PROMPT, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].half()
    with torch.no_grad():
        assert model(**inputs).logits.dtype == torch.float16
    assert model.generate(**inputs, max_new_tokens=2, min_new_tokens=2).shape[1] == inputs["input_ids"].shape[1] + 2


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_the_resampler_of_a_quantized_model_gives_the_unquantized_outputs(tiny_dir, bits):
    model = MSLlavaForConditionalGeneration.from_pretrained(tiny_dir, quantization_config=quantization(bits))
    reference = MSLlavaForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32)
    features = torch.randn(2, 64, reference.config.vision_config.hidden_size)
    with torch.no_grad():
        assert torch.equal(
            model.model.multi_modal_projector(features), reference.model.multi_modal_projector(features)
        )


def dequantized_copy(model):
    """A plain float32 model holding the 4-bit model's weights dequantized (bitsandbytes.functional), for reference."""
    quantized = {name: module for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    tensors = model.state_dict()
    plain = MSLlavaForConditionalGeneration(copy.deepcopy(model.config))
    state = {}
    for name, tensor in plain.state_dict().items():
        module_name, _, leaf = name.rpartition(".")
        if module_name in quantized and leaf == "weight":
            weight = quantized[module_name].weight
            state[name] = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
        else:
            state[name] = tensors[name].to(tensor.dtype)
        assert state[name].shape == tensor.shape, name
    plain.load_state_dict(state, strict=True)
    return plain.eval()


def test_4bit_model_forward_and_generation_match_its_dequantized_weights(tiny64_dir, inputs, eager_bitsandbytes):
    """4-bit NF4: the logits equal those of a plain float32 model holding the dequantized weights (up to bfloat16
    rounding), and greedy generation gives the same tokens."""
    model = MSLlavaForConditionalGeneration.from_pretrained(
        tiny64_dir, quantization_config=quantization("4bit", bnb_4bit_compute_dtype=torch.float32), dtype=torch.float32
    ).eval()
    plain = dequantized_copy(model)
    with torch.no_grad():
        logits = model(**inputs).logits
        expected = plain(**inputs).logits
    # bitsandbytes' CPU kernel computes in bfloat16 whatever the compute dtype (its ops.py: "cpu fused op only
    # support bf16"): bf16 rounding of logits up to ~0.6; wrong weights would be off by tenths
    torch.testing.assert_close(logits, expected, rtol=0, atol=0.01)
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 5
    assert torch.equal(generated, plain.generate(**inputs, max_new_tokens=5, do_sample=False))


def test_8bit_model_generates(tiny64_dir, inputs):
    """8-bit (LLM.int8, activations quantized per row too): greedy generation runs and its first token is the argmax
    of the model's own forward pass."""
    model = MSLlavaForConditionalGeneration.from_pretrained(
        tiny64_dir, quantization_config=quantization("8bit")
    ).eval()
    with torch.no_grad():
        first = model(**inputs).logits[0, -1].argmax()
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 4
    assert generated[0, inputs["input_ids"].shape[1]] == first


def test_torchao_int8_weight_only_keeps_the_resampler_and_stays_close(tiny64_dir, inputs):
    """The second path: torchao's weight-only int8 through transformers' TorchAoConfig. Checked here with torchao
    0.18.0 (max |logit difference| 0.004 against float32, logits up to 0.59; same greedy tokens), then removed."""
    pytest.importorskip(
        "torchao",
        reason="torchao is not installed: not in the test extra, as its 0.18.0 wheel prints two 'Failed to load "
        "torchao/_C_*.so' lines at every `import transformers` on this CPU-only torch",
    )
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    model = MSLlavaForConditionalGeneration.from_pretrained(
        tiny64_dir, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), dtype=torch.float32
    ).eval()
    reference = MSLlavaForConditionalGeneration.from_pretrained(tiny64_dir, dtype=torch.float32).eval()
    weights = {name: type(module.weight) for name, module in model.named_modules() if _linear(module)}
    assert {kind for name, kind in weights.items() if "multi_modal_projector" in name} == {torch.nn.Parameter}
    assert all(kind is not torch.nn.Parameter for name, kind in weights.items() if ".language_model." in name)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, rtol=0, atol=0.02)
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(generated, reference.generate(**inputs, max_new_tokens=5, do_sample=False))
