"""ScAle: bounded scalar rescaling of a frozen decoder's attention heads and MLP outputs, as a PEFT method.

ScAle (Zhao et al., arXiv 2606.29579; only the abstract is public) learns "a small set of scalar coefficients to
modulate last-token attention and MLP activations in a fully frozen backbone". Per selected decoder layer: one scalar
per attention head (on its slice of `o_proj`'s input) and one on the MLP output, each `s = 1 + bound * tanh(theta)`,
theta = 0 at first, so the adapted model starts as the base model exactly. docs/scale.md gives every choice.

**Token scope.** `token_scope="all"` scales every position; `"last"` (default) scales, in each forward call, the
first that applies: (1) with `scale_scope_start=S` passed to the model, positions >= S; (2) with `labels`, the
positions whose next token is supervised; (3) with a KV cache that holds tokens (decoding), every position; (4) else
the last position whose `attention_mask` is 1. So cached greedy generation equals an uncached forward of the whole
sequence with `scale_scope_start = P - 1`, and training scales what generation will.

**Placement.** Nothing is replaced: a child `scaler` (the PEFT tuner layer) is added to each attention module and
MLP, with hooks (the head scalars on whatever `o_proj` is at call time, LoRA-wrapped too), so LoRA adapters load and
save the same keys with or without ScAle. Only `token_scope="all"` merges into the weights.

Importing this module registers `peft_type="SCALE"` with PEFT: `get_peft_model`, `PeftModel.from_pretrained`,
`save_pretrained` and transformers' `load_adapter` then take `ScaleConfig`.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils.peft_types import PeftType, register_peft_method

from .config import (
    DEFAULT_TARGET_MODULES,
    PEFT_TYPE_NAME,
    PREFIX,
    SCOPE_START_KWARG,
    ScaleConfig,
    scale_parameter_count,
)
from .layer import ScaleLayer, ScaleScope, scope_mask
from .model import ScaleModel, scale_layers


def _add_peft_type_member(name: str) -> PeftType:
    """peft 0.21's `register_peft_method` takes only members of its `PeftType` enum, and transformers' `load_adapter`
    reads `peft_type.value`, so a third-party method needs a real member. Enums cannot be extended through their API:
    this adds one as `enum` stores its own (the maps behind `PeftType[name]`, `PeftType(value)`, iteration). Idempotent."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = member._value_ = name
    if hasattr(PeftType, "_sort_order_"):
        member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ refuses member names
    return member


def register_scale_peft_method() -> None:
    """Makes `peft_type="SCALE"` known to PEFT (enum member, config, tuner, `scale_` prefix). Idempotent."""
    peft_type = _add_peft_type_member(PEFT_TYPE_NAME)
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=ScaleConfig, model_cls=ScaleModel, prefix=PREFIX)


register_scale_peft_method()

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "SCOPE_START_KWARG",
    "ScaleConfig",
    "ScaleLayer",
    "ScaleModel",
    "ScaleScope",
    "register_scale_peft_method",
    "scale_layers",
    "scale_parameter_count",
    "scope_mask",
]
