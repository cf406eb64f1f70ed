"""ScAle: bounded scalar rescaling of a frozen decoder's attention heads and MLP outputs, as a PEFT method.

ScAle (Zhao et al., arXiv 2606.29579; only the abstract is public) learns "a small set of scalar coefficients to
modulate last-token attention and MLP activations in a fully frozen backbone": here one scalar per attention head (on
its slice of `o_proj`'s input) and one on each MLP output, `s = 1 + bound * tanh(theta)`, theta = 0 at first. Which
positions a "last" adapter scales, where it hooks, and every other choice: docs/scale.md.

`ScaleConfig`, `ScaleLayer` (with the token-scope rule, `ScaleScope`) and `ScaleModel`, as PEFT's tuners are laid out;
importing this module registers `peft_type="SCALE"` with PEFT (`get_peft_model`, `PeftModel.from_pretrained`, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from peft.config import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge, check_target_module_exists
from peft.utils.peft_types import PeftType, register_peft_method
from torch import nn

PEFT_TYPE_NAME, PREFIX = "SCALE", "scale_"
LAYER_ATTRIBUTE = "scaler"  # the child added to each adapted module (must not contain PREFIX)
SCOPE_START_KWARG = "scale_scope_start"
SCOPE_ATTRIBUTE = "_ms_llava_scale_scope"  # the model's `ScaleScope`
# Decoder attention / MLP modules of the language model only: `layers.N.self_attn|mlp` under the model root,
# `model.`, `model.language_model.` (LLaVA-family VLMs, MS-LLaVA) or `language_model.model.` (older LLaVA layout).
DEFAULT_TARGET_MODULES = r"^(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.\d+\.(?:self_attn|mlp)$"
# Module-name segments of vision modules; a target under one is refused whatever the pattern.
VISION_SEGMENTS = frozenset({"vision_tower", "vision_model", "visual", "vision_encoder", "image_encoder"})


@dataclass
class ScaleConfig(PeftConfig):
    """A ScAle adapter (see the module docstring). `target_modules` / `exclude_modules`: a regular expression (full
    match) or module names / name suffixes, as in PEFT; None: `DEFAULT_TARGET_MODULES`; a vision module is refused.
    A target with `attention_output` is an attention module, else an MLP (whose `mlp_output` merging rescales)."""

    token_scope: str = field(default="last", metadata={"help": "'last' (the token-scope rule's positions) or 'all'"})
    bound: float = field(default=1.0, metadata={"help": "b in s = 1 + b * tanh(theta), in (0, 1]; 1.0: s in (0, 2)"})
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
            raise ValueError(f"layers_to_transform must be an int >= 0 or a non-empty list of them, got {layers!r}")
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


class ScaleScope:
    """Which positions a "last" adapter scales in the current call: set by a pre-hook on the adapted model from its
    inputs (`scope_mask`), read by every `ScaleLayer`. One per model, its attribute `SCOPE_ATTRIBUTE`."""

    def __init__(self, model: nn.Module):
        self.mask: torch.Tensor | None = None  # (batch, seq) bool
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)
        setattr(model, SCOPE_ATTRIBUTE, self)

    def __call__(self, module, args, kwargs):
        self.mask = scope_mask(args, kwargs, kwargs.pop(SCOPE_START_KWARG, None))
        return args, kwargs

    def mask_for(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            raise RuntimeError(
                "a ScAle adapter with token_scope='last' ran outside a forward call of the adapted model, so the "
                "positions to scale are unknown: call the model the adapter was added to (or use token_scope='all')"
            )
        if tuple(self.mask.shape) != tuple(hidden.shape[:2]):
            raise ValueError(
                f"ScAle token scope: the model was called with {tuple(self.mask.shape)} (batch, tokens) but a decoder "
                f"layer sees {tuple(hidden.shape[:2])}; the 'last' scope needs input_ids / inputs_embeds with one "
                "position per decoder position (expand image tokens in the prompt, as the processors do)"
            )
        return self.mask.to(hidden.device)


def scope_mask(args: tuple, kwargs: dict, start=None) -> torch.Tensor | None:
    """The (batch, seq) positions a "last" adapter scales in a call, by the first rule that applies: positions >=
    `start` (`scale_scope_start`); with `labels`, those whose next token is supervised; with a KV cache that holds
    tokens (decoding), all; else the last position whose `attention_mask` is 1. None without a sequence input."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    reference = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    if reference is None:
        return None
    (batch, length), device = reference.shape[:2], reference.device
    positions = torch.arange(length, device=device).expand(batch, length)
    if start is not None:
        return positions >= torch.as_tensor(start, device=device).reshape(-1, 1)
    labels = kwargs.get("labels")
    if labels is not None and tuple(labels.shape) == (batch, length):
        return nn.functional.pad(labels[:, 1:].to(device) != -100, (0, 1))  # the last position predicts nothing
    cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers >= 5.24 calls it `cache` in generate
    if cache is not None and cache.get_seq_length() > 0:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    attention_mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if attention_mask is not None and tuple(attention_mask.shape) == (batch, length):
        last = length - 1 - attention_mask.to(device).flip(-1).ne(0).int().argmax(-1)
    else:
        last = torch.full((batch,), length - 1, device=device)
    return positions == last.reshape(-1, 1)


class ScaleLayer(nn.Module, BaseTunerLayer):
    """The scalars of one attention module (one per head) or MLP (one), the child `scaler` of that module; hooks on
    the host apply them. Holds nothing but the scalars, as PEFT expects of a tuner layer."""

    adapter_layer_names = ("scale_theta",)
    other_param_names = ("scale_bound", "scale_token_scope")

    def __init__(self, host: nn.Module, kind: str, adapter_name: str, config: ScaleConfig, scope: ScaleScope):
        super().__init__()
        self.kind, self.output = kind, config.attention_output if kind == "attention" else config.mlp_output
        self.head_dim, self.num_scalars = attention_heads(host, self.output) if kind == "attention" else (1, 1)
        self.scale_theta, self.scale_bound, self.scale_token_scope = nn.ParameterDict(), {}, {}  # by adapter name
        self._active_adapter, self._disable_adapters, self.merged_adapters = adapter_name, False, []
        object.__setattr__(self, "_host", host)  # not a submodule: the host holds this layer, not the reverse
        object.__setattr__(self, "_scope", scope)
        self._inner_handles: list = []
        if kind == "attention":
            self._handles = [
                host.register_forward_pre_hook(self._attention_pre_hook),
                host.register_forward_hook(self._attention_post_hook, always_call=True),
            ]
        else:
            self._handles = [host.register_forward_hook(self._mlp_hook)]
        self.update_layer(adapter_name, config)

    def get_base_layer(self) -> nn.Module:  # PEFT's helpers read the base layer's device and dtype
        return self._host

    def update_layer(self, adapter_name: str, config: ScaleConfig, **kwargs) -> None:
        device = next(self._host.parameters()).device
        self.scale_theta[adapter_name] = nn.Parameter(torch.zeros(self.num_scalars, device=device))
        self.scale_bound[adapter_name] = config.bound
        self.scale_token_scope[adapter_name] = config.token_scope
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def scales(self, adapter_name: str) -> torch.Tensor:
        """`1 + bound * tanh(theta)` in float32, expanded to the features it multiplies (head_dim per head)."""
        scales = 1.0 + self.scale_bound[adapter_name] * torch.tanh(self.scale_theta[adapter_name].float())
        return scales.repeat_interleave(self.head_dim)

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden` (batch, seq, features: the o_proj input or the MLP output) scaled by every active, unmerged
        adapter at the positions of its scope."""
        if self.disable_adapters:
            return hidden
        for name in self.active_adapters:
            if name in self.scale_theta and name not in self.merged_adapters:
                scaled = hidden * self.scales(name).to(hidden.dtype)
                if self.scale_token_scope[name] == "all":
                    hidden = scaled
                else:
                    hidden = torch.where(self._scope.mask_for(hidden).unsqueeze(-1), scaled, hidden)
        return hidden

    def _attention_pre_hook(self, module, args):
        # o_proj is looked up at every call: a LoRA adapter added later wraps it, and its branch must see the scaled
        # input too.
        projection = getattr(module, self.output)
        self._inner_handles.append(projection.register_forward_pre_hook(lambda m, a: (self.apply(a[0]), *a[1:])))

    def _attention_post_hook(self, module, args, output):
        if self._inner_handles:
            self._inner_handles.pop().remove()

    def _mlp_hook(self, module, args, output):
        return (self.apply(output[0]), *output[1:]) if isinstance(output, tuple) else self.apply(output)

    def detach(self) -> None:
        """Removes the hooks and this layer from its host (unloading)."""
        for handle in self._handles + self._inner_handles:
            handle.remove()
        self._handles, self._inner_handles = [], []
        if getattr(self._host, LAYER_ATTRIBUTE, None) is self:
            delattr(self._host, LAYER_ATTRIBUTE)

    def _rescale(self, name: str, inverse: bool = False, safe: bool = False) -> None:
        """Folds adapter `name` into the output projection's weights (o_proj's input columns per head; down_proj's
        output rows and bias), or out again (`inverse`)."""
        check_mergeable(name, self.scale_token_scope[name])
        target = getattr(self._host, self.output, None)
        if type(target) is not nn.Linear:  # a LoRA-wrapped or quantized layer is not a plain Linear
            raise ValueError(
                f"cannot merge ScAle into {self.output!r}: it is {type(target).__name__}, not a plain torch.nn.Linear "
                "(merge or unload other adapters on it first)"
            )
        with torch.no_grad():
            factor = self.scales(name).to(target.weight.device)
            factor = 1 / factor if inverse else factor
            weight = target.weight.float() * (factor.unsqueeze(0) if self.kind == "attention" else factor.unsqueeze(1))
            if safe and not torch.isfinite(weight).all():
                raise ValueError(f"NaNs or infinities when merging ScAle adapter {name!r}")
            target.weight.data = weight.to(target.weight.dtype)
            if self.kind == "mlp" and target.bias is not None:
                target.bias.data = (target.bias.float() * factor).to(target.bias.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        for name in check_adapters_to_merge(self, adapter_names):
            if name in self.scale_theta:
                self._rescale(name, safe=safe_merge)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:  # PeftModel.unmerge_adapter
        while self.merged_adapters:
            self._rescale(self.merged_adapters.pop(), inverse=True)

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
    """`(head_dim, num_heads)`: head_dim from the module (or its config), the heads from o_proj's input width."""
    projection = getattr(attention, output_name)
    in_features = (projection.get_base_layer() if isinstance(projection, BaseTunerLayer) else projection).in_features
    config = getattr(attention, "config", None)
    head_dim = getattr(attention, "head_dim", None) or (
        config is not None and (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    )
    if not head_dim or in_features % head_dim:
        raise ValueError(f"cannot split {output_name} input of width {in_features} into heads of size {head_dim}")
    return int(head_dim), in_features // int(head_dim)


class ScaleModel(BaseTuner):
    """PEFT tuner of ScAle: a `ScaleLayer` on every selected attention module and MLP of the language model, and one
    `ScaleScope` pre-hook on the adapted model. Used through `peft.get_peft_model(model, ScaleConfig(...))`,
    `PeftModel.from_pretrained`, or transformers' `load_adapter`."""

    prefix: str = PREFIX
    tuner_layer_cls = ScaleLayer

    @staticmethod
    def _check_target_module_exists(config: ScaleConfig, key: str) -> bool:
        """PEFT's matching of `target_modules` / `exclude_modules`, then ours of `layers_to_transform` (which PEFT
        skips for a pattern); ValueError for a module under a vision tower."""
        if not check_target_module_exists(config, key):
            return False
        vision = VISION_SEGMENTS.intersection(key.split("."))
        if vision:
            raise ValueError(
                f"ScAle target_modules matched {key!r}, a module of the vision tower ({sorted(vision)[0]}); ScAle adapts "
                "the language model only: narrow target_modules"
            )
        layer, layers = re.search(r"(?:^|\.)layers\.(\d+)\.", key), config.layers_to_transform
        return layers is None or (layer is not None and int(layer[1]) in layers)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        kind = "attention" if hasattr(target, peft_config.attention_output) else "mlp"
        if kind == "mlp" and not hasattr(target, peft_config.mlp_output):
            raise ValueError(
                f"ScAle target {current_key!r} ({type(target).__name__}) has neither {peft_config.attention_output!r} "
                f"(attention) nor {peft_config.mlp_output!r} (MLP); set attention_output / mlp_output or "
                "target_modules"
            )
        if not (peft_config.scale_attention if kind == "attention" else peft_config.scale_mlp):
            return
        existing = getattr(target, LAYER_ATTRIBUTE, None)
        if isinstance(existing, ScaleLayer):
            return existing.update_layer(adapter_name, peft_config)
        scope = getattr(self.model, SCOPE_ATTRIBUTE, None) or ScaleScope(self.model)
        layer = ScaleLayer(target, kind, adapter_name, peft_config, scope)
        if adapter_name not in self.active_adapters:
            layer.requires_grad_(False)
        target.add_module(LAYER_ATTRIBUTE, layer)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        layers = [module for module in self.model.modules() if isinstance(module, ScaleLayer)]
        if merge:
            for name in adapter_names or self.active_adapters:
                if name in self.peft_config:
                    check_mergeable(name, self.peft_config[name].token_scope)
            for layer in layers:
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        for layer in layers:
            layer.detach()
        if hasattr(self.model, SCOPE_ATTRIBUTE):
            getattr(self.model, SCOPE_ATTRIBUTE).handle.remove()
            delattr(self.model, SCOPE_ATTRIBUTE)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model


def scale_layers(model: nn.Module) -> dict[str, ScaleLayer]:
    """Every `ScaleLayer` of `model` by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, ScaleLayer)}


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
