"""The frozen vision tower's outputs, computed once per image for a training run (`train(..., cache_vision_features=
True)`, `ms-llava train --cache-vision-features`).

Both stages of the recipe keep the vision tower frozen, so every time an image comes round again the tower computes
the same features. With the cache, `train()` runs the tower once over every distinct image of the kept records
(no gradient, eval mode, batches of `batch_size`) and keeps the hidden states the projector reads
(`vision_feature_layer`). During training the data set skips decoding and pre-processing the image: each example
carries a stand-in `pixel_values` tensor of the real shape whose every value is the image's row in the cache, and the
vision tower's `forward` (replaced on the instance for the run, restored afterwards; its weights and the saved
checkpoints are untouched) returns that row's hidden states. The projector, the language model and the loss see the
same numbers as without the cache (tested to 1e-6 on the losses).

Where it applies: images given as files (the key is the resolved path with its size and modification time), a
vision tower without active dropout (the cache is computed in eval mode), float32 stand-ins (a row index must survive
the cast). A cache is kept in memory for later `train()` calls of the same process when the tower's weights, the
image processor's settings, the feature layers and the image files are the same, so stage 2 reuses stage 1's.
Nothing is written to disk.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling

logger = logging.getLogger(__name__)

_MEMO: dict[str, FeatureCache] = {}  # fingerprint -> cache, the latest one only (it can be large)


@dataclass
class FeatureCache:
    """`rows[key]` is an image's row in `hidden_states[layer]` `(num_images, tokens, dim)` for every cached layer."""

    rows: dict[str, int]
    hidden_states: dict[int, torch.Tensor]
    num_layers: int  # entries of the tower's own `hidden_states` tuple (embeddings + every layer)
    pixel_shape: tuple[int, ...]  # (channels, height, width) of one pre-processed image


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


def vision_tower_of(model):
    """The vision tower module that `get_image_features` calls (through a PEFT wrapper too)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", base)
    tower = getattr(inner, "vision_tower", None)
    if tower is None:
        raise ValueError(f"cache_vision_features: {type(base).__name__} has no model.vision_tower")
    return tower, inner.config


def feature_layers(config) -> list[int]:
    layer = config.vision_feature_layer
    return [layer] if isinstance(layer, int) else list(layer)


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


def _fingerprint(tower, image_processor, layers: list[int], keys: list[str]) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(tower.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps(image_processor.to_dict(), sort_keys=True, default=str).encode())
    digest.update(json.dumps(layers).encode())
    digest.update("\n".join(keys).encode())
    return digest.hexdigest()


@torch.no_grad()
def build_cache(model, processor, images: list, batch_size: int = 32, log=logger.info) -> FeatureCache:
    """Runs the frozen tower once over every distinct image in `images` (file paths); reuses this process's last
    cache when nothing it depends on changed."""
    from .data import load_image

    keys, sources = [], {}
    for image in images:
        key = image_key(image)
        if key not in sources:
            sources[key] = image
            keys.append(key)
    tower, config = vision_tower_of(model)
    layers = feature_layers(config)
    fingerprint = _fingerprint(tower, processor.image_processor, layers, keys)
    if fingerprint in _MEMO:
        log("vision feature cache: reused (%d images)", len(keys))
        return _MEMO[fingerprint]
    _MEMO.clear()
    was_training = tower.training
    tower.eval()
    device = next(tower.parameters()).device
    dtype = next(tower.parameters()).dtype
    hidden: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    num_layers, pixel_shape = None, None
    try:
        for start in range(0, len(keys), batch_size):
            batch = [load_image(sources[key]) for key in keys[start : start + batch_size]]
            pixel_values = processor.image_processor(images=batch, return_tensors="pt")["pixel_values"]
            pixel_shape = tuple(pixel_values.shape[1:])
            outputs = tower(pixel_values.to(device, dtype), output_hidden_states=True, return_dict=True)
            num_layers = len(outputs.hidden_states)
            for layer in layers:
                hidden[layer].append(outputs.hidden_states[layer].detach().cpu())
    finally:
        tower.train(was_training)
    cache = FeatureCache(
        rows={key: row for row, key in enumerate(keys)},
        hidden_states={layer: torch.cat(parts) for layer, parts in hidden.items()},
        num_layers=num_layers,
        pixel_shape=pixel_shape,
    )
    size = sum(t.numel() * t.element_size() for t in cache.hidden_states.values())
    log("vision feature cache: %d images, layers %s, %.1f MB", len(keys), layers, size / 2**20)
    _MEMO[fingerprint] = cache
    return cache


_ROW = "ms_llava_feature_cache_row"


def stand_in_image(cache: FeatureCache, image) -> Image.Image:
    """A 1 x 1 placeholder image that carries the image's cache row (in `info`), for `stand_in_processor`."""
    row = cache.rows.get(image_key(image))
    if row is None:
        raise ValueError(f"image {image!r} is not in the vision feature cache")
    placeholder = Image.new("RGB", (1, 1))
    placeholder.info[_ROW] = row
    return placeholder


class _StandInImageProcessor:
    """Turns placeholder images into `(1, C, H, W)` stand-ins that hold their cache row everywhere (expanded views:
    no memory of their own); everything else is the real image processor's."""

    def __init__(self, image_processor, cache: FeatureCache):
        self._image_processor, self._cache = image_processor, cache

    def __getattr__(self, name):
        return getattr(self._image_processor, name)

    def __call__(self, images=None, *args, **kwargs):
        from transformers import BatchFeature

        flat = images if isinstance(images, (list, tuple)) else [images]
        flat = [image for item in flat for image in (item if isinstance(item, (list, tuple)) else [item])]
        rows = [image.info.get(_ROW) if isinstance(image, Image.Image) else None for image in flat]
        if any(row is None for row in rows):
            raise ValueError("cache_vision_features: an image reached the processor without its cache row")
        stand_ins = [torch.tensor(float(row)).view(1, 1, 1, 1).expand(1, *self._cache.pixel_shape) for row in rows]
        return BatchFeature({"pixel_values": torch.cat(stand_ins)})


def stand_in_processor(processor, cache: FeatureCache):
    """A shallow copy of `processor` whose image processor emits cache-row stand-ins instead of pixels."""
    copied = copy.copy(processor)
    copied.image_processor = _StandInImageProcessor(processor.image_processor, cache)
    return copied


@contextlib.contextmanager
def cached_vision_tower(model, cache: FeatureCache):
    """Replaces the tower's `forward` (on the instance) with a look-up of the stand-ins' rows, for the block."""
    tower, _ = vision_tower_of(model)
    size = len(cache.rows)

    def forward(pixel_values, *args, output_hidden_states=None, return_dict=None, **kwargs):
        rows = pixel_values[:, 0, 0, 0]
        index = rows.long()
        if (
            pixel_values.dtype != torch.float32
            or not torch.equal(index.to(rows.dtype), rows)
            or (index.numel() and (int(index.min()) < 0 or int(index.max()) >= size))
        ):
            raise ValueError(
                "cache_vision_features: the vision tower got pixel values that are not cache rows (dtype "
                f"{pixel_values.dtype}); a model call outside the training loop must not run under the cache"
            )
        states = [None] * cache.num_layers
        for layer, table in cache.hidden_states.items():
            states[layer] = table[index.to(table.device)].to(pixel_values.device)
        last = states[-1] if states[-1] is not None else next(s for s in reversed(states) if s is not None)
        return BaseModelOutputWithPooling(last_hidden_state=last, hidden_states=tuple(states))

    tower.forward = forward
    try:
        yield tower
    finally:
        del tower.forward
