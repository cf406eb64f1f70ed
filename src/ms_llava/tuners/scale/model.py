"""`ScaleModel`: the PEFT tuner that adds a `ScaleLayer` to the language model's attention modules and MLPs."""

from __future__ import annotations

import re

from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from torch import nn

from .config import LAYER_ATTRIBUTE, PREFIX, VISION_SEGMENTS, ScaleConfig
from .layer import ScaleLayer, ScaleScope, check_mergeable

SCOPE_ATTRIBUTE = "_ms_llava_scale_scope"


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
        layer = re.search(r"(?:^|\.)layers\.(\d+)\.", key)
        return config.layers_to_transform is None or (
            layer is not None and int(layer[1]) in config.layers_to_transform
        )

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
        layer = ScaleLayer(target, kind, adapter_name, peft_config, scope_of(self.model))
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


def scope_of(model: nn.Module) -> ScaleScope:
    """The model's `ScaleScope`, registered as a forward pre-hook on first use."""
    if not hasattr(model, SCOPE_ATTRIBUTE):
        scope = ScaleScope()
        scope.handle = model.register_forward_pre_hook(scope, with_kwargs=True)
        setattr(model, SCOPE_ATTRIBUTE, scope)
    return getattr(model, SCOPE_ATTRIBUTE)


def scale_layers(model: nn.Module) -> dict[str, ScaleLayer]:
    """Every `ScaleLayer` of `model` by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, ScaleLayer)}
