"""ScAle: bounded scalar rescaling of a frozen decoder's attention heads and MLP outputs, as a PEFT method.

ScAle (Zhao et al., arXiv 2606.29579; only the abstract is public) learns "a small set of scalar coefficients to
modulate last-token attention and MLP activations in a fully frozen backbone": here one scalar per attention head (on
its slice of `o_proj`'s input) and one on each MLP output, `s = 1 + bound * tanh(theta)`, theta = 0 at first. Which
positions a "last" adapter scales, where it hooks, and every other choice: docs/scale.md.

Importing this module registers `peft_type="SCALE"` with PEFT (`get_peft_model`, `PeftModel.from_pretrained`,
transformers' `load_adapter`).
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
    this adds one as `enum` stores its own (the maps behind `PeftType[name]`, `PeftType(value)`, iteration)."""
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

__all__ = ["DEFAULT_TARGET_MODULES", "SCOPE_START_KWARG", "ScaleConfig", "ScaleLayer", "ScaleModel", "ScaleScope"]
__all__ += ["register_scale_peft_method", "scale_layers", "scale_parameter_count", "scope_mask"]
