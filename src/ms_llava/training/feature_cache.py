"""The frozen vision tower's features, computed once per distinct image for a training run (`train(...,
cache_vision_features=True)`, `ms-llava train --cache-vision-features`).

Both stages keep the tower frozen, so it would compute the same features every time an image comes round again.
`build_cache` runs it once over the distinct image files (eval mode, no gradient) and keeps each image's
`vision_features`: the tower's hidden states as the projector reads them (`vision_feature_layer`, CLS dropped under
"default"). The data set then yields them in place of `pixel_values`; MS-LLaVA takes them as its `vision_features`
input, transformers' LLaVA through `vision_features_input`. The losses equal an uncached run's (tested).

Where it applies: images given as files (keyed by resolved path, size and modification time) and a tower without
active dropout. To share one cache between runs of a process (both stages over the same images, several projector
variants), build it once and pass it: `train(..., cache_vision_features=True, feature_cache=cache)`.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .data import load_image

logger = logging.getLogger(__name__)


@dataclass
class FeatureCache:
    """`features[rows[image_key(image)]]` is an image's `vision_features` `(tokens, dim)`; `cache[image]` looks it up.

    `fingerprint` names what the features depend on besides the images: the tower's weights, the image processor's
    settings and the feature selection."""

    rows: dict[str, int]
    features: torch.Tensor  # (num_images, tokens, dim)
    fingerprint: str

    def __getitem__(self, image) -> torch.Tensor:
        row = self.rows.get(image_key(image))
        if row is None:
            raise KeyError(f"image {image!r} is not in the vision feature cache")
        return self.features[row]

    def __len__(self) -> int:
        return len(self.rows)


def image_key(image) -> str:
    """An image file's cache key: its resolved path, size and modification time. Other images raise ValueError."""
    if not isinstance(image, (str, os.PathLike)):
        raise ValueError(
            f"cache_vision_features needs the images as files; got a {type(image).__name__} (images decoded in "
            "memory or stored as bytes cannot be keyed; train without cache_vision_features)"
        )
    path = Path(image).resolve()
    stat = path.stat()
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"


def _inner(model):
    """The model holding `vision_tower` and `multi_modal_projector` (through a PEFT wrapper too)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", base)
    if getattr(inner, "vision_tower", None) is None:
        raise ValueError(f"cache_vision_features: {type(base).__name__} has no model.vision_tower")
    return inner


def vision_tower_of(model):
    """The vision tower module and the config that selects its features."""
    inner = _inner(model)
    return inner.vision_tower, inner.config


def takes_vision_features(model) -> bool:
    """Whether the model takes `vision_features` itself (MS-LLaVA) rather than through `vision_features_input`."""
    return "vision_features" in inspect.signature(_inner(model).get_image_features).parameters


def check_cacheable(model) -> None:
    """ValueError when the tower trains or has active dropout (its outputs would then change between visits)."""
    tower, _ = vision_tower_of(model)
    training = [name for name, param in tower.named_parameters() if param.requires_grad]
    if training:
        raise ValueError(
            f"cache_vision_features needs a frozen vision tower, but {len(training)} of its parameters train "
            f"(first: {training[0]})"
        )
    dropout = {
        name: module.p
        for name, module in tower.named_modules()
        if isinstance(module, torch.nn.Dropout) and module.p > 0
    }
    config = getattr(tower, "config", None)
    if config is not None:
        dropout.update({k: v for k, v in vars(config).items() if "dropout" in k and isinstance(v, float) and v > 0})
    if dropout:
        raise ValueError(f"cache_vision_features: the vision tower has active dropout {dropout}; it cannot be cached")


def vision_features_of(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The tower's hidden states that the projector reads, `(num_images, tokens, dim)`."""
    inner = _inner(model)
    if takes_vision_features(model):
        return inner.get_vision_features(pixel_values)
    # transformers' LlavaModel.get_image_features selects them this way before its projector.
    config = inner.config
    layer, strategy = config.vision_feature_layer, config.vision_feature_select_strategy
    outputs = inner.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    layers = [layer] if isinstance(layer, int) else layer
    dropped = 1 if strategy == "default" else 0
    return torch.cat([outputs.hidden_states[index][:, dropped:] for index in layers], dim=-1)


def _fingerprint(model, image_processor) -> str:
    tower, config = vision_tower_of(model)
    digest = hashlib.sha256()
    for name, tensor in sorted(tower.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps(image_processor.to_dict(), sort_keys=True, default=str).encode())
    selection = [config.vision_feature_layer, config.vision_feature_select_strategy, takes_vision_features(model)]
    digest.update(json.dumps(selection).encode())
    return digest.hexdigest()


@torch.no_grad()
def build_cache(
    model, processor, images: list, batch_size: int = 32, log=logger.info, reuse: FeatureCache | None = None
) -> FeatureCache:
    """Runs the frozen tower once over every distinct image in `images` (file paths). With `reuse` (a cache built
    before), returns it instead when it holds every image for this tower, image processor and feature selection,
    and raises ValueError when it does not."""
    keys, sources = [], {}
    for image in images:
        key = image_key(image)
        if key not in sources:
            sources[key] = image
            keys.append(key)
    fingerprint = _fingerprint(model, processor.image_processor)
    if reuse is not None:
        missing = [key for key in keys if key not in reuse.rows]
        if reuse.fingerprint != fingerprint or missing:
            reason = (
                f"lacks {len(missing)} of the {len(keys)} images (first: {sources[missing[0]]})"
                if missing
                else "was built for another vision tower, image processor or feature selection"
            )
            raise ValueError(f"the feature_cache given {reason}")
        log("vision feature cache: reused (%d images)", len(keys))
        return reuse
    tower, _ = vision_tower_of(model)
    was_training = tower.training
    tower.eval()
    device, dtype = next(tower.parameters()).device, next(tower.parameters()).dtype
    parts = []
    try:
        for start in range(0, len(keys), batch_size):
            batch = [load_image(sources[key]) for key in keys[start : start + batch_size]]
            pixel_values = processor.image_processor(images=batch, return_tensors="pt")["pixel_values"]
            parts.append(vision_features_of(model, pixel_values.to(device, dtype)).detach().cpu())
    finally:
        tower.train(was_training)
    cache = FeatureCache({key: row for row, key in enumerate(keys)}, torch.cat(parts), fingerprint)
    size = cache.features.numel() * cache.features.element_size()
    log("vision feature cache: %d images, features %s, %.1f MB", len(keys), tuple(cache.features.shape[1:]),
        size / 2**20)  # fmt: skip
    return cache


def projected(model, vision_features: torch.Tensor) -> list[torch.Tensor]:
    """The projector's tokens for `vision_features`, one `(tokens, text_hidden)` tensor per image."""
    inner = _inner(model)
    if takes_vision_features(model):
        return list(inner.get_image_features(vision_features=vision_features).pooler_output)
    return list(inner.multi_modal_projector(vision_features))  # as LlavaModel.get_image_features does


@contextlib.contextmanager
def vision_features_input(model):
    """Lets the model take `vision_features` in place of `pixel_values` for the block.

    MS-LLaVA takes them itself: nothing to do. transformers' LlavaForConditionalGeneration has no such input and
    hands unknown keywords on to its LlavaModel, so a forward pre-hook (PyTorch's API, removed after the block) on
    that LlavaModel turns them into its own `mm_encoder_outputs` input, projected there: inside the model's call, so
    under the same autocast and DDP forward as the projector without the cache."""
    if takes_vision_features(model):
        yield
        return

    def encode(module, args, kwargs):
        features = kwargs.pop("vision_features", None)
        if features is None:
            return None
        if kwargs.get("pixel_values") is not None:
            raise ValueError("got both pixel_values and vision_features; pass one")
        image = BaseModelOutputWithPooling(pooler_output=list(module.multi_modal_projector(features)))
        return args, {**kwargs, "mm_encoder_outputs": {**(kwargs.get("mm_encoder_outputs") or {}), "image": image}}

    handle = _inner(model).register_forward_pre_hook(encode, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
