"""Processor for MS-LLaVA: the image processor and the tokenizer, each image token expanded to M placeholders.
Imports nothing from the package, so that it ships with every checkpoint as remote code."""

from transformers.image_utils import make_flat_list_of_images
from transformers.processing_utils import MultiModalData, ProcessorMixin

# LLaVA-1.5's conversation style ("vicuna_v1"): "USER: <image>\n{question} ASSISTANT: {answer}</s>USER: ...".
# Image and text parts keep their order; an optional system message opens the prompt. The assistant's reply, with its
# leading space and the end-of-sequence token, sits in {% generation %} markers so that
# `return_assistant_tokens_mask=True` marks exactly the tokens a model is trained to produce, and the generation prompt
# ("... ASSISTANT:") is exactly the text that precedes them. Every loop runs over `message['content']` itself, so that
# vLLM's chat-template detector reads the "openai" content format (image parts as {"type": "image"}).
LLAVA_1_5_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{%- endif -%}{{ ' ' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ 'USER: ' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>\n' }}{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{ ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'ASSISTANT:' }}{%- generation -%}{{ ' ' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{{ eos_token }}{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


class MSLlavaProcessor(ProcessorMixin):
    r"""
    Wraps an [`MSLlavaImageProcessor`] and a tokenizer; every `image_token` in the text becomes `num_image_tokens` (M)
    placeholders, which the model fills with the MS-Resampler's M visual tokens.

    Args:
        image_processor ([`MSLlavaImageProcessor`]):
            The image processor.
        tokenizer ([`PreTrainedTokenizerBase`]):
            The tokenizer; it must know `image_token` as a single token.
        chat_template (`str`, *optional*):
            A Jinja chat template; defaults to LLaVA-1.5's conversation style (`LLAVA_1_5_CHAT_TEMPLATE`).
        num_image_tokens (`int`, defaults to 144):
            M, the model's `resampler_config.num_queries` (the model refuses prompts whose image runs are not M long).
        image_token (`str`, defaults to `"<image>"`):
            The image placeholder token.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        num_image_tokens=144,
        image_token="<image>",
        **kwargs,
    ):
        if isinstance(num_image_tokens, bool) or not isinstance(num_image_tokens, int) or num_image_tokens < 1:
            raise ValueError(f"num_image_tokens (M) must be a positive integer, got {num_image_tokens!r}")
        self.num_image_tokens, self.image_token = num_image_tokens, image_token
        token_ids = tokenizer.encode(image_token, add_special_tokens=False)
        if len(token_ids) != 1:
            raise ValueError(
                f"the tokenizer must encode image_token {image_token!r} as one token, got ids {token_ids}; "
                "add it with tokenizer.add_special_tokens({'additional_special_tokens': [image_token]})"
            )
        self.image_token_id = token_ids[0]
        super().__init__(image_processor, tokenizer, chat_template=chat_template or LLAVA_1_5_CHAT_TEMPLATE, **kwargs)

    def validate_inputs(self, images=None, text=None, *args, **kwargs):
        # transformers >= 5.23 refuses this itself; 5.18-5.22 fail with a bare StopIteration in the expansion
        super().validate_inputs(images, text, *args, **kwargs)
        if text is not None:
            found = sum(sample.count(self.image_token) for sample in ([text] if isinstance(text, str) else text))
            count = 0 if images is None else len(make_flat_list_of_images(images))
            if found != count:  # as transformers >= 5.23 words it
                raise ValueError(
                    f"The total number of {self.image_token} tokens in the prompts should be the same as the number of "
                    f"images passed. Found total {found} {self.image_token} tokens and {count} images."
                )

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.num_image_tokens

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        # A LLaVA-1.5 reply follows "ASSISTANT:" after a space its first token carries. The pipeline cuts the decoded
        # prompt (ending "ASSISTANT:") off the decoded sequence: without that space after the last "ASSISTANT:", the
        # reply it returns is the answer itself (ChatML replies start on a new line and have none).
        decoded = super().post_process_image_text_to_text(generated_outputs, skip_special_tokens, **kwargs)
        texts = [decoded] if isinstance(decoded, str) else list(decoded)
        for index, text in enumerate(texts):
            head, marker, reply = text.rpartition("ASSISTANT:")
            if marker and reply.startswith(" "):
                texts[index] = head + marker + reply[1:]
        return texts[0] if isinstance(decoded, str) else texts

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        """M placeholders per image, whatever its size (what serving engines read)."""
        vision_data = {}
        if image_sizes is not None:
            vision_data["num_image_tokens"] = [self.num_image_tokens] * len(image_sizes)
            vision_data["num_image_patches"] = [1] * len(image_sizes)
        return MultiModalData(**vision_data)


__all__ = ["LLAVA_1_5_CHAT_TEMPLATE", "MSLlavaProcessor"]
