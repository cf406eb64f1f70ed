"""Processor for MS-LLaVA: the image processor and the tokenizer, with each image token expanded to M placeholders.

This file imports nothing from the ``ms_llava`` package so that it can ship with a checkpoint as remote code.
"""

import json
import re

from transformers.processing_utils import MultiModalData, ProcessorMixin
from transformers.utils import cached_file

# LLaVA-1.5's conversation style ("vicuna_v1"): "USER: <image>\n{question} ASSISTANT: {answer}</s>USER: ...".
# Image and text parts keep their order; an optional system message opens the prompt. The assistant's reply, with its
# leading space and the end-of-sequence token, sits in {% generation %} markers so that
# `return_assistant_tokens_mask=True` marks exactly the tokens a model is trained to produce, and the generation prompt
# ("... ASSISTANT:") is exactly the text that precedes them.
LLAVA_1_5_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}{{ ' ' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ 'USER: ' }}"
    "{%- for part in parts -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>\n' }}{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}{{ ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'ASSISTANT:' }}{%- generation -%}{{ ' ' }}"
    "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{{ eos_token }}{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


class MSLlavaProcessor(ProcessorMixin):
    r"""
    Wraps an [`MSLlavaImageProcessor`] and a tokenizer. Every `image_token` in the text becomes exactly
    `num_image_tokens` (M) placeholders, which the model fills with the MS-Resampler's M visual tokens.

    Args:
        image_processor ([`MSLlavaImageProcessor`]):
            The image processor.
        tokenizer ([`PreTrainedTokenizerBase`]):
            The tokenizer; it must know `image_token` as a single token.
        chat_template (`str`, *optional*):
            A Jinja chat template. Defaults to LLaVA-1.5's conversation style (`LLAVA_1_5_CHAT_TEMPLATE`).
        num_image_tokens (`int`, defaults to 144):
            M, the model's `resampler_config.num_queries`. `from_pretrained` refuses a checkpoint whose config says
            otherwise.
        image_token (`str`, defaults to `"<image>"`):
            The image placeholder token.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        num_image_tokens: int = 144,
        image_token: str = "<image>",
        **kwargs,
    ):
        if isinstance(num_image_tokens, bool) or not isinstance(num_image_tokens, int) or num_image_tokens < 1:
            raise ValueError(f"num_image_tokens (M) must be a positive integer, got {num_image_tokens!r}")
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        token_ids = tokenizer.encode(self.image_token, add_special_tokens=False)
        if len(token_ids) != 1:
            raise ValueError(
                f"the tokenizer must encode image_token {self.image_token!r} as one token, got ids {token_ids}; "
                "add it with tokenizer.add_special_tokens({'additional_special_tokens': [image_token]})"
            )
        self.image_token_id = token_ids[0]
        if chat_template is None:
            chat_template = LLAVA_1_5_CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.num_image_tokens

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        """Placeholder tokens per image: M for any input size (the resampler's output length does not depend on it)."""
        vision_data = {}
        if image_sizes is not None:
            vision_data["num_image_tokens"] = [self.num_image_tokens] * len(image_sizes)
            vision_data["num_image_patches"] = [1] * len(image_sizes)
        return MultiModalData(**vision_data)

    def _check_special_mm_tokens(self, text, text_inputs, modalities):
        """Refuses tokenisation (typically truncation) that cut image placeholders."""
        input_ids = text_inputs["input_ids"]
        input_ids = input_ids.tolist() if hasattr(input_ids, "tolist") else input_ids
        for index, (ids, sample) in enumerate(zip(input_ids, text, strict=True)):
            expected = len(re.findall(re.escape(self.image_token), sample))
            kept = list(ids).count(self.image_token_id)
            if kept != expected:
                raise ValueError(
                    f"truncation would cut image tokens: prompt {index} keeps {kept} of its {expected} image tokens "
                    f"(M = {self.num_image_tokens} per image); raise max_length or disable truncation"
                )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        hub_kwargs = {
            key: kwargs[key]
            for key in ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
            if key in kwargs
        }
        config_file = cached_file(
            pretrained_model_name_or_path,
            "config.json",
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **hub_kwargs,
        )
        if config_file is not None:
            with open(config_file, encoding="utf-8") as handle:
                config = json.load(handle)
            if config.get("model_type") == "ms_llava":
                num_queries = (config.get("resampler_config") or {}).get("num_queries", 144)
                if num_queries != processor.num_image_tokens:
                    raise ValueError(
                        f"{pretrained_model_name_or_path}: the processor expands each image to "
                        f"num_image_tokens={processor.num_image_tokens} tokens, but the model config has "
                        f"resampler_config.num_queries={num_queries}; they must agree"
                    )
                image_token_id = config.get("image_token_id", config.get("image_token_index", 32000))
                if image_token_id != processor.image_token_id:
                    raise ValueError(
                        f"{pretrained_model_name_or_path}: the processor's image token {processor.image_token!r} has "
                        f"id {processor.image_token_id}, but the model config has image_token_id={image_token_id}"
                    )
        return processor


__all__ = ["LLAVA_1_5_CHAT_TEMPLATE", "MSLlavaProcessor"]
