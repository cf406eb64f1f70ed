"""Configuration of MS-LLaVA: LLaVA with an MS-Resampler projector, whose settings (the paper's M, k, beta, h) live in
their own sub-config. Imports nothing from the package, so that it ships with every checkpoint as remote code."""

import math
from typing import Literal

import transformers
from huggingface_hub.dataclasses import strict
from packaging.version import Version
from transformers import AutoConfig, PreTrainedConfig
from transformers.activations import ACT2FN

if Version(transformers.__version__) < Version("5.18"):  # the package and every checkpoint's code load this first
    raise ImportError(
        f"MS-LLaVA needs transformers >= 5.18, found {transformers.__version__}: pip install -U transformers"
    )

# LLaVA-1.5's vision tower, CLIP ViT-L/14 at 336 px (LlavaConfig's default)
CLIP_VIT_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
CLIP_VIT_L_336.update(image_size=336, patch_size=14, projection_dim=768, vocab_size=32000)


@strict
class MSResamplerConfig(PreTrainedConfig):
    r"""
    Configuration of the MS-Resampler projector (Sec. 3 of the paper); the paper's symbols are in brackets.

    Args:
        num_queries (`int`, defaults to 144):
            M, the learnable queries per branch: the number of visual tokens the language model sees per image. A
            perfect square unless `query_grid` is given.
        query_grid (`list[int]`, *optional*):
            `(rows, cols)` of the query anchor grid, `rows * cols == num_queries`. Defaults to `(sqrt M, sqrt M)`.
        scope_windows (`list[int]`, defaults to `[2, 6, 24]`):
            k^(e), the window size of each branch (Eq. 4); E is its length.
        scope_bias_strength (`float`, defaults to 5.0):
            beta, the strength of the scope prior beta * B (Eq. 3); 0 is the vanilla resampler (Eq. 2). The paper
            gives no value: 5.0 is our choice (README, "Our choices where the paper gives no detail").
        learnable_scope_bias (`bool`, defaults to `False`):
            `True` makes B a parameter `(E, M, H*W)` initialised by Eq. 5 on the vision tower's native grid.
        fusion (`str`, defaults to `"channel_mlp"`):
            How the E branch outputs are fused per token: `"channel_mlp"` (Eq. 7-8), or Table 6's `"mean"`,
            `"attention"` and `"concat_mlp"`.
        fusion_hidden_size (`int`, defaults to 16):
            h, the hidden width of the Eq. 8 MLP.
        fusion_act (`str`, defaults to `"gelu"`):
            phi, the non-linearity of the fusion MLPs (a key of transformers' `ACT2FN`).
        hidden_size (`int`, defaults to 1024):
            D, the attention width of every branch, split over `num_attention_heads` heads.
        num_attention_heads (`int`, defaults to 16):
            Heads per branch.
        layer_norm_eps (`float`, defaults to 1e-5):
            Epsilon of the layer norm on the visual tokens before the key/value projections.
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the normal initialisation of the queries and projections.
    """

    model_type = "ms_resampler"
    base_config_key = "resampler_config"

    num_queries: int = 144
    query_grid: list[int] | tuple[int, int] | None = None
    scope_windows: list[int] | tuple[int, ...] | None = None
    scope_bias_strength: float | int = 5.0
    learnable_scope_bias: bool = False
    fusion: Literal["channel_mlp", "mean", "attention", "concat_mlp"] = "channel_mlp"
    fusion_hidden_size: int = 16
    fusion_act: str = "gelu"
    hidden_size: int = 1024
    num_attention_heads: int = 16
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        self.scope_windows = [2, 6, 24] if self.scope_windows is None else list(self.scope_windows)
        self.query_grid = None if self.query_grid is None else list(self.query_grid)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Ranges and the fields that must agree; `@strict` checks the types."""
        super().validate_architecture()
        rows, cols = self.query_grid_shape
        if self.num_queries < 1 or rows * cols != self.num_queries:
            raise ValueError(
                f"num_queries (M) must be a positive perfect square, or rows * cols of query_grid; got "
                f"num_queries={self.num_queries}, query_grid={self.query_grid and tuple(self.query_grid)}"
            )
        if rows < 1 or cols < 1 or len(self.query_grid or [rows, cols]) != 2:
            raise ValueError(f"query_grid must be two positive integers (rows, cols), got {self.query_grid}")
        if not self.scope_windows or min(self.scope_windows) < 1:
            raise ValueError(f"scope_windows must be a non-empty list of integers >= 1, got {self.scope_windows}")
        if not (math.isfinite(self.scope_bias_strength) and self.scope_bias_strength >= 0):
            raise ValueError(
                f"scope_bias_strength (beta) must be a finite number >= 0, got {self.scope_bias_strength}"
            )
        for name in "fusion_hidden_size hidden_size num_attention_heads layer_norm_eps initializer_range".split():
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )
        if self.fusion_act not in ACT2FN:
            raise ValueError(f"fusion_act must be a key of transformers' ACT2FN, got {self.fusion_act!r}")

    @property
    def num_branches(self) -> int:
        """E, the number of scoped branches."""
        return len(self.scope_windows)

    @property
    def query_grid_shape(self) -> tuple[int, int]:
        """`(rows, cols)` of the query anchor grid (`(0, 0)` when M is no perfect square and no grid is given)."""
        if self.query_grid is not None:
            return tuple(self.query_grid)
        side = math.isqrt(max(self.num_queries, 0))
        return (side, side) if side * side == self.num_queries else (0, 0)


@strict
class MSLlavaConfig(PreTrainedConfig):
    r"""
    Configuration of [`MSLlavaForConditionalGeneration`]: LLaVA-1.5 with MS-Resampler as its projector.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            The vision tower's config; defaults to CLIP ViT-L/14 at 336 px (a 24 x 24 grid).
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            The language model's config; defaults to Llama.
        resampler_config (`dict` or [`MSResamplerConfig`], *optional*):
            The projector's config; its `num_queries` is M, the image tokens per image in the prompt.
        image_token_id (`int`, defaults to 32000):
            The image placeholder token; each image takes exactly M of them.
        vision_feature_layer (`int` or `list[int]`, defaults to -2):
            The vision tower layer(s) whose hidden states feed the projector (several are concatenated on channels).
        vision_feature_select_strategy (`str`, defaults to `"default"`):
            `"default"` drops the tower's CLS token, `"full"` keeps it (with a zero scope bias: it has no grid
            position).
        tie_word_embeddings (`bool`, defaults to `False`):
            Whether the language model ties its input and output embeddings.
    """

    model_type = "ms_llava"
    attribute_map = {"image_token_index": "image_token_id"}
    # Plain `sub_configs`, built in `__post_init__`, as transformers' own LlavaConfig up to 5.19 does: newer releases
    # read it too, and `sub_configs_defaults` does not exist before 5.20.
    sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig, "resampler_config": MSResamplerConfig}

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    resampler_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 32000
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        sub_configs = (("vision_config", "clip_vision_model", CLIP_VIT_L_336), ("text_config", "llama", {}))
        for key, model_type, defaults in sub_configs:
            value = getattr(self, key)
            if not isinstance(value, PreTrainedConfig):
                settings = {**defaults} if value is None else {**value}
                setattr(self, key, AutoConfig.for_model(settings.pop("model_type", model_type), **settings))
        if not isinstance(self.resampler_config, MSResamplerConfig):
            settings = {**(self.resampler_config or {})}
            settings.pop("model_type", None)
            self.resampler_config = MSResamplerConfig(**settings)
        # As in LlavaConfig: checkpoints often store `tie_word_embeddings` in the text config only.
        self.tie_word_embeddings |= bool(getattr(self.text_config, "tie_word_embeddings", False))
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """The checks that need more than one field; `@strict` checks the types."""
        super().validate_architecture()
        if self.image_token_id < 0:
            raise ValueError(f"image_token_id must be >= 0, got {self.image_token_id}")

    @property
    def image_seq_length(self) -> int:
        """LlavaConfig's name for M, for code written for LLaVA; not stored, it is `resampler_config.num_queries`."""
        return self.resampler_config.num_queries

    @image_seq_length.setter
    def image_seq_length(self, value):  # a config.json written for LLaVA may carry it: accepted when it is M
        if value != self.resampler_config.num_queries:
            raise ValueError(
                f"image_seq_length={value!r} disagrees with resampler_config.num_queries (M = "
                f"{self.resampler_config.num_queries}); image_seq_length is M, set resampler_config.num_queries"
            )

    @property
    def vision_grid_size(self) -> tuple[int, int]:
        """`(H, W)`, the vision tower's native patch grid: `image_size // patch_size`."""
        image_size, patch_size = self.vision_config.image_size, self.vision_config.patch_size
        image_size = (image_size, image_size) if isinstance(image_size, int) else image_size
        patch_size = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
        return image_size[0] // patch_size[0], image_size[1] // patch_size[1]


__all__ = ["MSLlavaConfig", "MSResamplerConfig"]
