"""Configuration classes for MS-LLaVA: LLaVA with an MS-Resampler projector.

The projector's hyper-parameters live in their own sub-config, :class:`MSResamplerConfig`, named after the symbols of
Sec. 3 of the MS-Resampler paper (M, k, beta, h). This file imports nothing from the ``ms_llava`` package so that it can
ship with a checkpoint as remote code.
"""

import math
from numbers import Real

from transformers import AutoConfig, PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.configuration_utils import SubConfigSpec

FUSIONS = ("channel_mlp", "mean", "attention", "concat_mlp")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class MSResamplerConfig(PreTrainedConfig):
    r"""
    Configuration of the MS-Resampler projector (Sec. 3 of the paper). Symbols in brackets are the paper's.

    Args:
        num_queries (`int`, defaults to 144):
            M, the number of learnable queries per branch and so the number of visual tokens the language model sees.
            Must be a perfect square unless `query_grid` is given.
        query_grid (`list[int]`, *optional*):
            `(rows, cols)` of the query anchor grid, with `rows * cols == num_queries`. Defaults to
            `(sqrt(M), sqrt(M))`.
        scope_windows (`list[int]`, defaults to `[2, 6, 24]`):
            k^(e), the window size of each branch (Eq. 4). The number of branches E is its length.
        scope_bias_strength (`float`, defaults to 5.0):
            beta, the strength of the additive scope prior beta * B (Eq. 3). 0 gives the vanilla global resampler
            (Eq. 2). The paper gives no value; 5.0 is our choice, see the README ("Our choices where the paper gives
            no detail").
        learnable_scope_bias (`bool`, defaults to `False`):
            If `False`, B is fixed by Eq. 5. If `True`, B is a parameter of shape `(E, M, H*W)` initialised by Eq. 5
            for the vision tower's native grid (the grid can then not change).
        fusion (`str`, defaults to `"channel_mlp"`):
            How the E branch outputs are fused per token: `"channel_mlp"` (Eq. 7-8, per token and channel, a
            two-layer MLP over the E scope values), `"mean"`, `"attention"` or `"concat_mlp"` (the variants of
            Table 6).
        fusion_hidden_size (`int`, defaults to 16):
            h, the hidden width of the fusion MLP of Eq. 8 (`"channel_mlp"` only).
        fusion_act (`str`, defaults to `"gelu"`):
            phi, the non-linearity of the fusion MLP.
        hidden_size (`int`, defaults to 1024):
            Attention width D of every branch: queries, keys and values live in D dimensions, split over
            `num_attention_heads` heads. A linear layer maps the fused tokens from D to the language model's width.
        num_attention_heads (`int`, defaults to 16):
            Heads per branch. All E branches run as E * num_attention_heads heads of one attention call.
        layer_norm_eps (`float`, defaults to 1e-5):
            Epsilon of the layer norm applied to the visual tokens before the key/value projections.
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the normal initialisation of the projections and the queries.
    """

    model_type = "ms_resampler"
    base_config_key = "resampler_config"

    num_queries: int = 144
    query_grid: list[int] | None = None
    scope_windows: list[int] | None = None
    scope_bias_strength: float = 5.0
    learnable_scope_bias: bool = False
    fusion: str = "channel_mlp"
    fusion_hidden_size: int = 16
    fusion_act: str = "gelu"
    hidden_size: int = 1024
    num_attention_heads: int = 16
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if self.scope_windows is None:
            self.scope_windows = [2, 6, 24]
        super().__post_init__(**kwargs)
        if isinstance(self.scope_windows, tuple):
            self.scope_windows = list(self.scope_windows)
        if isinstance(self.query_grid, tuple):
            self.query_grid = list(self.query_grid)
        self.validate_resampler()

    def validate_resampler(self):
        """Raises `ValueError` naming the field and the value for any invalid setting."""
        if not _is_int(self.num_queries) or self.num_queries < 1:
            raise ValueError(f"num_queries (M) must be a positive integer, got {self.num_queries!r}")
        if self.query_grid is None:
            side = math.isqrt(self.num_queries)
            if side * side != self.num_queries:
                raise ValueError(
                    f"num_queries (M) must be a perfect square when query_grid is not given, got {self.num_queries}; "
                    "pass query_grid=(rows, cols) with rows * cols == num_queries"
                )
        else:
            grid = self.query_grid
            if not isinstance(grid, list) or len(grid) != 2 or not all(_is_int(v) and v >= 1 for v in grid):
                raise ValueError(f"query_grid must be two positive integers (rows, cols), got {grid!r}")
            if grid[0] * grid[1] != self.num_queries:
                raise ValueError(
                    f"query_grid {tuple(grid)} has {grid[0] * grid[1]} cells but num_queries is {self.num_queries}"
                )
        windows = self.scope_windows
        if not isinstance(windows, list) or len(windows) == 0:
            raise ValueError(f"scope_windows must be a non-empty list of window sizes k, got {windows!r}")
        if not all(_is_int(k) and k >= 1 for k in windows):
            raise ValueError(f"scope_windows must hold integers >= 1, got {windows!r}")
        beta = self.scope_bias_strength
        if isinstance(beta, bool) or not isinstance(beta, Real) or not math.isfinite(beta) or beta < 0:
            raise ValueError(f"scope_bias_strength (beta) must be a finite number >= 0, got {beta!r}")
        if not isinstance(self.learnable_scope_bias, bool):
            raise ValueError(f"learnable_scope_bias must be a bool, got {self.learnable_scope_bias!r}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        for name in ("fusion_hidden_size", "hidden_size", "num_attention_heads"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.fusion_act not in ACT2FN:
            raise ValueError(
                f"fusion_act must be an activation known to transformers' ACT2FN, got {self.fusion_act!r}"
            )
        for name in ("layer_norm_eps", "initializer_range"):
            value = getattr(self, name)
            positive = name == "layer_norm_eps"
            if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
            if positive and value == 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )

    @property
    def num_branches(self) -> int:
        """E, the number of scoped branches."""
        return len(self.scope_windows)

    @property
    def query_grid_shape(self) -> tuple[int, int]:
        """`(rows, cols)` of the query anchor grid."""
        if self.query_grid is not None:
            return tuple(self.query_grid)
        side = math.isqrt(self.num_queries)
        return side, side


class MSLlavaConfig(PreTrainedConfig):
    r"""
    Configuration of [`MSLlavaForConditionalGeneration`]: LLaVA-1.5 with its MLP projector replaced by MS-Resampler.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            The vision tower's config. Defaults to CLIP ViT-L/14 at 336 px (LLaVA-1.5's, a 24 x 24 grid).
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            The language model's config. Defaults to a Llama config.
        resampler_config (`dict` or [`MSResamplerConfig`], *optional*):
            The projector's config. Defaults to M = 144, k = [2, 6, 24], channel-wise MLP fusion.
        image_token_id (`int`, defaults to 32000):
            The id of the image placeholder token; each image takes exactly M of them in the prompt.
        vision_feature_layer (`int` or `list[int]`, defaults to -2):
            The vision tower layer(s) whose hidden states feed the projector (several are concatenated on channels).
        vision_feature_select_strategy (`str`, defaults to `"default"`):
            `"default"` drops the vision tower's CLS token, `"full"` keeps it (it gets a zero scope bias: it has no
            position on the grid, so it counts as inside every window).
        tie_word_embeddings (`bool`, defaults to `False`):
            Whether the language model ties its input and output embeddings.
    """

    model_type = "ms_llava"
    attribute_map = {"image_token_index": "image_token_id"}
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="clip_vision_model",
            init_kwargs={
                "intermediate_size": 4096,
                "hidden_size": 1024,
                "patch_size": 14,
                "image_size": 336,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "vocab_size": 32000,
                "projection_dim": 768,
            },
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "resampler_config": MSResamplerConfig,
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    resampler_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 32000
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: str = "default"
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if isinstance(self.resampler_config, dict):
            self.resampler_config = dict(self.resampler_config)
            self.resampler_config.pop("model_type", None)
        super().__post_init__(**kwargs)
        # As in LlavaConfig: checkpoints often store `tie_word_embeddings` in the text config only.
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        if isinstance(self.vision_feature_layer, tuple):
            self.vision_feature_layer = list(self.vision_feature_layer)
        self.validate_ms_llava()

    def validate_ms_llava(self):
        """Raises `ValueError` naming the field and the value for any invalid setting."""
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                "vision_feature_select_strategy must be 'default' or 'full', "
                f"got {self.vision_feature_select_strategy!r}"
            )
        layers = self.vision_feature_layer
        if not (_is_int(layers) or (isinstance(layers, list) and layers and all(_is_int(v) for v in layers))):
            raise ValueError(f"vision_feature_layer must be an int or a non-empty list of ints, got {layers!r}")
        if not _is_int(self.image_token_id) or self.image_token_id < 0:
            raise ValueError(f"image_token_id must be a non-negative integer, got {self.image_token_id!r}")
        if self.resampler_config.learnable_scope_bias:
            _ = self.vision_grid_size  # raises if the native grid is unknown

    @property
    def num_image_tokens(self) -> int:
        """M: how many placeholder tokens each image takes in the prompt (the single source of truth)."""
        return self.resampler_config.num_queries

    @property
    def image_seq_length(self) -> int:
        """LlavaConfig's name for M, read by code written for LLaVA. Not stored: it follows `num_queries`."""
        return self.resampler_config.num_queries

    @image_seq_length.setter
    def image_seq_length(self, value):
        # A config.json or kwargs may carry LLaVA's field (transformers sets unknown keys with setattr); a stored copy
        # would go stale when M changes, so the value is only checked against M.
        if value != self.resampler_config.num_queries:
            raise ValueError(
                f"image_seq_length={value!r} disagrees with resampler_config.num_queries "
                f"(M = {self.resampler_config.num_queries}); image_seq_length is M, set resampler_config.num_queries"
            )

    @property
    def vision_grid_size(self) -> tuple[int, int]:
        """`(H, W)`: the vision tower's native patch grid, from `image_size // patch_size`."""
        image_size = getattr(self.vision_config, "image_size", None)
        patch_size = getattr(self.vision_config, "patch_size", None)
        if image_size is None or patch_size is None:
            raise ValueError(
                "vision_config needs image_size and patch_size to know the native grid, "
                f"got image_size={image_size!r}, patch_size={patch_size!r}"
            )
        height, width = (image_size, image_size) if _is_int(image_size) else tuple(image_size)
        patch_h, patch_w = (patch_size, patch_size) if _is_int(patch_size) else tuple(patch_size)
        return height // patch_h, width // patch_w


__all__ = ["MSLlavaConfig", "MSResamplerConfig"]
