"""Compose a new MS-LLaVA from a bare vision encoder and a language model (the paper's starting point).

`ms-llava compose --vision-tower DIR_OR_HUB_ID --language-model DIR_OR_HUB_ID --output DIR` writes an MS-LLaVA
checkpoint whose vision tower and language model are the given ones, bit for bit, and whose MS-Resampler is freshly
initialised (seeded): the checkpoint stage 1 (projector pre-training) starts from. See docs/compose.md.

* Vision towers: `CLIPVisionModel` / `CLIPModel` (its vision half), `SiglipVisionModel` / `SiglipModel`, or any
  checkpoint that `AutoModel` loads as a vision transformer with a patch grid (`image_size`, `patch_size`).
* Language models: `LlamaForCausalLM`, `Qwen2ForCausalLM`, `MistralForCausalLM` and any decoder that
  `AutoModelForCausalLM` loads with the standard layout (`model.*` + `lm_head.*`).
* Tokenizer: the image token `<image>` is added (and a pad token when the LLM has none: its `unk` token as LLaVA-1.5
  does, else a new `<pad>`); the embedding matrix and `lm_head` grow by the new tokens, whose rows are the mean of the
  existing rows (only when the matrix has no spare rows already, as Qwen2.5's has).
* Chat template: LLaVA-1.5's `vicuna_v1` (`LLAVA_1_5_CHAT_TEMPLATE`) for an LLM without one, ChatML with the
  `{% generation %}` markers of the assistant-only loss for an LLM whose template is ChatML (Qwen2 / Qwen2.5).

Like the converters (`conversion.llava`), it streams: it reads safetensors headers, checks every key against the
MS-LLaVA model built on the meta device, and writes one output shard at a time into a staged folder.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

from .conversion import llava as convert_llava
from .conversion.checkpoint_io import (
    HUB_ALLOW_PATTERNS,
    IMAGE_TOKEN,
    ConversionError,
    ConversionOutput,
    ConversionReport,
    KeyPlan,
    TensorSource,
    build_on_meta,
    check_output,
    expected_state_dict_shapes,
    max_abs_difference,
    quiet_transformers,
    read_checkpoint,
    read_json,
    resolve_source,
    run_conversion,
)
from .image_processing_ms_llava import MSLlavaImageProcessor
from .modeling_ms_llava import MSLlavaForConditionalGeneration
from .processing_ms_llava import LLAVA_1_5_CHAT_TEMPLATE, MSLlavaProcessor

DEFAULT_MAX_SHARD_SIZE = convert_llava.DEFAULT_MAX_SHARD_SIZE
PAD_TOKEN = "<pad>"  # added only when the LLM has neither a pad nor an unk token

# ChatML (Qwen2 / Qwen2.5's template) with images and the `{% generation %}` markers: the assistant's reply and its
# `<|im_end|>` are what training learns (return_assistant_tokens_mask); "<|im_start|>assistant\n" is the generation
# prompt. As Qwen2's own template, a conversation without a system message gets "You are a helpful assistant.".
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
# The token that ends an assistant turn, per template (generation stops there too). None: the tokenizer's EOS.
END_OF_TURN = {"vicuna_v1": None, "chatml": "<|im_end|>"}
CHAT_TEMPLATE_CHOICES = (*CHAT_TEMPLATES, "llm")

# The vision towers read by family: config.json's model_type -> (vision config class name, whole-model text keys that
# are dropped). Other model types go through AutoConfig / AutoModel.
TOWER_FAMILIES = {
    "clip": ("CLIPConfig", ("text_model.", "visual_projection.", "text_projection.", "logit_scale")),
    "siglip": ("SiglipConfig", ("text_model.", "logit_scale", "logit_bias")),
}
TOWER_PREFIX = "model.vision_tower."
LLM_PREFIX = "model.language_model."
EMBED_KEY = LLM_PREFIX + "embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"


def hub_allow_patterns(source: str | Path) -> list[str]:
    """What to download for a Hub source: `HUB_ALLOW_PATTERNS`, plus `*.bin` for a repository that has no
    `.safetensors` weights (lmsys/vicuna-7b-v1.5 ships `pytorch_model-*.bin` only); a repository with both downloads
    only the safetensors. A local path, or a repository that cannot be listed, gets `HUB_ALLOW_PATTERNS` (and
    `resolve_source` names the problem)."""
    if Path(source).expanduser().exists():
        return HUB_ALLOW_PATTERNS
    try:
        from huggingface_hub import list_repo_files

        files = list_repo_files(str(source))
    except Exception:  # not a repo id, offline, ...: resolve_source reports it with both attempts named
        return HUB_ALLOW_PATTERNS
    has_safetensors = any(name.endswith(".safetensors") for name in files)
    return HUB_ALLOW_PATTERNS if has_safetensors else [*HUB_ALLOW_PATTERNS, "*.bin"]


# --------------------------------------------------------------------------------------------------------------------
# Vision tower
# --------------------------------------------------------------------------------------------------------------------


def load_vision_config(tower_dir: Path):
    """`(vision_config, dropped_prefixes, family)` of a vision tower checkpoint: the vision half of a CLIP / SigLIP
    model, a CLIP / SigLIP vision model, or any config `AutoModel` builds as a ViT with an `image_size` and a
    `patch_size`. Anything else is a ConversionError naming what was found."""
    import transformers
    from transformers import AutoConfig

    raw = read_json(tower_dir / "config.json")
    model_type = raw.get("model_type")
    architectures = raw.get("architectures")
    family = model_type.removesuffix("_vision_model") if isinstance(model_type, str) else None
    with quiet_transformers():
        if model_type in TOWER_FAMILIES:
            config_class, dropped = TOWER_FAMILIES[model_type]
            vision_config = getattr(transformers, config_class).from_pretrained(tower_dir).vision_config
        else:
            dropped = ()
            try:
                vision_config = AutoConfig.from_pretrained(tower_dir)
            except (ValueError, KeyError, OSError) as error:
                raise ConversionError(
                    f"--vision-tower {tower_dir}: transformers does not know its model_type {model_type!r} "
                    f"(architectures {architectures}): {error}"
                ) from error
    image_size = getattr(vision_config, "image_size", None)
    patch_size = getattr(vision_config, "patch_size", None)
    is_size = lambda value: isinstance(value, int) and not isinstance(value, bool) and value > 0  # noqa: E731
    if not (is_size(image_size) and is_size(patch_size)) or vision_config.is_encoder_decoder:
        raise ConversionError(
            f"--vision-tower {tower_dir}: expected a vision transformer with a patch grid (CLIP, SigLIP or a ViT "
            f"that AutoModel loads, with integer image_size and patch_size), got model_type {model_type!r} "
            f"(architectures {architectures}) with image_size={image_size!r}, patch_size={patch_size!r}"
        )
    return vision_config, dropped, family


def tower_key_renamer(meta_tower) -> Callable[[str], str]:
    """The key renames transformers applies when it loads this tower's checkpoints (`get_model_conversion_mapping`:
    e.g. ViT's `encoder.layer.N.attention.attention.query` -> `layers.N.attention.q_proj` since transformers 5).
    Renames only: a mapping that merges or splits tensors cannot stream one tensor at a time and is refused."""
    from transformers.conversion_mapping import WeightRenaming, get_model_conversion_mapping

    transforms = get_model_conversion_mapping(meta_tower) or []
    others = [type(transform).__name__ for transform in transforms if not isinstance(transform, WeightRenaming)]
    if others:
        raise ConversionError(
            f"the vision tower {type(meta_tower).__name__}'s checkpoints need transformers' weight conversions "
            f"{sorted(set(others))} (tensors merged or split), which a streaming compose does not apply"
        )

    def rename(key: str) -> str:
        for transform in transforms:
            key, _ = transform.rename_source_key(key)
        return key

    return rename


def plan_tower_tensors(
    sources: list[TensorSource], expected, dropped: tuple[str, ...], plan: KeyPlan, rename: Callable[[str], str]
) -> None:
    """The tower's tensors under `model.vision_tower.*`: a whole model's `vision_model.` prefix is stripped (and its
    text half dropped); transformers 4's nested `CLIPVisionModel` keys (`vision_model.*`) too; then transformers'
    own renames for the tower's class (`tower_key_renamer`)."""
    for source in sources:
        if source.name.startswith(dropped):
            plan.drop(source.name, "the vision tower checkpoint's text half (not used by MS-LLaVA)")
            continue
        key = TOWER_PREFIX + rename(source.name)
        if key not in expected and source.name.startswith("vision_model."):
            key = TOWER_PREFIX + rename(source.name.removeprefix("vision_model."))
        convert_llava.plan_tensor(plan, key, source, expected, f"{source.name} (vision tower)")


def tower_has_cls(expected_shapes: dict[str, tuple[int, ...]], vision_config) -> bool:
    """Whether the tower puts a CLS token before its patches: a `class_embedding` / `cls_token` parameter, or a
    position embedding with one row more than the patch grid."""
    grid = (vision_config.image_size // vision_config.patch_size) ** 2
    for key, shape in expected_shapes.items():
        if not key.startswith(TOWER_PREFIX):
            continue
        if key.endswith(("class_embedding", "cls_token")):
            return True
        if "position_embedding" in key and len(shape) >= 2:
            rows = shape[-2]
            if rows == grid + 1:
                return True
    return False


def image_processor_settings(tower_dir: Path, vision_config, family: str | None) -> tuple[dict, list[str]]:
    """MSLlavaImageProcessor keyword arguments for the tower: resize the short side to the tower's `image_size` and
    crop that square (after LLaVA-1.5's pad to square), with the mean, std and resampling of the tower's own
    `preprocessor_config.json`; without one, CLIP's mean/std for CLIP and 0.5 for the others (SigLIP, ViT)."""
    from transformers.image_utils import (
        IMAGENET_STANDARD_MEAN,
        IMAGENET_STANDARD_STD,
        OPENAI_CLIP_MEAN,
        OPENAI_CLIP_STD,
    )

    size = vision_config.image_size
    settings = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
    notes = []
    path = tower_dir / "preprocessor_config.json"
    preprocessing = read_json(path) if path.is_file() else {}
    for name in ("image_mean", "image_std", "resample", "rescale_factor"):
        if preprocessing.get(name) is not None:
            settings[name] = preprocessing[name]
    if "image_mean" not in settings or "image_std" not in settings:
        clip = family == "clip"
        settings["image_mean"] = list(OPENAI_CLIP_MEAN if clip else IMAGENET_STANDARD_MEAN)
        settings["image_std"] = list(OPENAI_CLIP_STD if clip else IMAGENET_STANDARD_STD)
        notes.append(
            f"the vision tower has no preprocessor_config.json mean/std: using {'CLIP' if clip else '0.5'}'s "
            f"({settings['image_mean']}, {settings['image_std']})"
        )
    return settings, notes


# --------------------------------------------------------------------------------------------------------------------
# Language model
# --------------------------------------------------------------------------------------------------------------------


def load_text_config(llm_dir: Path):
    """The language model's config; a ConversionError unless it is a decoder that `AutoModelForCausalLM` builds with
    the standard layout (`model.*` for the `AutoModel` decoder, `lm_head.*`)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    raw = read_json(llm_dir / "config.json")
    what = f"model_type {raw.get('model_type')!r} (architectures {raw.get('architectures')})"
    try:
        with quiet_transformers():
            text_config = AutoConfig.from_pretrained(llm_dir)
    except (ValueError, KeyError, OSError) as error:
        raise ConversionError(f"--language-model {llm_dir}: transformers does not know {what}: {error}") from error
    if text_config.is_encoder_decoder or text_config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConversionError(
            f"--language-model {llm_dir}: expected a decoder-only causal language model that AutoModelForCausalLM "
            f"loads (Llama, Qwen2, Mistral, ...), got {what}"
        )
    causal = build_on_meta(AutoModelForCausalLM.from_config, text_config)
    decoder = build_on_meta(AutoModel.from_config, text_config)
    causal_keys = set(causal.state_dict())
    standard = {"model." + key for key in decoder.state_dict()} | {LM_HEAD_KEY}
    if not causal_keys <= standard or LM_HEAD_KEY not in causal_keys:
        odd = sorted(causal_keys - standard)[:5]
        raise ConversionError(
            f"--language-model {llm_dir}: {what} ({type(causal).__name__}) does not have the standard decoder layout "
            f"(model.* + lm_head.weight) MS-LLaVA's language model uses; unexpected keys such as {odd}"
        )
    return text_config


def plan_llm_tensors(sources: list[TensorSource], expected, plan: KeyPlan) -> None:
    """`model.X` -> `model.language_model.X`, `lm_head.X` -> `lm_head.X`; recomputed buffers dropped."""
    for source in sources:
        if source.name.startswith("model."):
            key = LLM_PREFIX + source.name.removeprefix("model.")
        else:
            key = source.name
        convert_llava.plan_tensor(plan, key, source, expected, f"{source.name} (language model)")


def row_mean(matrix: torch.Tensor, chunk_rows: int = 4096) -> torch.Tensor:
    """The mean of `matrix`'s rows, accumulated in float64 chunk by chunk (no float copy of the whole matrix)."""
    total = torch.zeros(matrix.shape[1], dtype=torch.float64)
    for start in range(0, matrix.shape[0], chunk_rows):
        total += matrix[start : start + chunk_rows].to(torch.float64).sum(dim=0)
    return total / matrix.shape[0]


def grown_rows_source(source: TensorSource, rows: int) -> TensorSource:
    """`source` (an embedding or `lm_head` matrix) with rows appended up to `rows`, each the mean of its rows; loaded
    on demand like the source."""

    def load() -> torch.Tensor:
        matrix = source.load()
        mean = row_mean(matrix).to(matrix.dtype)
        return torch.cat([matrix, mean.expand(rows - matrix.shape[0], -1)])

    origin = f"{source.origin} + {rows - source.shape[0]} new row(s), the mean of its rows"
    return TensorSource(source.name, source.dtype, (rows, *source.shape[1:]), load, origin)


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer and chat template
# --------------------------------------------------------------------------------------------------------------------


def tokenizer_surgery(tokenizer) -> tuple[list[str], list[str]]:
    """Adds the image token (special, never split) and, when the tokenizer has no pad token, uses its unk token (as
    LLaVA-1.5 does) or adds `<pad>`. Returns `(added tokens, notes)`."""
    from tokenizers import AddedToken

    added, notes = [], []
    vocabulary = tokenizer.get_vocab()
    if IMAGE_TOKEN in vocabulary:
        notes.append(f"the tokenizer already knows {IMAGE_TOKEN!r} (id {vocabulary[IMAGE_TOKEN]}); kept")
    else:
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
        added.append(IMAGE_TOKEN)
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
            notes.append(f"the LLM has no pad token: padding with its unk token {tokenizer.unk_token!r}, as LLaVA-1.5")
        else:
            tokenizer.add_special_tokens({"pad_token": AddedToken(PAD_TOKEN, special=True, normalized=False)})
            added.append(PAD_TOKEN)
    ids = tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)
    if len(ids) != 1:
        raise ConversionError(f"the tokenizer encodes {IMAGE_TOKEN!r} as {ids} after adding it, not as one token")
    # Left padding: batched generation (the pipeline, ms-llava eval) appends new tokens on the right; the training
    # collator pads on its own.
    tokenizer.padding_side = "left"
    return added, notes


def is_chatml(template) -> bool:
    return isinstance(template, str) and "<|im_start|>" in template and "<|im_end|>" in template


def choose_chat_template(tokenizer, chat_template: str | None) -> tuple[str, str, list[str]]:
    """`(template text, its name, notes)`. `chat_template`: None (chosen from the LLM: ChatML when its own template is
    ChatML, its own when that has `{% generation %}` markers, else LLaVA-1.5's `vicuna_v1`), `"vicuna_v1"`,
    `"chatml"`, `"llm"` (the LLM's own, which must have the markers) or a path to a Jinja file."""
    from .training.data import has_generation_markers

    own = getattr(tokenizer, "chat_template", None)
    notes = []
    if chat_template is None:
        if is_chatml(own):
            name = "chatml"
        elif has_generation_markers(own):
            name = "llm"
        else:
            name = "vicuna_v1"
            if own:
                notes.append(
                    "the LLM's own chat template has no {% generation %} markers (the assistant-only loss needs them) "
                    "and is not ChatML: using LLaVA-1.5's vicuna_v1; pass --chat-template FILE for another"
                )
    else:
        name = chat_template
    if name == "chatml":
        vocabulary = tokenizer.get_vocab()
        missing = [token for token in ("<|im_start|>", "<|im_end|>") if token not in vocabulary]
        if missing:
            raise ConversionError(
                f"--chat-template chatml: the language model's tokenizer has no {' or '.join(missing)} token (it would "
                "be split into pieces, and generation would not stop at the end of a turn). Use vicuna_v1, or a Jinja "
                "file in the LLM's own format"
            )
    if name in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[name], name, notes
    if name == "llm":
        if not has_generation_markers(own):
            raise ConversionError(
                "--chat-template llm: the language model's own chat template "
                f"{'is missing' if not own else 'has no {% generation %} markers'}; the assistant-only loss needs "
                f"them. Choose one of {', '.join(CHAT_TEMPLATES)} or a Jinja file with the markers"
            )
        return own, name, notes
    path = Path(name)
    if not path.is_file():
        raise ConversionError(
            f"--chat-template {name!r}: neither one of {', '.join(CHAT_TEMPLATE_CHOICES)} nor a Jinja file"
        )
    text = path.read_text(encoding="utf-8")
    if not has_generation_markers(text):
        raise ConversionError(
            f"--chat-template {path}: the template has no {{% generation %}} ... {{% endgeneration %}} markers around "
            "the assistant replies; training on it would learn nothing"
        )
    return text, str(path), notes


def generation_config_for(llm_dir: Path, config, tokenizer, end_of_turn: str | None):
    """The LLM's generation config (or one from the model config) with the pad token and the end-of-turn token of the
    chat template among the EOS ids."""
    from transformers import GenerationConfig

    if (llm_dir / "generation_config.json").is_file():
        generation_config = GenerationConfig.from_pretrained(llm_dir)
    else:
        generation_config = GenerationConfig.from_model_config(config.text_config)
    eos = generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    for token in (tokenizer.eos_token, end_of_turn):
        token_id = tokenizer.convert_tokens_to_ids(token) if token is not None else None
        if token_id is not None and token_id not in eos:
            eos.append(token_id)
    generation_config.eos_token_id = eos[0] if len(eos) == 1 else eos
    generation_config.pad_token_id = tokenizer.pad_token_id
    return generation_config


# --------------------------------------------------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------------------------------------------------


def check_compose_parity(tower_dir: Path, llm_dir: Path, composed_dir: Path, config, old_vocab: int) -> dict:
    """Loads the source tower, the source LLM and the composed MS-LLaVA (float32, one at a time) and compares every
    hidden state of the tower on a random image and the LLM's logits (its own vocabulary) on a random prompt."""
    import gc

    from transformers import AutoModel, AutoModelForCausalLM

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, old_vocab, (1, 12), generator=generator)
    size = config.vision_config.image_size
    pixel_values = torch.randn(1, 3, size, size, generator=generator)
    with quiet_transformers(), torch.no_grad():
        tower = AutoModel.from_pretrained(tower_dir, dtype=torch.float32).eval()
        tower = getattr(tower, "vision_model", tower) if hasattr(tower, "text_model") else tower
        source_hidden = torch.stack(tower(pixel_values, output_hidden_states=True).hidden_states)
        del tower
        llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32).eval()
        source_logits = llm(input_ids=input_ids).logits
        del llm
        gc.collect()
        composed = MSLlavaForConditionalGeneration.from_pretrained(composed_dir, dtype=torch.float32).eval()
        composed_hidden = torch.stack(
            composed.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        )
        composed_logits = composed(input_ids=input_ids).logits[..., :old_vocab]
        convert_llava.check_new_resampler(composed, pixel_values, config)
    return {
        "vision tower hidden states (random image)": max_abs_difference(source_hidden, composed_hidden),
        "language model logits (text-only prompt, the LLM's vocabulary)": max_abs_difference(
            source_logits, composed_logits
        ),
    }


# --------------------------------------------------------------------------------------------------------------------
# Compose
# --------------------------------------------------------------------------------------------------------------------


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
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    check_parity: bool = True,
    log: Callable[[str], None] = print,
) -> ConversionReport:
    """Writes to `output` an MS-LLaVA made of the vision tower `vision_tower` and the language model `language_model`
    (directories or Hub repo ids), carried over bit for bit, and a freshly initialised MS-Resampler.

    Args:
        num_queries, scope_windows, scope_bias_strength, fusion, resampler_kwargs, seed: the MS-Resampler, as in
            `convert_llava_to_ms_llava` (None keeps MSResamplerConfig's defaults).
        vision_feature_layer: the tower layer(s) the resampler reads (-2: LLaVA-1.5's penultimate layer).
        vision_feature_select_strategy: `"default"` (drop CLS) or `"full"`; None: `"default"` for a tower with a CLS
            token (CLIP), `"full"` for one without (SigLIP).
        chat_template: None (chosen from the LLM, see `choose_chat_template`), `"vicuna_v1"`, `"chatml"`, `"llm"` or
            a Jinja file.
        max_shard_size, overwrite, check_parity, log: as in `convert_llava_to_ms_llava`.

    Raises:
        ConversionError (a ValueError): a part that is not a supported vision tower or language model (named with
            what was found), bad settings, any unknown, missing or mis-shaped key, or a parity failure. Nothing is
            left in `output` then.
    """
    from transformers import AutoTokenizer

    job = ConversionOutput.start(output, max_shard_size, overwrite, check_parity, log)
    tower_dir = resolve_source(vision_tower, hub_allow_patterns(vision_tower), label="--vision-tower")
    llm_dir = resolve_source(language_model, hub_allow_patterns(language_model), label="--language-model")
    check_output(output, overwrite, sources=[tower_dir, llm_dir])

    vision_config, dropped_prefixes, family = load_vision_config(tower_dir)
    text_config = load_text_config(llm_dir)
    layers = [vision_feature_layer] if isinstance(vision_feature_layer, int) else list(vision_feature_layer)
    depth = vision_config.num_hidden_layers
    if not layers or any(not -depth - 1 <= layer <= depth for layer in layers):
        raise ConversionError(
            f"--vision-feature-layer {vision_feature_layer!r}: the tower has {depth} layers, so hidden states "
            f"{-depth - 1}..{depth}"
        )
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    template, template_name, notes = choose_chat_template(tokenizer, chat_template)
    added_tokens, tokenizer_notes = tokenizer_surgery(tokenizer)
    notes += tokenizer_notes
    old_vocab = text_config.vocab_size
    new_vocab = max(old_vocab, len(tokenizer))
    text_config.vocab_size = new_vocab
    text_config.pad_token_id = tokenizer.pad_token_id

    # The strategy needs the tower's layout: build it on meta once with "full" to read its parameters.
    probe = SimpleNamespace(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy or "full",
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    config = convert_llava.build_ms_llava_config(
        probe, num_queries, scope_windows, scope_bias_strength, fusion, resampler_kwargs
    )
    meta_model = build_on_meta(MSLlavaForConditionalGeneration, config)
    expected_shapes, tied_keys = expected_state_dict_shapes(meta_model)
    has_cls = tower_has_cls(expected_shapes, vision_config)
    if vision_feature_select_strategy is None:
        config.vision_feature_select_strategy = "default" if has_cls else "full"
    elif vision_feature_select_strategy == "default" and not has_cls:
        raise ConversionError(
            f"--vision-feature-select-strategy default drops the CLS token, but this vision tower ({family}) has "
            "none; use 'full'"
        )

    log(f"reading {tower_dir} and {llm_dir}")
    plan = KeyPlan(f"{tower_dir} + {llm_dir} -> MS-LLaVA")
    rename = tower_key_renamer(meta_model.model.vision_tower)
    plan_tower_tensors(read_checkpoint(tower_dir), expected_shapes, dropped_prefixes, plan, rename)
    plan_llm_tensors(read_checkpoint(llm_dir), expected_shapes, plan)
    grown = []
    for key in (EMBED_KEY, LM_HEAD_KEY):
        source = plan.entries.get(key)
        if source is not None and source.shape[0] < new_vocab:
            plan.replace(key, grown_rows_source(source, new_vocab))
            grown.append(key)
    dtype, created = convert_llava.plan_initial_resampler(plan, config, seed)
    plan.check(expected_shapes, optional=tied_keys)

    processor_settings, processor_notes = image_processor_settings(tower_dir, vision_config, family)
    notes += processor_notes
    processor = MSLlavaProcessor(
        image_processor=MSLlavaImageProcessor(**processor_settings),
        tokenizer=tokenizer,
        chat_template=template,
        num_image_tokens=config.resampler_config.num_queries,
        image_token=IMAGE_TOKEN,
    )
    if processor.image_token_id != config.image_token_id:  # one source of truth: the tokenizer
        raise ConversionError(f"image token id {processor.image_token_id} != config's {config.image_token_id}")
    end_of_turn = END_OF_TURN.get(template_name)
    generation_config = generation_config_for(llm_dir, config, tokenizer, end_of_turn)

    report = ConversionReport(output=job.output, notes=notes)
    report.dropped = plan.dropped
    report.created = created
    if grown:
        report.created[
            f"{new_vocab - old_vocab} new embedding row(s) ({', '.join(added_tokens)}) = the mean of the rows"
        ] = grown
    report.notes.append(
        f"chat template: {template_name}; image token {IMAGE_TOKEN!r} id {config.image_token_id}; pad token "
        f"{tokenizer.pad_token!r} id {tokenizer.pad_token_id}; vision_feature_layer {config.vision_feature_layer}, "
        f"vision_feature_select_strategy {config.vision_feature_select_strategy!r}"
    )

    def write_files(staging: Path) -> None:
        convert_llava.save_config_files(meta_model, config, dtype, staging, generation_source=None)
        generation_config.save_pretrained(staging)
        processor.save_pretrained(staging)

    def parity(staging: Path) -> dict[str, float]:
        return check_compose_parity(tower_dir, llm_dir, staging, config, old_vocab)

    what = "source vision tower and language model vs composed MS-LLaVA"
    return job.write(plan, report, [tower_dir, llm_dir], write_files, parity, what, convert_llava.PARITY_FAILURE)


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------

# The options shared with `convert llava-to-ms-llava`, taken from its parser (one definition of each).
SHARED_OPTIONS = (
    "num_queries",
    "scope_windows",
    "scope_bias_strength",
    "fusion",
    "seed",
    "max_shard_size",
    "overwrite",
    "no_parity",
)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vision-tower", required=True, help="a CLIP / SigLIP / ViT checkpoint directory or Hub id")
    parser.add_argument("--language-model", required=True, help="a causal LM checkpoint directory or Hub id")
    parser.add_argument("--output", required=True, help="the MS-LLaVA checkpoint directory to write")
    convert_options = argparse.ArgumentParser(add_help=False)
    convert_llava._add_arguments(convert_options)
    for action in convert_options._actions:
        if action.dest in SHARED_OPTIONS:
            parser._add_action(action)  # the same Action object: help, type, default as `convert`
    parser.add_argument(
        "--vision-feature-layer",
        type=int,
        nargs="+",
        default=[-2],
        metavar="LAYER",
        help="the tower layer(s) the resampler reads (-2, LLaVA-1.5's penultimate layer)",
    )
    parser.add_argument(
        "--vision-feature-select-strategy",
        choices=("default", "full"),
        help="'default' drops the CLS token, 'full' keeps every token (default: 'default' for a tower with a CLS "
        "token such as CLIP, 'full' for one without such as SigLIP)",
    )
    parser.add_argument(
        "--chat-template",
        metavar="NAME_OR_FILE",
        help="vicuna_v1 (LLaVA-1.5), chatml (Qwen2), llm (the LLM's own, with {%% generation %%} markers) or a "
        "Jinja file (default: chatml for an LLM whose template is ChatML, else vicuna_v1)",
    )


def _handle(args: argparse.Namespace) -> int:
    layers = args.vision_feature_layer
    return run_conversion(
        lambda: compose(
            args.vision_tower,
            args.language_model,
            args.output,
            vision_feature_layer=layers[0] if len(layers) == 1 else layers,
            vision_feature_select_strategy=args.vision_feature_select_strategy,
            chat_template=args.chat_template,
            **convert_llava.resampler_and_output_options(args),  # the SHARED_OPTIONS
        )
    )


def add_cli(commands) -> argparse.ArgumentParser:
    """Registers `compose` on the `ms-llava` subparsers; `args.handler(args)` runs it (exit code)."""
    help_text = "a vision encoder + a language model -> a new MS-LLaVA (fresh MS-Resampler, the rest bit-exact)"
    return convert_llava.add_command(commands, "compose", help_text, __doc__.split("\n\n")[0], _add_arguments, _handle)


add_arguments, run = _add_arguments, _handle  # `ms-llava compose` (ms_llava_cli's convention)


def main(argv: list[str] | None = None) -> int:
    description = __doc__.split("\n\n")[0]
    return convert_llava.run_command(argv, "python -m ms_llava.compose", description, _add_arguments, _handle)


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["CHATML_CHAT_TEMPLATE", "CHAT_TEMPLATES", "add_arguments", "add_cli", "compose", "main", "run"]
