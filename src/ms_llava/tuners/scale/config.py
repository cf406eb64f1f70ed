"""`ScaleConfig`: the settings of a ScAle adapter, and the names its layer and tuner share."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from peft.config import PeftConfig
from peft.utils.peft_types import PeftType

PEFT_TYPE_NAME, PREFIX = "SCALE", "scale_"
LAYER_ATTRIBUTE = "scaler"  # the child added to each adapted module (must not contain PREFIX)
SCOPE_START_KWARG = "scale_scope_start"
# Decoder attention / MLP modules of the language model only: `layers.N.self_attn|mlp` under the model root,
# `model.`, `model.language_model.` (LLaVA-family VLMs, MS-LLaVA) or `language_model.model.` (older LLaVA layout).
DEFAULT_TARGET_MODULES = r"^(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.\d+\.(?:self_attn|mlp)$"
# Module-name segments of vision modules; a target under one is refused whatever the pattern.
VISION_SEGMENTS = frozenset({"vision_tower", "vision_model", "visual", "vision_encoder", "image_encoder"})


@dataclass
class ScaleConfig(PeftConfig):
    """A ScAle adapter (see `ms_llava.tuners.scale`).

    Args:
        token_scope: "last" (default: the positions of the token-scope rule) or "all" (every position).
        bound: `b` in `s = 1 + b * tanh(theta)`, in (0, 1]; 1.0 lets a scalar range over (0, 2).
        layers_to_transform: decoder layer indices (an int or a list); None: every layer.
        scale_attention / scale_mlp: adapt the attention heads / the MLP outputs (both by default).
        target_modules / exclude_modules: a regular expression (full match) or module names / name suffixes; None:
            `DEFAULT_TARGET_MODULES`. A module under a vision tower is refused.
        attention_output / mlp_output: the attribute of the output projection (`o_proj` marks an attention module;
            `down_proj` is used for merging).
    """

    token_scope: str = field(default="last", metadata={"help": "'last' (default) or 'all'"})
    bound: float = field(default=1.0, metadata={"help": "b in s = 1 + b * tanh(theta), in (0, 1]"})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "layer indices; None: all"})
    scale_attention: bool = field(default=True, metadata={"help": "one scalar per attention head"})
    scale_mlp: bool = field(default=True, metadata={"help": "one scalar per MLP output"})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "attention / MLP modules"})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "modules not to adapt"})
    attention_output: str = field(default="o_proj", metadata={"help": "attention output projection attribute"})
    mlp_output: str = field(default="down_proj", metadata={"help": "MLP output projection attribute"})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "not supported by ScAle; keep None"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType[PEFT_TYPE_NAME]
        if self.token_scope not in ("last", "all"):
            raise ValueError(f"token_scope must be one of ['last', 'all'], got {self.token_scope!r}")
        if isinstance(self.bound, bool) or not isinstance(self.bound, (int, float)) or not 0 < self.bound <= 1:
            raise ValueError(f"bound must be a number in (0, 1] (s = 1 + bound * tanh(theta) > 0), got {self.bound!r}")
        self.bound = float(self.bound)
        layers = self.layers_to_transform
        values = [layers] if type(layers) is int else layers
        valid = isinstance(values, (list, tuple)) and values and all(type(v) is int and v >= 0 for v in values)
        if layers is not None and not valid:
            raise ValueError(
                f"layers_to_transform must be a non-negative int or a non-empty list of them, got {layers!r}"
            )
        self.layers_to_transform = None if layers is None else sorted(set(values))
        if not (self.scale_attention or self.scale_mlp):
            raise ValueError("scale_attention=False and scale_mlp=False leave nothing to scale; enable one of them")
        if self.modules_to_save:
            raise ValueError(
                f"ScAle trains only its scalars; modules_to_save must be None, got {self.modules_to_save!r}"
            )
        targets = DEFAULT_TARGET_MODULES if self.target_modules is None else self.target_modules
        self.target_modules = re.compile(targets).pattern if isinstance(targets, str) else sorted(targets)


def scale_parameter_count(text_config, layers: list[int] | None = None, attention: bool = True, mlp: bool = True):
    """The number of ScAle scalars for a decoder config (no weights needed): heads x layers + layers."""
    selected = sum(layers is None or i in layers for i in range(text_config.num_hidden_layers))
    return selected * (text_config.num_attention_heads * attention + mlp)
