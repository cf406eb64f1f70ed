"""The ScAle tuner layer (the scalars of one attention module or MLP, applied by hooks) and the token-scope rule
that decides which positions it scales."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .config import LAYER_ATTRIBUTE, SCOPE_START_KWARG, ScaleConfig

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
