"""`ScaleModel`: the PEFT tuner that finds the language model's attention modules and MLPs and adds a `ScaleLayer` to
each."""

from __future__ import annotations

import re

from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .config import LAYER_ATTRIBUTE, PREFIX, SCOPE_ATTRIBUTE, VISION_SEGMENTS, ScaleConfig
from .layer import ScaleLayer, ScaleScope, check_mergeable

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
