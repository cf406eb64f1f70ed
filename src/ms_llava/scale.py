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
``model.add_adapter`` then work with `ScaleConfig`. Import it (``import ms_llava.scale``) before loading a ScAle
adapter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from peft.utils.peft_types import PeftType, register_peft_method
from torch import nn

PEFT_TYPE_NAME = "SCALE"
PREFIX = "scale_"
LAYER_ATTRIBUTE = "scaler"  # the child module added to each adapted module (must not contain PREFIX: see below)
SCOPE_ATTRIBUTE = "_ms_llava_scale_scope"
SCOPE_START_KWARG = "scale_scope_start"
TOKEN_SCOPES = ("last", "all")

# Decoder attention / MLP modules of the language model only: `layers.N.self_attn|mlp` directly under the model root,
# `model.`, `model.language_model.` (LLaVA-family VLMs, MS-LLaVA) or `language_model.model.` (older LLaVA layout). A
# vision tower's layers sit under `model.vision_tower.` (or `vision_tower.`), which none of these prefixes allows.
DEFAULT_TARGET_MODULES = r"^(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.\d+\.(?:self_attn|mlp)$"
# Module-name segments that mark vision modules; a target under one is refused whatever the pattern.
VISION_SEGMENTS = frozenset({"vision_tower", "vision_model", "visual", "vision_encoder", "image_encoder"})


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


# --------------------------------------------------------------------------------------------- config


@dataclass
class ScaleConfig(PeftConfig):
    """Configuration of a ScAle adapter (see the module docstring).

    Args:
        token_scope: ``"last"`` (default; the positions of the module docstring's rule) or ``"all"`` (every token).
        bound: ``b`` in ``s = 1 + b * tanh(theta)``, in ``(0, 1]``; default 1.0, so a scalar ranges over ``(0, 2)``:
            from switching a head (or MLP) off to doubling it, never changing its sign.
        layers_to_transform: decoder layer indices to adapt (an int or a list); None: every layer.
        scale_attention / scale_mlp: adapt the attention heads / the MLP outputs (both by default).
        target_modules: a regular expression (full match) or a list of module names / name suffixes selecting the
            attention and MLP modules; None: `DEFAULT_TARGET_MODULES`, the language model's `layers.N.self_attn` and
            `layers.N.mlp`. A module under a vision tower is refused whatever the pattern.
        exclude_modules: modules not to adapt (same forms as `target_modules`).
        attention_output: the attribute name of the attention's output projection (``o_proj`` in LLaMA, Qwen2,
            Mistral, MS-LLaVA and LLaVA's language models); its presence marks a module as attention.
        mlp_output: the attribute name of the MLP's output projection (``down_proj``), used for merging.
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
        if self.token_scope not in TOKEN_SCOPES:
            raise ValueError(f"token_scope must be one of {list(TOKEN_SCOPES)}, got {self.token_scope!r}")
        bound = self.bound
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not (0 < bound <= 1):
            raise ValueError(
                f"bound must be a number in (0, 1] (s = 1 + bound * tanh(theta) stays positive), got {bound!r}"
            )
        self.bound = float(bound)
        layers = self.layers_to_transform
        if layers is not None:
            values = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
            if (
                not isinstance(values, (list, tuple))
                or not values
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)
            ):
                raise ValueError(
                    f"layers_to_transform must be a non-negative int or a non-empty list of them, got {layers!r}"
                )
            self.layers_to_transform = sorted(set(values))
        if not (self.scale_attention or self.scale_mlp):
            raise ValueError("scale_attention=False and scale_mlp=False leave nothing to scale; enable one of them")
        if self.modules_to_save:
            raise ValueError(
                f"ScAle trains only its scalars; modules_to_save must be None, got {self.modules_to_save!r}"
            )
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.target_modules, str):
            re.compile(self.target_modules)

    def resolved_target_modules(self) -> list[str] | str:
        return DEFAULT_TARGET_MODULES if self.target_modules is None else self.target_modules


def scale_parameter_count(text_config, layers: list[int] | None = None, attention: bool = True, mlp: bool = True):
    """The number of ScAle scalars for a decoder config (no weights needed): heads x layers + layers."""
    num_layers = text_config.num_hidden_layers
    selected = len([i for i in range(num_layers) if layers is None or i in layers])
    return selected * (text_config.num_attention_heads * attention + mlp)


# --------------------------------------------------------------------------------------------- token scope


class ScaleScope:
    """Which positions a ``"last"`` adapter scales in the current forward call: computed by a pre-hook on the adapted
    model from its inputs (see the module docstring), read by every `ScaleLayer`. One per model."""

    def __init__(self):
        self.mask: torch.Tensor | None = None  # [batch, seq] bool, the positions to scale
        self.handle = None

    def __call__(self, module, args, kwargs):
        start = kwargs.pop(SCOPE_START_KWARG, None)
        self.mask = scope_mask(args, kwargs, start)
        return args, kwargs

    def mask_for(self, hidden: torch.Tensor) -> torch.Tensor:
        mask = self.mask
        if mask is None:
            raise RuntimeError(
                "a ScAle adapter with token_scope='last' ran outside a forward call of the adapted model, so the "
                "positions to scale are unknown: call the model the adapter was added to (or use token_scope='all')"
            )
        if tuple(mask.shape) != tuple(hidden.shape[:2]):
            raise ValueError(
                f"ScAle token scope: the model was called with {tuple(mask.shape)} (batch, tokens) but a decoder layer "
                f"sees {tuple(hidden.shape[:2])}; the 'last' scope needs input_ids / inputs_embeds with one position "
                "per decoder position (expand image tokens in the prompt, as the processors do)"
            )
        return mask.to(hidden.device)


def _past_length(past) -> int:
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    if isinstance(past, (tuple, list)) and past and past[0] is not None:  # legacy tuple cache
        return int(past[0][0].shape[-2])
    return 0


def scope_mask(args: tuple, kwargs: dict, start=None) -> torch.Tensor | None:
    """The ``[batch, seq]`` positions a ``"last"`` adapter scales for a forward call with `args` / `kwargs` (rules in
    the module docstring); None when the call has no sequence input (then nothing can be scaled per position)."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    reference = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    if reference is None:
        return None
    batch, length = reference.shape[:2]
    device = reference.device
    positions = torch.arange(length, device=device).expand(batch, length)
    if start is not None:
        start = torch.as_tensor(start, device=device).reshape(-1, 1)
        return positions >= start
    labels = kwargs.get("labels")
    if labels is not None and labels.dim() == 2 and tuple(labels.shape) == (batch, length):
        mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
        mask[:, :-1] = labels[:, 1:].to(device) != -100
        return mask
    if _past_length(kwargs.get("past_key_values")) > 0:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    attention_mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if attention_mask is not None and attention_mask.dim() == 2 and tuple(attention_mask.shape) == (batch, length):
        last = length - 1 - attention_mask.to(device).flip(-1).ne(0).int().argmax(-1)
    else:
        last = torch.full((batch,), length - 1, device=device)
    return positions == last.reshape(-1, 1)


# --------------------------------------------------------------------------------------------- the tuner layer


class ScaleLayer(nn.Module, BaseTunerLayer):
    """The scalars of one attention module (one per head) or one MLP (one), added as the child ``scaler`` of that
    module; hooks on the host apply them. Holds nothing but the scalars, as PEFT expects of a tuner layer."""

    adapter_layer_names = ("scale_theta",)
    other_param_names = ("scale_bound", "scale_token_scope")

    def __init__(self, host: nn.Module, kind: str, adapter_name: str, config: ScaleConfig, scope: ScaleScope):
        super().__init__()
        if kind not in ("attention", "mlp"):
            raise ValueError(f"kind must be 'attention' or 'mlp', got {kind!r}")
        self.kind = kind
        self.attention_output = config.attention_output
        self.mlp_output = config.mlp_output
        self.head_dim, self.num_scalars = 1, 1
        if kind == "attention":
            self.head_dim, self.num_scalars = attention_heads(host, config.attention_output)
        self.scale_theta = nn.ParameterDict({})
        self.scale_bound: dict[str, float] = {}
        self.scale_token_scope: dict[str, str] = {}
        self._active_adapter = adapter_name
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        object.__setattr__(self, "_host", host)  # not a submodule: the host holds this layer, not the reverse
        object.__setattr__(self, "_scope", scope)
        self._handles: list = []
        self._inner_handles: list = []
        self.update_layer(adapter_name, config)
        self._attach_hooks()

    # PEFT's helpers look for a base layer's device and dtype; this layer has none of its own.
    def get_base_layer(self) -> nn.Module:
        return self._host

    def update_layer(self, adapter_name: str, config: ScaleConfig, **kwargs) -> None:
        reference = next(self._host.parameters(), None)
        device = reference.device if reference is not None else None
        self.scale_theta[adapter_name] = nn.Parameter(torch.zeros(self.num_scalars, device=device))
        self.scale_bound[adapter_name] = config.bound
        self.scale_token_scope[adapter_name] = config.token_scope
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def scales(self, adapter_name: str) -> torch.Tensor:
        """``1 + bound * tanh(theta)`` (float32), one per head (attention) or one (MLP)."""
        theta = self.scale_theta[adapter_name].float()
        return 1.0 + self.scale_bound[adapter_name] * torch.tanh(theta)

    def _expanded(self, adapter_name: str) -> torch.Tensor:
        scales = self.scales(adapter_name)
        return scales.repeat_interleave(self.head_dim) if self.kind == "attention" else scales

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scales `hidden` (``[batch, seq, features]``: the o_proj input or the MLP output) by every active, unmerged
        adapter, at the positions of its scope."""
        if self.disable_adapters:
            return hidden
        for name in self.active_adapters:
            if name not in self.scale_theta or name in self.merged_adapters:
                continue
            factor = self._expanded(name).to(hidden.dtype)
            scaled = hidden * factor
            if self.scale_token_scope[name] == "all":
                hidden = scaled
            else:
                hidden = torch.where(self._scope.mask_for(hidden).unsqueeze(-1), scaled, hidden)
        return hidden

    # hooks ------------------------------------------------------------------------------------------------------

    def _attach_hooks(self) -> None:
        host = self._host
        if self.kind == "attention":
            self._handles.append(host.register_forward_pre_hook(self._attention_pre_hook))
            self._handles.append(host.register_forward_hook(self._attention_post_hook, always_call=True))
        else:
            self._handles.append(host.register_forward_hook(self._mlp_hook))

    def detach(self) -> None:
        """Removes the hooks and this layer from its host (unloading)."""
        for handle in self._handles + self._inner_handles:
            handle.remove()
        self._handles, self._inner_handles = [], []
        host = self._host
        if getattr(host, LAYER_ATTRIBUTE, None) is self:
            delattr(host, LAYER_ATTRIBUTE)

    def _attention_pre_hook(self, module, args):
        # The output projection is looked up at every call: a LoRA adapter added later replaces `o_proj` by its own
        # wrapper, whose input (hence the LoRA branch's input too) must be the scaled one.
        projection = getattr(module, self.attention_output)
        self._inner_handles.append(projection.register_forward_pre_hook(self._projection_pre_hook))

    def _attention_post_hook(self, module, args, output):
        if self._inner_handles:
            self._inner_handles.pop().remove()

    def _projection_pre_hook(self, module, args):
        return (self.apply(args[0]), *args[1:])

    def _mlp_hook(self, module, args, output):
        if isinstance(output, tuple):
            return (self.apply(output[0]), *output[1:])
        return self.apply(output)

    # merging ----------------------------------------------------------------------------------------------------

    def _merge_target(self) -> nn.Linear:
        name = self.attention_output if self.kind == "attention" else self.mlp_output
        target = getattr(self._host, name, None)
        if type(target) is not nn.Linear:  # noqa: E721 (a LoRA-wrapped or quantized layer is not a plain Linear)
            raise ValueError(
                f"cannot merge ScAle into {name!r}: it is {type(target).__name__}, not a plain torch.nn.Linear "
                "(merge or unload other adapters on it first)"
            )
        return target

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for name in adapter_names:
            if name not in self.scale_theta:
                continue
            check_mergeable(name, self.scale_token_scope[name])
            target = self._merge_target()
            with torch.no_grad():
                factor = self._expanded(name).to(target.weight.device)
                if self.kind == "attention":  # scaling the input columns of o_proj, head by head
                    new_weight = target.weight.float() * factor.unsqueeze(0)
                    new_bias = None
                else:  # scaling the output rows (and bias) of down_proj
                    new_weight = target.weight.float() * factor.unsqueeze(1)
                    new_bias = None if target.bias is None else target.bias.float() * factor
                if safe_merge and not torch.isfinite(new_weight).all():
                    raise ValueError(f"NaNs or infinities when merging ScAle adapter {name!r}")
                target.weight.data = new_weight.to(target.weight.dtype)
                if new_bias is not None:
                    target.bias.data = new_bias.to(target.bias.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            target = self._merge_target()
            with torch.no_grad():
                factor = self._expanded(name).to(target.weight.device)
                if self.kind == "attention":
                    target.weight.data = (target.weight.float() / factor.unsqueeze(0)).to(target.weight.dtype)
                else:
                    target.weight.data = (target.weight.float() / factor.unsqueeze(1)).to(target.weight.dtype)
                    if target.bias is not None:
                        target.bias.data = (target.bias.float() / factor).to(target.bias.dtype)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, scalars={self.num_scalars}, head_dim={self.head_dim}"


def check_mergeable(adapter_name: str, token_scope: str) -> None:
    if token_scope != "all":
        raise ValueError(
            f"ScAle adapter {adapter_name!r} has token_scope={token_scope!r}: it scales only some positions (the last "
            "prompt token and the generated ones), which no change of the weights can reproduce, so it cannot be "
            "merged; keep it as an adapter, or train with token_scope='all' to merge"
        )


def attention_heads(attention: nn.Module, output_name: str = "o_proj") -> tuple[int, int]:
    """``(head_dim, num_heads)`` of an attention module: `head_dim` from the module (or its config), the number of
    heads from its output projection's input width."""
    projection = getattr(attention, output_name)
    base = projection.get_base_layer() if isinstance(projection, BaseTunerLayer) else projection
    in_features = base.in_features
    head_dim = getattr(attention, "head_dim", None)
    config = getattr(attention, "config", None)
    if head_dim is None and config is not None:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if not head_dim or in_features % head_dim:
        raise ValueError(f"cannot split {output_name} input of width {in_features} into heads of size {head_dim}")
    return int(head_dim), in_features // int(head_dim)


# --------------------------------------------------------------------------------------------- the tuner


class ScaleModel(BaseTuner):
    """PEFT tuner of ScAle: adds a `ScaleLayer` to every selected attention module and MLP of the language model, and
    one `ScaleScope` pre-hook on the adapted model. Use through `peft.get_peft_model(model, ScaleConfig(...))`,
    `PeftModel.from_pretrained`, or transformers' `model.add_adapter` / `model.load_adapter`."""

    prefix: str = PREFIX
    tuner_layer_cls = ScaleLayer
    target_module_mapping: dict = {}

    def _prepare_adapter_config(self, peft_config: ScaleConfig, model_config: dict) -> ScaleConfig:
        peft_config.target_modules = peft_config.resolved_target_modules()
        return peft_config

    def _pre_injection_hook(self, model: nn.Module, config: ScaleConfig, adapter_name: str) -> None:
        scope_of(model, create=True)

    @staticmethod
    def _check_target_module_exists(peft_config: ScaleConfig, key: str):
        return target_matches(peft_config, key)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        kind = "attention" if hasattr(target, peft_config.attention_output) else "mlp"
        if kind == "mlp" and not hasattr(target, peft_config.mlp_output):
            raise ValueError(
                f"ScAle target {current_key!r} ({type(target).__name__}) has neither {peft_config.attention_output!r} "
                f"(attention) nor {peft_config.mlp_output!r} (MLP); set attention_output / mlp_output or target_modules"
            )
        if (kind == "attention" and not peft_config.scale_attention) or (kind == "mlp" and not peft_config.scale_mlp):
            return
        existing = getattr(target, LAYER_ATTRIBUTE, None)
        if isinstance(existing, ScaleLayer):
            existing.update_layer(adapter_name, peft_config)
            return
        layer = ScaleLayer(target, kind, adapter_name, peft_config, scope_of(self.model, create=True))
        if adapter_name not in self.active_adapters:
            layer.requires_grad_(False)
        target.add_module(LAYER_ATTRIBUTE, layer)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        layers = [module for module in self.model.modules() if isinstance(module, ScaleLayer)]
        if merge:
            names = adapter_names or self.active_adapters
            for name in names:
                if name in self.peft_config:
                    check_mergeable(name, self.peft_config[name].token_scope)
            for layer in layers:
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        for layer in layers:
            layer.detach()
        scope = getattr(self.model, SCOPE_ATTRIBUTE, None)
        if scope is not None:
            scope.handle.remove()
            delattr(self.model, SCOPE_ATTRIBUTE)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model


def scope_of(model: nn.Module, create: bool = False) -> ScaleScope | None:
    """The model's `ScaleScope` (one per model, registered as a forward pre-hook on first use)."""
    scope = getattr(model, SCOPE_ATTRIBUTE, None)
    if scope is None and create:
        scope = ScaleScope()
        scope.handle = model.register_forward_pre_hook(scope, with_kwargs=True)
        setattr(model, SCOPE_ATTRIBUTE, scope)
    return scope


def target_matches(config: ScaleConfig, key: str) -> bool:
    """Whether module `key` is a ScAle target under `config`; ValueError for a module under a vision tower."""
    exclude = config.exclude_modules
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{name}") for name in exclude):
            return False
    targets = config.resolved_target_modules()
    if isinstance(targets, str):
        found = re.fullmatch(targets, key) is not None
    else:
        found = key in targets or any(key.endswith(f".{name}") for name in targets)
    if not found:
        return False
    vision = VISION_SEGMENTS.intersection(key.split("."))
    if vision:
        raise ValueError(
            f"ScAle target_modules matched {key!r}, a module of the vision tower ({sorted(vision)[0]}); ScAle adapts "
            "the language model only: narrow target_modules"
        )
    if config.layers_to_transform is not None:
        match = re.search(r"(?:^|\.)layers\.(\d+)\.", key)
        if match is None or int(match.group(1)) not in config.layers_to_transform:
            return False
    return True


def scale_layers(model: nn.Module) -> dict[str, ScaleLayer]:
    """Every `ScaleLayer` of `model` by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, ScaleLayer)}


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
