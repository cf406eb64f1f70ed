"""Checkpoint conversion: a transformers LLaVA into an MS-LLaVA (`llava`), the original LLaVA code base's layout to
and from transformers' (`original`), and the streaming, strict checkpoint I/O both share (`checkpoint_io`)."""

from .llava import convert_llava_to_ms_llava
from .original import convert_hf_to_original, convert_original_to_hf

__all__ = ["convert_hf_to_original", "convert_llava_to_ms_llava", "convert_original_to_hf"]
