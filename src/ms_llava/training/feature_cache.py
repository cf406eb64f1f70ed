"""The frozen vision tower's features, computed once per distinct image file (`cache_vision_features=True`): both
stages keep the tower frozen, so it computes the same features whenever an image comes round again.

`build_cache` runs the model's own image path once per file and keeps what it hands the projector; the data set yields
those in place of `pixel_values`, and `vision_features_input` feeds them back as `inputs_embeds` (the projected tokens
at the image tokens) from a forward pre-hook on the inner model: inside the model's call, so under the same autocast,
DDP and FSDP forward. The losses equal an uncached run's (MS-LLaVA and transformers' LLaVA, tested). Images must be
files (keyed by path, size and modification time); pass one cache to several runs with `train(..., feature_cache=)`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import load_image

logger = logging.getLogger(__name__)


@dataclass
class FeatureCache:
    """`cache[image]`: an image's features `(tokens, dim)` as the projector reads them, then `projector_args`
    (MS-LLaVA: grid size, prefix tokens); `fingerprint`: tower weights, image processing, feature selection."""

    rows: dict[str, int]
    features: torch.Tensor  # (num_images, tokens, dim)
    projector_args: tuple[tuple, dict]
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
    return f"{path}|{path.stat().st_size}|{path.stat().st_mtime_ns}"


def inner_model(model):
    """The model holding `vision_tower` and `multi_modal_projector` (LlavaModel, MSLlavaModel), through PEFT too."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "model", base)


def check_cacheable(model) -> None:
    """ValueError when the tower trains or has active dropout (its outputs would change between visits)."""
    tower = inner_model(model).vision_tower
    training = [name for name, param in tower.named_parameters() if param.requires_grad]
    if training:
        raise ValueError(
            f"cache_vision_features needs a frozen vision tower, but {len(training)} of its parameters train "
            f"(first: {training[0]})"
        )
    dropout = {name: m.p for name, m in tower.named_modules() if type(m) is torch.nn.Dropout and m.p > 0}
    dropout.update({k: v for k, v in vars(tower.config).items() if "dropout" in k and isinstance(v, float) and v > 0})
    if dropout:
        raise ValueError(f"cache_vision_features: the vision tower has active dropout {dropout}; it cannot be cached")


@torch.no_grad()
def build_cache(model, processor, images: list, batch_size: int = 32, log=logger.info, reuse=None) -> FeatureCache:
    """Runs the frozen tower once over every distinct image file in `images`. With `reuse` (a cache built before),
    returns it when it holds every image for this tower, image processor and feature selection, else ValueError."""
    sources = {image_key(image): image for image in images}
    keys, inner = list(sources), inner_model(model)
    digest = hashlib.sha256()  # of the tower's weights, the image processing and the feature selection
    for name, tensor in sorted(inner.vision_tower.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    selection = [inner.config.vision_feature_layer, inner.config.vision_feature_select_strategy]
    digest.update(json.dumps([processor.image_processor.to_dict(), selection], sort_keys=True, default=str).encode())
    fingerprint = digest.hexdigest()
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
    captured = []  # what the model's own image path hands its projector
    hook = inner.multi_modal_projector.register_forward_pre_hook(
        lambda module, args, kwargs: captured.append((args[0].cpu(), args[1:], kwargs)), with_kwargs=True
    )
    was_training, parameter = inner.training, next(inner.vision_tower.parameters())
    inner.eval()
    try:
        for start in range(0, len(keys), batch_size):
            batch = [load_image(sources[key]) for key in keys[start : start + batch_size]]
            pixel_values = processor.image_processor(images=batch, return_tensors="pt")["pixel_values"]
            inner.get_image_features(pixel_values=pixel_values.to(parameter.device, parameter.dtype))
    finally:
        hook.remove()
        inner.train(was_training)
    features = torch.cat([features for features, _, _ in captured])
    cache = FeatureCache({key: row for row, key in enumerate(keys)}, features, captured[0][1:], fingerprint)
    size = features.numel() * features.element_size() / 2**20
    log("vision feature cache: %d images, features %s, %.1f MB", len(keys), tuple(features.shape[1:]), size)
    return cache


@contextlib.contextmanager
def vision_features_input(model, cache: FeatureCache):
    """For the block, the model takes `vision_features` (`(images, tokens, dim)`, rows of `cache`) in place of
    `pixel_values`: a forward pre-hook on the inner model projects them and passes `inputs_embeds` with the projected
    tokens at the image tokens (see the module docstring)."""
    inner = inner_model(model)
    extra_args, extra_kwargs = cache.projector_args

    def feed(module, args, kwargs):
        features = kwargs.pop("vision_features", None)
        if features is None:
            return args, kwargs
        if kwargs.get("pixel_values") is not None:
            raise ValueError("got both pixel_values and vision_features; pass one")
        input_ids = kwargs.pop("input_ids")
        embeds = module.get_input_embeddings()(input_ids)
        images = module.multi_modal_projector(features, *extra_args, **extra_kwargs)  # (images, M, text hidden)
        is_image = (input_ids == module.config.image_token_id).unsqueeze(-1)
        if int(is_image.sum()) != images[..., 0].numel():
            raise ValueError(f"{int(is_image.sum())} image tokens for {tuple(images.shape[:2])} image features")
        embeds = embeds.masked_scatter(is_image.to(embeds.device), images.to(embeds.device, embeds.dtype))
        return args, {**kwargs, "input_ids": None, "inputs_embeds": embeds}

    handle = inner.register_forward_pre_hook(feed, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
