"""The ScAle tuner layer (the scalars of one attention module or MLP, applied by hooks) and the token-scope rule that
decides which positions it scales."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .config import LAYER_ATTRIBUTE, SCOPE_START_KWARG, ScaleConfig


class ScaleScope:
    """Which positions a "last" adapter scales in the current call: set by a pre-hook on the adapted model from its
    inputs (`scope_mask`), read by every `ScaleLayer`. One per model."""

    def __init__(self):
        self.mask: torch.Tensor | None = None  # (batch, seq) bool
        self.handle = None

    def __call__(self, module, args, kwargs):
        start = kwargs.pop(SCOPE_START_KWARG, None)
        self.mask = scope_mask(args, kwargs, start)
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
        mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
        mask[:, :-1] = labels[:, 1:].to(device) != -100
        return mask
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
        self.kind, self.attention_output, self.mlp_output = kind, config.attention_output, config.mlp_output
        self.head_dim, self.num_scalars = (
            attention_heads(host, config.attention_output) if kind == "attention" else (1, 1)
        )
        self.scale_theta = nn.ParameterDict({})
        self.scale_bound: dict[str, float] = {}
        self.scale_token_scope: dict[str, str] = {}
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
        projection = getattr(module, self.attention_output)
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
        target_name = self.attention_output if self.kind == "attention" else self.mlp_output
        target = getattr(self._host, target_name, None)
        if type(target) is not nn.Linear:  # a LoRA-wrapped or quantized layer is not a plain Linear
            raise ValueError(
                f"cannot merge ScAle into {target_name!r}: it is {type(target).__name__}, not a plain torch.nn.Linear "
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
