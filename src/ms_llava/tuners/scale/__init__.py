"""ScAle: bounded scalar rescaling of a frozen decoder's attention heads and MLP outputs, as a PEFT method.

ScAle (Zhao et al., arXiv 2606.29579; only the abstract is public) learns "a small set of scalar coefficients to
modulate last-token attention and MLP activations in a fully frozen backbone". Here, per selected decoder layer:

- one scalar per attention head, multiplying that head's output (its slice of the input of `o_proj`);
- one scalar per layer, multiplying the MLP output;

each scalar is ``s = 1 + bound * tanh(theta)`` with ``theta`` initialised to 0, so the adapted model is exactly the
base model at initialisation, and ``s`` stays in ``(1 - bound, 1 + bound)``. LLaVA-1.5-7B dimensions (32 layers x 32
heads + 32 MLPs) give 1,056 parameters.

**Token scope.** ``token_scope="all"`` scales every position. ``token_scope="last"`` (the default, the paper's "last
token") scales, in each forward call:

1. with ``scale_scope_start=S`` passed to the model (an int, or one per row): positions ``>= S`` of the call;
2. else with ``labels`` (training): the positions whose next token is supervised (``labels[t + 1] != -100``): the
   last prompt token and every answer token followed by another answer token;
3. else with a KV cache that already holds tokens (decoding): every position of the call (each generated token);
4. else (prefill, or a forward without cache): the last prompt position of each row: the last position whose
   ``attention_mask`` is 1 (the final position with left padding; the last real token with right padding).

So cached greedy generation equals an uncached forward of the whole sequence with ``scale_scope_start = P - 1`` (P the
prompt length): the last prompt token and every generated token are scaled, nothing before. Rule 2 scales the same
positions as generation does for a one-turn answer, so training sees what generation will do.

**Placement.** The adapter never replaces a module: it adds a child ``scaler`` (a PEFT tuner layer holding the
scalars) to each selected attention module and MLP, and hooks: the attention's output projection input is scaled per
head through a pre-hook installed on whatever module ``o_proj`` is at call time (a LoRA-wrapped ``o_proj`` included, so
LoRA's branch sees the scaled input too), the MLP output through a forward hook. Module names of the base model do
not change, so LoRA adapters (which wrap the linear layers) load and save the same with or without ScAle.

Only ``token_scope="all"`` can be merged into the weights (the per-head scalars into the columns of ``o_proj``'s
weight, the MLP scalar into ``down_proj``'s weight rows and bias); a position-dependent scaling cannot be folded into
weights, so merging a ``"last"`` adapter raises ValueError.

Importing this module registers the method with PEFT (``peft_type="SCALE"``, see `register_scale_peft_method`):
``get_peft_model``, ``PeftModel.from_pretrained``, ``save_pretrained`` and transformers' ``model.load_adapter`` /
``model.add_adapter`` then work with `ScaleConfig`. Import it (``import ms_llava.tuners.scale``) before loading a ScAle
adapter.
"""

from __future__ import annotations

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

# --------------------------------------------------------------------------------------------- registration


def _add_peft_type_member(name: str) -> PeftType:
    """PEFT 0.21's `register_peft_method` accepts only names that are members of its `PeftType` enum, and
    transformers' `load_adapter` reads `peft_config.peft_type.value`, so a third-party method needs a real member.
    Python enums cannot be extended through their API; this adds one the way `enum` builds its own members (the maps
    `__members__`, `PeftType(value)`, `PeftType[name]` and iteration read). Idempotent."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    if hasattr(PeftType, "_sort_order_"):
        member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ refuses to touch member names
    return member


def register_scale_peft_method() -> None:
    """Makes ``peft_type="SCALE"`` known to PEFT (enum member, config, tuner and ``scale_`` prefix). Idempotent; run
    when this module is imported."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

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
