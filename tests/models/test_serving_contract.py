"""The steps vLLM 0.34's Transformers backend takes with an MS-LLaVA checkpoint (`vllm serve DIR --model-impl
transformers --trust-remote-code`, docs/serving.md), emulated with transformers alone: vLLM does not install here.

Each test names the engine's step. Read from vLLM 0.34.0's wheel: model_executor/models/registry.py (class resolution),
model_executor/models/transformers/{base,multimodal,fusers/attention}.py (attention, KV cache, images), and
renderers/hf.py (the chat-template content format).
"""

import ast
import fnmatch
import inspect
import json
import textwrap

import pytest
import torch
from jinja2 import nodes
from transformers import AttentionInterface, AutoModel, AutoProcessor
from transformers.dynamic_module_utils import get_class_from_dynamic_module
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.utils.chat_template_utils import _compile_jinja_template

import ms_llava  # noqa: F401  (registers the Auto classes)
from ms_llava.processing_ms_llava import LLAVA_1_5_CHAT_TEMPLATE
from ms_llava.testing_utils import sample_image

ENGINE = "engine_attn"
engine_calls: list[str] = []


def engine_attention(module, query, key, value, attention_mask, **kwargs):
    """Stands in for vLLM's registered "vllm" function: it attends through `module.attn` (the engine's attention
    instance, holding the KV cache, which the backend attaches at load time) and raises without it; otherwise it
    computes what SDPA computes."""
    engine_calls.append(module.attn)  # AttributeError for a module the engine did not attach
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ENGINE, engine_attention)


def attention_call_sites(module_class) -> int:
    """How many calls in `module_class.forward` go to a function looked up in transformers' attention interface
    (`ALL_ATTENTION_FUNCTIONS[...]` or `ALL_ATTENTION_FUNCTIONS.get_interface(...)`, bound to a local name): the
    backend's attention fuser takes a module only when there is exactly one."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(module_class.forward)))
    lookups = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AnnAssign) and "ALL_ATTENTION_FUNCTIONS" in ast.unparse(node.value):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            lookups |= {target.id for target in targets if isinstance(target, ast.Name)}
    return sum(isinstance(node, ast.Call) and ast.unparse(node.func) in lookups for node in ast.walk(tree))


def attach_engine_attention(model) -> list[str]:
    """What the backend does at load time: `module.attn = Attention(...)` on every module with one attention call
    site, an integer `layer_idx` and a config set to the engine's function. Returns the modules' names."""
    attached = []
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if (
            attention_call_sites(type(module)) == 1
            and isinstance(getattr(module, "layer_idx", None), int)
            and getattr(config, "_attn_implementation", None) == ENGINE
        ):
            module.attn = name
            attached.append(name)
    return attached


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """The tiny base model (AutoModel, SDPA throughout), one prompt with two images, and its outputs."""
    model = AutoModel.from_pretrained(tiny_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_dir)
    images = [sample_image(size=48, seed=1), sample_image(size=40, seed=2)]
    inputs = processor(images=images, text="USER: <image>\n<image>\nWhat is this? ASSISTANT:", return_tensors="pt")
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output
        hidden = model(**inputs).last_hidden_state
    return {"model": model, "processor": processor, "inputs": inputs, "features": features, "hidden": hidden}


def remote_class(folder, key):
    """A class named by `folder`'s config.json auto_map, imported from the checkpoint's own module files."""
    cls = get_class_from_dynamic_module(json.loads((folder / "config.json").read_text())["auto_map"][key], folder)
    assert cls.__module__.startswith("transformers_modules"), cls.__module__
    return cls


def test_class_resolution_through_auto_map(tiny_dir):
    """registry.py: an architecture transformers does not know resolves through the first `AutoModel*` key of
    auto_map (SGLang requires `AutoModel` itself), which must import from the folder and be backend-compatible; the
    multimodal backend is chosen because `get_text_config()` is not the top-level config."""
    auto_map = json.loads((tiny_dir / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_ms_llava.MSLlavaModel"
    first = next(key for key in auto_map if key.startswith("AutoModel"))
    model_class = remote_class(tiny_dir, first)
    assert model_class.is_backend_compatible()
    config = remote_class(tiny_dir, "AutoConfig").from_pretrained(tiny_dir)
    assert config.get_text_config() is config.text_config is not config
    assert config.get_text_config().num_attention_heads == 4
    for name in ("configuration", "modeling", "processing", "image_processing"):
        assert (tiny_dir / f"{name}_ms_llava.py").is_file()
    processor_config = json.loads((tiny_dir / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_ms_llava.MSLlavaProcessor"


def test_attention_and_kv_cache_reach_the_language_model_only(tiny_dir, reference):
    """base.py: the text config alone gets the engine's function, the model is built from the config (remote code),
    and `.attn` is attached to the modules the attention fuser takes: exactly one per language-model layer. The
    resampler is not among them and computes SDPA bit for bit; the language model attends through the engine in every
    layer."""
    config = remote_class(tiny_dir, "AutoConfig").from_pretrained(tiny_dir)
    config.text_config._attn_implementation = ENGINE
    model = remote_class(tiny_dir, "AutoModel")._from_config(config)
    model.load_state_dict(reference["model"].state_dict())
    model.eval()
    layers = config.text_config.num_hidden_layers
    assert attach_engine_attention(model) == [f"language_model.layers.{i}.self_attn" for i in range(layers)]
    assert model.multi_modal_projector.config._attn_implementation != ENGINE

    inputs = reference["inputs"]
    engine_calls.clear()
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output
        hidden = model(**inputs).last_hidden_state
    for got, expected in zip(features, reference["features"], strict=True):
        assert torch.equal(got, expected)
    assert sorted(set(engine_calls)) == [f"language_model.layers.{i}.self_attn" for i in range(layers)]
    torch.testing.assert_close(hidden, reference["hidden"], rtol=0, atol=0)


def test_the_stand_in_engine_function_fails_without_the_attached_instance(reference):
    """The check above can fail: called from a module the engine did not attach (the resampler), it raises."""
    query = torch.randn(1, 2, 3, 4)
    with pytest.raises(AttributeError, match="attn"):
        engine_attention(reference["model"].multi_modal_projector, query, query, query, None)


@pytest.mark.parametrize("how", [ENGINE, {"": ENGINE, "text_config": ENGINE}])
def test_the_resampler_runs_sdpa_whatever_config_carries_the_engine_function(tiny_dir, reference, how):
    """A user (or an engine) setting the function on more configs than the text config: the resampler still runs SDPA."""
    model = AutoModel.from_pretrained(tiny_dir).eval()
    model.set_attn_implementation(how)
    for name, module in model.named_modules():  # the vision tower's attention too, when its config got the function
        if name.endswith("self_attn"):
            module.attn = name
    with torch.no_grad():
        features = model.get_image_features(reference["inputs"]["pixel_values"], return_dict=True).pooler_output
    for got, expected in zip(features, reference["features"], strict=True):
        assert torch.equal(got, expected)


def test_replaced_linear_and_norm_layers_give_the_same_image_features(reference):
    """base.py `recursive_replace`: the backend swaps every nn.Linear and nn.LayerNorm (the resampler's included) for
    its own layers, which keep the weights and are only called. The resampler uses them only that way."""

    class Replaced(torch.nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, hidden):
            return self.layer(hidden)

    model = reference["model"]
    projector = model.multi_modal_projector
    replaced = {}
    for name, module in list(projector.named_modules()):
        if isinstance(module, torch.nn.Linear | torch.nn.LayerNorm):
            parent, _, leaf = name.rpartition(".")
            setattr(projector.get_submodule(parent), leaf, Replaced(module))
            replaced[name] = module
    try:
        assert {"input_layernorm", "kv_proj", "output_proj"} <= set(replaced)
        with torch.no_grad():
            features = model.get_image_features(reference["inputs"]["pixel_values"], return_dict=True).pooler_output
        for got, expected in zip(features, reference["features"], strict=True):
            assert torch.equal(got, expected)
    finally:
        for name, module in replaced.items():
            parent, _, leaf = name.rpartition(".")
            setattr(projector.get_submodule(parent), leaf, module)


def test_processor_gives_the_placeholders_and_counts_the_backend_reads(reference):
    """multimodal.py: the processor is called with `return_text_replacement_offsets=True`; each image's replacement
    encodes to M ids, all the image token (the embedding positions); `_get_num_multimodal_tokens` gives M tokens and
    one row of `pixel_values` per image, whatever its size (10000 x 10000 for profiling); the only other output the
    backend passes to the model as image kwargs is `pixel_values`."""
    processor, model = reference["processor"], reference["model"]
    m = model.config.resampler_config.num_queries
    images = [sample_image(size=48, seed=1), sample_image(size=37, seed=2)]
    out = processor(
        text="USER: <image>\n<image>\nWhat? ASSISTANT:", images=images, return_text_replacement_offsets=True
    )
    offsets = out.pop("text_replacement_offsets")[0]
    assert [entry["type"] for entry in offsets] == ["image", "image"]
    for entry in offsets:
        ids = processor.tokenizer.encode(entry["replacement"], add_special_tokens=False)
        assert ids == [model.config.image_token_id] * m
    assert set(out) == {"input_ids", "attention_mask", "pixel_values"}
    counts = processor._get_num_multimodal_tokens(image_sizes=[(image.height, image.width) for image in images])
    assert counts["num_image_tokens"] == [m, m] and sum(counts["num_image_patches"]) == len(out["pixel_values"])
    assert processor._get_num_multimodal_tokens(image_sizes=([10_000, 10_000],))["num_image_tokens"] == [m]
    dummy = processor(text=processor.image_token * 2, images=images)  # the profiling prompt
    assert sum(ids == processor.image_token_id for ids in dummy["input_ids"][0]) == 2 * m


def test_embeddings_merged_by_the_engine_give_the_models_own_hidden_states(reference):
    """multimodal.py / base.py: `get_image_features(pixel_values, return_dict=True).pooler_output` per image, written
    by the engine at the image positions of the text embeddings, then `forward(input_ids=None, inputs_embeds=...,
    use_cache=False, position_ids=..., return_dict=False)[0]`: the model's own hidden states."""
    model, inputs = reference["model"], reference["inputs"]
    features = reference["features"]
    assert isinstance(features, list) and len(features) == 2
    assert all(
        f.shape == (model.config.resampler_config.num_queries, model.config.text_config.hidden_size) for f in features
    )
    ids = inputs["input_ids"]
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        embeds[ids == model.config.image_token_id] = torch.cat(features)
        positions = torch.arange(ids.shape[1])[None]
        hidden = model(
            input_ids=None, inputs_embeds=embeds, use_cache=False, position_ids=positions, return_dict=False
        )
    torch.testing.assert_close(hidden[0], reference["hidden"], rtol=1e-6, atol=1e-6)


def test_the_documented_quantization_ignore_pattern_covers_the_resampler_only(reference):
    """vLLM quantizes only the linear layers it replaced, skipping the names its quantization config ignores, which
    it matches against `model.<name in the AutoModel>` (docs/serving.md gives the pattern)."""
    linears = [f"model.{name}" for name, m in reference["model"].named_modules() if isinstance(m, torch.nn.Linear)]
    ignored = [name for name in linears if fnmatch.fnmatch(name, "model.multi_modal_projector.*")]
    assert ignored and all(".multi_modal_projector." in name for name in ignored)
    assert {"model.multi_modal_projector.kv_proj", "model.multi_modal_projector.output_proj"} <= set(ignored)
    assert len(ignored) < len(linears)


def content_loops(template: str) -> list[nodes.For]:
    """renderers/hf.py's rule for the "openai" content format: a `for` loop over `message['content']` (or
    `message.content`), where `message` is the loop variable of a `for` over `messages`. Returns those loops."""
    loops = []
    for outer in _compile_jinja_template(template).environment.parse(template).find_all(nodes.For):
        if isinstance(outer.iter, nodes.Name) and outer.iter.name == "messages":
            for inner in outer.find_all(nodes.For):
                target = inner.iter
                key = getattr(target, "attr", None) or getattr(getattr(target, "arg", None), "value", None)
                if isinstance(target, nodes.Getitem | nodes.Getattr) and key == "content":
                    if isinstance(target.node, nodes.Name) and target.node.name == outer.target.name:
                        loops.append(inner)
    return loops


def test_the_chat_template_is_read_as_the_openai_content_format(reference, image):
    """vLLM hands a template in the "openai" format the messages' content as parts ({"type": "image"}); read as
    "string", an image request would render no <image>. The default template loops over `message['content']`."""
    assert content_loops(LLAVA_1_5_CHAT_TEMPLATE)
    assert not content_loops("{% for message in messages %}{{ message['content'] }}{% endfor %}")
    processor = reference["processor"]
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
    assert processor.apply_chat_template(parts, add_generation_prompt=True) == "USER: <image>\nHi? ASSISTANT:"
    text = [{"role": "user", "content": "Hi?"}]
    assert processor.apply_chat_template(text, add_generation_prompt=True) == "USER: Hi? ASSISTANT:"
    prompt = processor.apply_chat_template(parts, add_generation_prompt=True)
    assert processor(images=image, text=prompt)["input_ids"]
