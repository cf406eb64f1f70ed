"""`ms-llava compose`: a new MS-LLaVA from a vision encoder and a language model, the paper's starting point: both
carried over bit for bit, a freshly initialised MS-Resampler, `<image>` (and a pad token if need be) added to the
tokenizer, the tower's image preprocessing, and a chat template with the markers the assistant-only loss needs.
Streams and checks like `convert` (`conversion.streaming`). See docs/compose.md."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .checkpoints import load_config
from .conversion import shared_options, streaming
from .conversion.streaming import IMAGE_TOKEN, ConversionError
from .image_processing_ms_llava import MSLlavaImageProcessor
from .modeling_ms_llava import MSLlavaForConditionalGeneration
from .processing_ms_llava import LLAVA_1_5_CHAT_TEMPLATE, MSLlavaProcessor

# ChatML (Qwen2 / Qwen2.5's format) with images and `{% generation %}` markers around each reply and its <|im_end|>;
# "<|im_start|>assistant\n" is the generation prompt; without a system message, Qwen2's default one.
CHATML_CHAT_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}"
    "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}{{ '<|im_end|>' }}"
    "{%- endgeneration -%}{{ '\n' }}"
    "{%- else -%}"
    "{%- for part in parts -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>\n' }}{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}{{ '<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)
CHAT_TEMPLATES = {"vicuna_v1": LLAVA_1_5_CHAT_TEMPLATE, "chatml": CHATML_CHAT_TEMPLATE}
END_OF_TURN = {"chatml": "<|im_end|>"}  # also an EOS of the generation config; vicuna_v1 ends on the tokenizer's EOS


def read_parts(tower_dir: Path, llm_dir: Path):
    """`(vision config, whole, text config, causal LM on meta)`; a `ConversionError` naming what was found unless the
    tower is a vision transformer with a patch grid that `AutoModel` builds (or a whole dual encoder, `whole`, such as
    CLIPModel, whose vision half is taken) and the LLM a decoder `AutoModelForCausalLM` builds with the standard layout
    (`model.*` of its `AutoModel` decoder, `lm_head.weight`)."""
    config, text_config = load_config(tower_dir, "--vision-tower"), load_config(llm_dir, "--language-model")
    vision = getattr(config, "vision_config", None) or config
    sizes = [getattr(vision, name, None) for name in ("image_size", "patch_size")]
    if not all(isinstance(size, int) and size > 0 for size in sizes) or config.is_encoder_decoder:
        raise ConversionError(
            f"--vision-tower {tower_dir}: expected a vision transformer with a patch grid (CLIP, SigLIP or a ViT that "
            f"AutoModel loads, with integer image_size and patch_size), got model_type {config.model_type!r} "
            f"(architectures {config.architectures}) with image_size={sizes[0]!r}, patch_size={sizes[1]!r}"
        )
    what = f"model_type {text_config.model_type!r} (architectures {text_config.architectures})"
    if text_config.is_encoder_decoder or text_config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConversionError(
            f"--language-model {llm_dir}: expected a decoder-only causal language model that AutoModelForCausalLM "
            f"loads (Llama, Qwen2, Mistral, ...), got {what}"
        )
    causal = streaming.build_on_meta(AutoModelForCausalLM.from_config, text_config)
    standard = {f"model.{key}" for key in streaming.build_on_meta(AutoModel.from_config, text_config).state_dict()}
    if odd := sorted(set(causal.state_dict()) - standard - {"lm_head.weight"}):
        raise ConversionError(
            f"--language-model {llm_dir}: {what} ({type(causal).__name__}) does not have the standard decoder layout "
            f"(model.* + lm_head.weight) MS-LLaVA's language model uses; unexpected keys such as {odd[:5]}"
        )
    return vision, vision is not config, text_config, causal


def choose_chat_template(tokenizer, chat_template: str | None) -> tuple[str, str, list[str]]:
    """`(template, its name, notes)`. `chat_template`: None (ChatML for an LLM whose own template is ChatML, its own
    when that has `{% generation %}` markers, else `vicuna_v1`), `"vicuna_v1"`, `"chatml"`, `"llm"` (the LLM's own,
    which must have the markers) or a Jinja file (with the markers)."""
    from .training.data import GENERATION_MARKER

    own, name, notes = tokenizer.chat_template, chat_template, []
    if name is None:
        chatml = isinstance(own, str) and "<|im_start|>" in own and "<|im_end|>" in own
        name = "chatml" if chatml else "llm" if GENERATION_MARKER.search(str(own or "")) else "vicuna_v1"
        if own and name == "vicuna_v1":
            notes.append("the LLM's own chat template has no {% generation %} markers and is not ChatML")
    missing = [token for token in ("<|im_start|>", "<|im_end|>") if token not in tokenizer.get_vocab()]
    if name == "chatml" and missing:
        raise ConversionError(
            f"--chat-template chatml: the language model's tokenizer has no {' or '.join(missing)} token (it would be "
            "split into pieces, and generation would not stop at the end of a turn); use vicuna_v1 or a Jinja file"
        )
    if name in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[name], name, notes
    if name != "llm" and not Path(name).is_file():
        raise ConversionError(f"--chat-template {name!r}: neither one of vicuna_v1, chatml, llm nor a Jinja file")
    text = own if name == "llm" else Path(name).read_text(encoding="utf-8")
    if not GENERATION_MARKER.search(text or ""):
        whose = "the language model's own chat template" if name == "llm" else "the template"
        problem = "is missing" if not text else "has no {% generation %} ... {% endgeneration %} markers"
        raise ConversionError(
            f"--chat-template {name}: {whose} {problem} around the assistant replies; the assistant-only loss needs "
            "them (training would learn nothing)"
        )
    return text, name, notes


def compose(
    vision_tower: str | Path,
    language_model: str | Path,
    output: str | Path,
    *,
    num_queries: int = 144,
    scope_windows: list[int] | None = None,
    scope_bias_strength: float | None = None,
    fusion: str | None = None,
    resampler_kwargs: dict | None = None,
    seed: int = 0,
    vision_feature_layer: int | list[int] = -2,
    vision_feature_select_strategy: str | None = None,
    chat_template: str | None = None,
    max_shard_size: int | str = streaming.DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    check_parity: bool = True,
    log: Callable[[str], None] = print,
) -> streaming.Report:
    """Writes to `output` an MS-LLaVA of the vision tower and the language model (folders or Hub ids), carried over
    bit for bit, and a freshly initialised MS-Resampler; returns the `Report`. The resampler and output arguments are
    `convert_llava_to_ms_llava`'s; `vision_feature_layer`: the tower layer(s) the resampler reads (-2, LLaVA-1.5's);
    `vision_feature_select_strategy`: "default" (drop CLS) or "full" (None: "default" for a tower with a CLS token);
    `chat_template`: see `choose_chat_template`. A part that is not a supported tower or LLM (named with what was
    found), bad settings, an unknown, missing or mis-shaped key or a parity difference raise a `ValueError`."""
    output = streaming.check_output(output, overwrite)
    tower_dir, llm_dir = (
        streaming.resolve_part(vision_tower, "--vision-tower"),
        streaming.resolve_part(language_model, "--language-model"),
    )
    streaming.prepare_output(output, [tower_dir, llm_dir])
    vision_config, whole, text_config, causal = read_parts(tower_dir, llm_dir)
    depth = vision_config.num_hidden_layers
    layers = [vision_feature_layer] if isinstance(vision_feature_layer, int) else vision_feature_layer
    if not layers or any(not -depth - 1 <= layer <= depth for layer in layers):
        raise ConversionError(
            f"--vision-feature-layer {vision_feature_layer!r}: the tower has {depth} layers, so hidden states "
            f"{-depth - 1}..{depth}"
        )
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    template, template_name, notes = choose_chat_template(tokenizer, chat_template)
    added, tokenizer_notes = streaming.tokenizer_surgery(tokenizer)
    tower = streaming.build_on_meta(AutoModel.from_config, vision_config)
    grid = (vision_config.image_size // vision_config.patch_size) ** 2
    has_cls = any(
        key.endswith(("class_embedding", "cls_token")) or ("position_embedding" in key and tensor.shape[0] == grid + 1)
        for key, tensor in tower.state_dict().items()
    )
    if vision_feature_select_strategy == "default" and not has_cls:
        raise ConversionError(
            "--vision-feature-select-strategy default drops the CLS token, but this vision tower "
            f"({vision_config.model_type.removesuffix('_vision_model')}) has none; use 'full'"
        )
    config = streaming.ms_llava_config(
        vision_config,
        text_config,
        streaming.resampler_settings(num_queries, scope_windows, scope_bias_strength, fusion, resampler_kwargs),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy or ("default" if has_cls else "full"),
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    old_vocab, new_vocab = text_config.vocab_size, max(text_config.vocab_size, len(tokenizer))
    config.text_config.vocab_size, config.text_config.pad_token_id = new_vocab, tokenizer.pad_token_id

    log(f"reading {tower_dir} and {llm_dir}")
    key_map = streaming.KeyMap(streaming.build_on_meta(MSLlavaForConditionalGeneration, config))
    rename_tower, rename_llm = streaming.loader_renames(tower), streaming.loader_renames(causal)
    tower_keys = set(tower.state_dict())  # a whole dual encoder's other keys are its text half's
    text_half = f"not part of the vision model ({vision_config.model_type}'s text half and projections)"
    key_map.map(
        streaming.read_sources(tower_dir, "--vision-tower"),
        lambda key: "model.vision_tower." + rename_tower(key),
        (lambda key: None if rename_tower(key) in tower_keys else text_half) if whole else None,
    )
    llm_sources = streaming.read_sources(llm_dir, "--language-model")
    key_map.map(llm_sources, lambda key: re.sub(r"^model\.", "model.language_model.", rename_llm(key)))
    if new_vocab > old_vocab:
        streaming.grow_embeddings(key_map, text_config, new_vocab, seed, added)
    key_map.create(streaming.fresh_resampler(config, seed), f"MS-Resampler, freshly initialised (seed {seed})")
    key_map.check(f"{tower_dir} + {llm_dir} -> MS-LLaVA")

    settings, processor_notes = streaming.image_processor_settings(tower_dir, vision_config)
    num_queries = config.resampler_config.num_queries
    processor = MSLlavaProcessor(MSLlavaImageProcessor(**settings), tokenizer, template, num_queries, IMAGE_TOKEN)
    if (llm_dir / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(llm_dir)
    else:
        generation = GenerationConfig.from_model_config(text_config)
    eos = torch.tensor([] if generation.eos_token_id is None else generation.eos_token_id).reshape(-1).tolist()
    for token in filter(None, (tokenizer.eos_token, END_OF_TURN.get(template_name))):  # the turn's end stops too
        eos += [] if tokenizer.convert_tokens_to_ids(token) in eos else [tokenizer.convert_tokens_to_ids(token)]
    generation.eos_token_id, generation.pad_token_id = eos[0] if len(eos) == 1 else eos, tokenizer.pad_token_id
    notes += tokenizer_notes + processor_notes
    notes.append(
        f"chat template: {template_name}; image token {IMAGE_TOKEN!r} id {config.image_token_id}; pad token "
        f"{tokenizer.pad_token!r} id {tokenizer.pad_token_id}; vision_feature_layer {config.vision_feature_layer}, "
        f"vision_feature_select_strategy {config.vision_feature_select_strategy!r}"
    )

    def sources(input_ids: torch.Tensor, pixel_values: torch.Tensor):  # the parts' logits and tower states
        tower = streaming.load_quietly(AutoModel, tower_dir)  # one model at a time
        states = streaming.tower_states(tower.vision_model if whole else tower, pixel_values)
        del tower
        return streaming.load_quietly(AutoModelForCausalLM, llm_dir)(input_ids=input_ids).logits, states

    options = dict(overwrite=overwrite, max_shard_size=max_shard_size, check_parity=check_parity, log=log)
    report = streaming.Report(output, notes=notes)
    return streaming.write_checkpoint(key_map, processor, generation, sources, report, {**options, "vocab": old_vocab})


def run(args: argparse.Namespace) -> int:
    layers = args.vision_feature_layer
    options = {"vision_feature_layer": layers[0] if len(layers) == 1 else layers, "chat_template": args.chat_template}
    options["vision_feature_select_strategy"] = args.vision_feature_select_strategy
    options |= shared_options(args)
    report = compose(args.vision_tower, args.language_model, args.output, **options)
    print("\n".join(report.lines()))
    return 0
