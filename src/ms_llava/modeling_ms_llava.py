"""MS-LLaVA: transformers' LLaVA with the MLP projector replaced by MS-Resampler (Sec. 3 of the paper).

Only the projector is new. The model classes subclass transformers' LLaVA classes and keep its submodule names
(`vision_tower`, `multi_modal_projector`, `language_model`), its forward pass, its generation and its loss. This file
imports from the ``ms_llava`` package only relatively, so that it can ship with a checkpoint as remote code.
"""

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llava.modeling_llava import (
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaPreTrainedModel,
)
from transformers.utils import is_torchdynamo_compiling
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import select_hidden_states

from .configuration_ms_llava import MSLlavaConfig, MSResamplerConfig

# --------------------------------------------------------------------------------------------------------------------
# Spatial scope prior (Sec. 3.4)
# --------------------------------------------------------------------------------------------------------------------


def _band_centre(index: int, bands: int, size: int) -> float:
    """Centre of band `index` when `size` rows are split into `bands` contiguous bands as evenly as possible."""
    return ((index * size) // bands + ((index + 1) * size) // bands - 1) / 2


def query_anchors(rows: int, cols: int, grid_height: int, grid_width: int) -> torch.Tensor:
    """Anchor (y, x) of each query, in token-index coordinates, row-major over the query grid.

    The H rows are split into `rows` contiguous bands, band i covering rows floor(i*H/rows) .. floor((i+1)*H/rows)-1
    (the same for columns); a query's anchor is the geometric centre of its cell, e.g. 2i + 0.5 for 2 x 2 cells.

    Returns:
        `torch.Tensor` of shape `(rows * cols, 2)`, float32.
    """
    if rows > grid_height or cols > grid_width:
        raise ValueError(
            f"the query grid {rows}x{cols} is finer than the visual token grid {grid_height}x{grid_width}: "
            "every query needs at least one token in its cell; use fewer queries or a larger image"
        )

    centre_y = torch.tensor([_band_centre(i, rows, grid_height) for i in range(rows)])  # (rows,)
    centre_x = torch.tensor([_band_centre(j, cols, grid_width) for j in range(cols)])  # (cols,)
    return torch.stack(torch.meshgrid(centre_y, centre_x, indexing="ij"), dim=-1).view(rows * cols, 2)


def build_scope_bias(windows: list[int], rows: int, cols: int, grid_height: int, grid_width: int) -> torch.Tensor:
    """B of Eq. 5 for every branch: 0 where token l lies in the k x k window of Eq. 4 around query i's anchor, else -1.

    Returns:
        `torch.Tensor` of shape `(E, rows * cols, grid_height * grid_width)`, float32, values 0 / -1.
    """
    anchors = query_anchors(rows, cols, grid_height, grid_width)  # (M, 2)
    token_y, token_x = torch.meshgrid(torch.arange(grid_height), torch.arange(grid_width), indexing="ij")
    token_yx = torch.stack([token_y.reshape(-1), token_x.reshape(-1)], dim=-1).to(torch.float32)  # (N, 2)
    distance = (anchors[:, None, :] - token_yx[None, :, :]).abs()  # (M, N, 2)
    half_windows = torch.tensor([k // 2 for k in windows], dtype=torch.float32).view(-1, 1, 1, 1)  # (E, 1, 1, 1)
    inside = (distance[None] <= half_windows).all(dim=-1)  # (E, M, N)
    return torch.where(inside, 0.0, -1.0)


# --------------------------------------------------------------------------------------------------------------------
# Fusion of the E branch outputs (Sec. 3.5 and Table 6). Input (batch, M, E, D), output (batch, M, D).
# --------------------------------------------------------------------------------------------------------------------


class ChannelMLPFusion(nn.Module):
    """Eq. 7-8: for every token i and channel j, a two-layer MLP over the expert vector z_ij in R^E, shared by all
    (i, j). Parameters carry the paper's names: W1 (h, E), b1 (h), w2 (h), b2 (1)."""

    def __init__(self, num_branches: int, hidden_size: int, act: str):
        super().__init__()
        self.num_branches, self.hidden_size = num_branches, hidden_size
        self.weight1 = nn.Parameter(torch.empty(hidden_size, num_branches))
        self.bias1 = nn.Parameter(torch.empty(hidden_size))
        self.weight2 = nn.Parameter(torch.empty(hidden_size))
        self.bias2 = nn.Parameter(torch.empty(1))
        self.act = ACT2FN[act]

    def reset_parameters(self):
        # Variance-preserving start: the library's default normal(0, 0.02) on both layers would shrink the fused
        # tokens about a thousandfold.
        # Sizes from the constructor, not the parameters: DeepSpeed ZeRO-3 partitions them (shape (0,)) as soon as
        # the constructor returns, before MSResampler's constructor calls this.
        num_branches, hidden = self.num_branches, self.hidden_size
        init.normal_(self.weight1, mean=0.0, std=num_branches**-0.5)
        init.zeros_(self.bias1)
        init.normal_(self.weight2, mean=0.0, std=(2.0 / hidden) ** 0.5)
        init.zeros_(self.bias2)

    def forward(self, branch_outputs: torch.Tensor) -> torch.Tensor:
        expert_vectors = branch_outputs.transpose(-1, -2)  # (batch, M, D, E): z_ij
        hidden = self.act(nn.functional.linear(expert_vectors, self.weight1, self.bias1))  # (batch, M, D, h)
        return torch.matmul(hidden, self.weight2) + self.bias2  # (batch, M, D)


class MeanFusion(nn.Module):
    """Table 6 "Average": the element-wise mean over the E branches."""

    def forward(self, branch_outputs: torch.Tensor) -> torch.Tensor:
        return branch_outputs.mean(dim=-2)


class ScopeWeightedFusion(nn.Module):
    """Table 6 "Attention": per token, a softmax over E scores, each a linear function of that branch's output
    (the paper gives no more detail; this is our reading)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = nn.Linear(hidden_size, 1)

    def forward(self, branch_outputs: torch.Tensor) -> torch.Tensor:
        weights = self.score(branch_outputs).softmax(dim=-2)  # (batch, M, E, 1): alpha_i^(e)
        return (weights * branch_outputs).sum(dim=-2)


class ConcatMLPFusion(nn.Module):
    """Table 6 "MLP" (channel-mixed): concatenate the E outputs to E*D channels, then Linear -> act -> Linear to D."""

    def __init__(self, num_branches: int, hidden_size: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(num_branches * hidden_size, hidden_size)
        self.act = ACT2FN[act]
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, branch_outputs: torch.Tensor) -> torch.Tensor:
        concatenated = branch_outputs.flatten(-2)  # (batch, M, E*D): u_i
        return self.fc2(self.act(self.fc1(concatenated)))


def _build_fusion(resampler_config) -> nn.Module:
    if resampler_config.fusion == "channel_mlp":
        return ChannelMLPFusion(
            resampler_config.num_branches, resampler_config.fusion_hidden_size, resampler_config.fusion_act
        )
    if resampler_config.fusion == "mean":
        return MeanFusion()
    if resampler_config.fusion == "attention":
        return ScopeWeightedFusion(resampler_config.hidden_size)
    return ConcatMLPFusion(resampler_config.num_branches, resampler_config.hidden_size, resampler_config.fusion_act)


# --------------------------------------------------------------------------------------------------------------------
# The resampler
# --------------------------------------------------------------------------------------------------------------------


def eager_resampler_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention with logits and softmax in float32 whatever the input dtype.

    query `(batch, heads, M, head_dim)`, key/value `(batch, heads, N, head_dim)`, attention_mask additive
    `(1 or batch, heads, M, N)`. Returns the output as `(batch, M, heads, head_dim)` (the layout of transformers'
    attention functions) and the probabilities `(batch, heads, M, N)`.
    """
    with torch.autocast(query.device.type, enabled=False):  # autocast (Trainer's bf16) would run these in bf16
        logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling  # (batch, heads, M, N)
        if attention_mask is not None:
            logits = logits + attention_mask.float()
        probs = logits.softmax(dim=-1)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs.to(value.dtype), value)  # (batch, heads, M, head_dim)
    return output.transpose(1, 2).contiguous(), probs


class MSResampler(PreTrainedModel):
    """MS-Resampler: E scoped resampling branches (Eq. 3) fused per token (Eq. 7-8), mapping the vision tower's
    `(batch, N, vision_hidden)` tokens to `(batch, M, text_hidden)`.

    Each branch e has its own M learnable queries Q^(e) and key/value projections W_K^(e), W_V^(e). All branches run
    in one attention call with the additive bias beta * B^(e) (Sec. 3.4): the E branches are its heads and each
    branch's `num_attention_heads` heads are folded into the batch, so one `(1, E, M, N)` bias serves all. Where the
    paper is silent we chose: a LayerNorm on the visual tokens before the key/value projections (shared by the
    branches), attention of width D = `hidden_size` split over `num_attention_heads` heads with the usual
    1/sqrt(head_dim) scaling, and one linear map from D to the language model's width after the fusion.

    It is a sub-model whose config is the model's `resampler_config` (as Idefics2's perceiver is), so that
    transformers checks and sets its attention implementation like the vision tower's and the language model's,
    from `attn_implementation` at load time and in `set_attn_implementation`. It is built from the whole
    `MSLlavaConfig`, which gives it the vision and text widths.
    """

    config: MSResamplerConfig
    input_modalities = ("image",)
    _supports_sdpa = True
    _supports_flash_attn = True  # runs SDPA under a flash implementation, see `forward`
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: MSLlavaConfig):
        resampler_config = config.resampler_config
        super().__init__(resampler_config)
        self.scope_windows = list(resampler_config.scope_windows)
        self.num_branches = resampler_config.num_branches
        self.num_queries = resampler_config.num_queries
        self.query_rows, self.query_cols = resampler_config.query_grid_shape
        self.hidden_size = resampler_config.hidden_size
        self.num_heads = resampler_config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.scaling = self.head_dim**-0.5
        num_feature_layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        self.vision_hidden_size = config.vision_config.hidden_size * num_feature_layers

        self.input_layernorm = nn.LayerNorm(self.vision_hidden_size, eps=resampler_config.layer_norm_eps)
        self.queries = nn.Parameter(torch.empty(self.num_branches, self.num_queries, self.hidden_size))
        # W_K^(e) and W_V^(e) of every branch in one matrix: one matmul computes all keys and values.
        self.kv_proj = nn.Linear(self.vision_hidden_size, 2 * self.num_branches * self.hidden_size, bias=False)
        self.fusion = _build_fusion(resampler_config)
        self.output_proj = nn.Linear(self.hidden_size, config.text_config.hidden_size)

        self.native_grid = None
        if resampler_config.learnable_scope_bias:
            self.native_grid = config.vision_grid_size
            grid_tokens = self.native_grid[0] * self.native_grid[1]
            self.learned_scope_bias = nn.Parameter(torch.empty(self.num_branches, self.num_queries, grid_tokens))
        # B (unscaled) per (grid, prefix tokens, device, dtype), built once: it depends only on the windows and grid.
        self._bias_cache: dict[tuple, torch.Tensor] = {}
        # No `post_init` here: the enclosing model's `post_init` initialises this sub-model through `_init_weights`
        # in the same order as its other modules, so a seeded model keeps the weights it had when the resampler was a
        # plain module (a second initialisation here would shift every later random draw).
        self.reset_parameters()

    def _init_weights(self, module):
        if isinstance(module, (MSResampler, ChannelMLPFusion)):
            module.reset_parameters()
        else:
            super()._init_weights(module)

    def reset_parameters(self):
        """Initialises every parameter (also called by the model's `_init_weights`); loaded weights are kept."""
        std = self.config.initializer_range
        init.ones_(self.input_layernorm.weight)
        init.zeros_(self.input_layernorm.bias)
        init.normal_(self.queries, mean=0.0, std=std)
        init.normal_(self.kv_proj.weight, mean=0.0, std=std)
        init.normal_(self.output_proj.weight, mean=0.0, std=std)
        init.zeros_(self.output_proj.bias)
        if isinstance(self.fusion, ChannelMLPFusion):
            self.fusion.reset_parameters()
        else:
            for layer in self.fusion.modules():
                if isinstance(layer, nn.Linear):
                    init.normal_(layer.weight, mean=0.0, std=std)
                    init.zeros_(layer.bias)
        if self.native_grid is not None:
            init.copy_(self.learned_scope_bias, self.eq5_scope_bias(*self.native_grid))
        self._bias_cache.clear()

    @property
    def scope_bias_strength(self) -> float:
        """beta, read from the config at every call so that changing it takes effect at once."""
        return float(self.config.scope_bias_strength)

    def eq5_scope_bias(self, grid_height: int, grid_width: int) -> torch.Tensor:
        """B of Eq. 5 (not learned), shape `(E, M, grid_height * grid_width)`, values 0 / -1."""
        return build_scope_bias(self.scope_windows, self.query_rows, self.query_cols, grid_height, grid_width)

    def scope_bias(self, grid_height: int, grid_width: int) -> torch.Tensor:
        """B before beta, shape `(E, M, grid_height * grid_width)`: values 0 / -1, or the learned values when
        `learnable_scope_bias` is set."""
        if self.native_grid is not None:
            if (grid_height, grid_width) != tuple(self.native_grid):
                raise ValueError(
                    f"learnable_scope_bias was built for the {self.native_grid[0]}x{self.native_grid[1]} grid of the "
                    f"vision tower, got a {grid_height}x{grid_width} grid; resize images to the native resolution"
                )
            return self.learned_scope_bias
        self._check_windows(grid_height, grid_width)
        return self.eq5_scope_bias(grid_height, grid_width)

    def _check_windows(self, grid_height: int, grid_width: int):
        """Refuses a window that holds no token. Only k = 1 can: floor(1/2) = 0 keeps the anchor's own position,
        and the anchor of an even-sized cell sits between tokens. Plain Python, so torch.compile traces no branch."""
        if 1 not in self.scope_windows:
            return
        for query in range(self.num_queries):
            anchor = (
                _band_centre(query // self.query_cols, self.query_rows, grid_height),
                _band_centre(query % self.query_cols, self.query_cols, grid_width),
            )
            if anchor[0] % 1 or anchor[1] % 1:
                raise ValueError(
                    f"scope window k=1 holds no visual token for query {query} (anchor {anchor}) on the "
                    f"{grid_height}x{grid_width} grid: Eq. 4 keeps tokens within floor(k/2) of the anchor, and anchors "
                    "of even-sized cells fall between tokens; use a larger k"
                )

    def _attention_bias(self, grid_height, grid_width, num_prefix_tokens, device, dtype) -> torch.Tensor | None:
        """beta * B as an additive mask `(1, E, M, prefix + H*W)`, broadcast over batch and heads; prefix tokens (CLS)
        get 0. B is built once per grid and cached (unscaled, so a new beta takes effect); None when beta = 0."""
        beta = self.scope_bias_strength
        if beta == 0:
            return None
        if self.native_grid is not None:  # learned: rebuilt every call so gradients reach it
            bias = self.scope_bias(grid_height, grid_width).to(device=device, dtype=torch.float32)
            return (nn.functional.pad(bias, (num_prefix_tokens, 0)) * beta)[None].to(dtype)
        key = (grid_height, grid_width, num_prefix_tokens, device, dtype)
        if key not in self._bias_cache:
            bias = self.scope_bias(grid_height, grid_width).to(device=device, dtype=dtype)  # (E, M, N), exact 0 / -1
            self._bias_cache[key] = nn.functional.pad(bias, (num_prefix_tokens, 0))[None]
        return self._bias_cache[key] * beta

    def forward(
        self,
        image_features: torch.Tensor,
        grid_size: tuple[int, int] | None = None,
        num_prefix_tokens: int = 0,
        output_attentions: bool = False,
    ):
        """
        Args:
            image_features (`torch.Tensor` of shape `(batch, N, vision_hidden)`):
                The vision tower's tokens: `num_prefix_tokens` tokens without a grid position (e.g. CLS), then the
                H x W patch tokens in row-major order.
            grid_size (`tuple[int, int]`, *optional*):
                `(H, W)`. Inferred as a square grid when not given.
            num_prefix_tokens (`int`, defaults to 0):
                Leading tokens outside the grid; they get a zero scope bias in every branch.
            output_attentions (`bool`, defaults to `False`):
                Also return the attention probabilities `(batch, E, heads, M, N)` (computed by the eager path).

        Returns:
            `torch.Tensor` of shape `(batch, M, text_hidden)`, or a tuple with the attention probabilities.
        """
        if image_features.dim() != 3 or image_features.shape[-1] != self.vision_hidden_size:
            raise ValueError(
                f"MSResampler expects image_features of shape (batch, N, {self.vision_hidden_size}), "
                f"got {tuple(image_features.shape)}"
            )
        batch_size, num_tokens, _ = image_features.shape
        grid_tokens = num_tokens - num_prefix_tokens
        if grid_size is None:
            side = int(round(grid_tokens**0.5))
            if side * side != grid_tokens:
                raise ValueError(
                    f"cannot infer the grid of {grid_tokens} visual tokens (not a square); pass grid_size=(H, W)"
                )
            grid_size = (side, side)
        grid_height, grid_width = grid_size
        if grid_height * grid_width != grid_tokens:
            raise ValueError(
                f"grid_size {grid_height}x{grid_width} holds {grid_height * grid_width} tokens, but image_features has "
                f"{grid_tokens} (after {num_prefix_tokens} prefix tokens)"
            )

        # The attention runs with the heads folded into the batch and the E branches as the heads, so that one
        # (1, E, M, N) bias broadcasts over both without a per-head copy.
        num_branches, num_heads, head_dim = self.num_branches, self.num_heads, self.head_dim
        normed = self.input_layernorm(image_features)
        kv = self.kv_proj(normed).view(batch_size, num_tokens, 2, num_branches, num_heads, head_dim)
        kv = kv.permute(2, 0, 4, 3, 1, 5)  # (k|v, batch, head, branch, tokens, dim)
        key, value = kv.reshape(2, batch_size * num_heads, num_branches, num_tokens, head_dim).unbind(0)
        query = self.queries.view(num_branches, self.num_queries, num_heads, head_dim).permute(2, 0, 1, 3)
        query = query.to(key.dtype).expand(batch_size, -1, -1, -1, -1)  # (batch, head, branch, M, dim)
        query = query.reshape(batch_size * num_heads, num_branches, self.num_queries, head_dim)
        if not torch.is_grad_enabled():
            query = query.detach()  # at batch 1 it is a view of the parameter, which flex refuses on CPU
        bias = self._attention_bias(grid_height, grid_width, num_prefix_tokens, key.device, key.dtype)

        implementation = self.config._attn_implementation
        if output_attentions or implementation == "eager":
            attention = eager_resampler_attention
        elif implementation == "flex_attention":
            attention = ALL_ATTENTION_FUNCTIONS["flex_attention"]
        else:
            # SDPA under every other implementation: FlashAttention kernels take no additive bias (the rest of the
            # model keeps FA), and a function registered in AttentionInterface by a serving engine (vLLM's "vllm")
            # attends through the engine's KV cache by `module.layer_idx`, which a resampler has not: a string given
            # to `set_attn_implementation` reaches every sub-config, this one included.
            attention = ALL_ATTENTION_FUNCTIONS["sdpa"]
        if implementation == "flex_attention" and attention is not eager_resampler_attention:
            # flex reads the bias per (batch, head) in its score_mod: expand (a view, no copy)
            position_bias = None if bias is None else bias.expand(batch_size * num_heads, -1, -1, -1)
            attn_output, probs = attention(
                self, query, key, value, None, scaling=self.scaling, position_bias=position_bias
            )
        else:
            attn_output, probs = attention(self, query, key, value, bias, scaling=self.scaling, is_causal=False)
        # attn_output: (batch * head, M, branch, dim) -> (batch, M, branch, head * dim)
        attn_output = attn_output.view(batch_size, num_heads, self.num_queries, num_branches, head_dim)
        branch_outputs = attn_output.permute(0, 2, 3, 1, 4).reshape(
            batch_size, self.num_queries, num_branches, self.hidden_size
        )
        fused = self.fusion(branch_outputs)  # (batch, M, D)
        projected = self.output_proj(fused)  # (batch, M, text_hidden)
        if output_attentions:
            probs = probs.view(batch_size, num_heads, num_branches, self.num_queries, num_tokens).transpose(1, 2)
            return projected, probs
        return projected


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


# The remote-code entries of config.json's auto_map for the model classes (configuration_ms_llava adds AutoConfig).
MODEL_AUTO_MAP = {
    "AutoModel": "modeling_ms_llava.MSLlavaModel",
    "AutoModelForImageTextToText": "modeling_ms_llava.MSLlavaForConditionalGeneration",
}


class MSLlavaPreTrainedModel(LlavaPreTrainedModel):
    config: MSLlavaConfig
    _no_split_modules = ["MSResampler"]
    # Quantized loading (bitsandbytes 4/8-bit, torchao, ...): every transformers quantizer leaves the modules named in
    # `_keep_in_fp32_modules` unconverted, added to whatever skip list the caller passes, so MS-Resampler stays in the
    # load dtype (BLIP-2 declares its Q-Former the same way). As in transformers' LLaVA, which declares nothing, the
    # vision tower is quantized and lm_head is not (transformers' default skip, unless the caller passes a list).
    # Names are matched from the root: `model.` under MSLlavaForConditionalGeneration, none under MSLlavaModel.
    _keep_in_fp32_modules = ["model.multi_modal_projector", "multi_modal_projector"]

    def _get_dtype_plan(self, dtype):
        # The same list would also keep these modules in float32 when loading in float16; MS-Resampler keeps the
        # requested dtype (as before it was declared), so only the quantizers read it.
        projector = set(MSLlavaPreTrainedModel._keep_in_fp32_modules)
        return {key: value for key, value in super()._get_dtype_plan(dtype).items() if key not in projector}

    @classmethod
    def is_custom_code(cls) -> bool:
        # For custom code, transformers' `initialize_weights` marks every module without parameters of its own as
        # initialised without calling `_init_weights` (guarding custom inits that bypass `transformers.initialization`),
        # and passes that down into the sub-models: on `from_pretrained`, CLIP's attention and MLP blocks, whose init
        # draws their projections' std from the width and depth, were skipped and missing weights kept N(0, 0.02).
        # Every init of this model goes through `transformers.initialization`, which leaves loaded tensors alone, so
        # it takes the library's own path and initialises missing weights as the constructor does.
        return False

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Name both model classes in auto_map (transformers writes only the saved one), so that AutoModel and
        # AutoModelForImageTextToText both load the checkpoint through remote code.
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **MODEL_AUTO_MAP}
        # FSDP2's `fully_shard` gives the model a class made in torch (`FSDPMSLlavaForConditionalGeneration`):
        # transformers would name it in auto_map and copy torch's FSDP files as the remote code. Save as our class.
        wrapped_class = type(self)
        self.__class__ = next(cls for cls in wrapped_class.__mro__ if not cls.__module__.startswith("torch."))
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.__class__ = wrapped_class


class MSLlavaModel(MSLlavaPreTrainedModel, LlavaModel):
    """LLaVA's base model (vision tower, projector, language model) with MS-Resampler as `multi_modal_projector`."""

    def __init__(self, config: MSLlavaConfig):
        LlavaPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = MSResampler(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    @merge_with_config_defaults
    @can_return_tuple
    @select_hidden_states("vision_feature_layer")
    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPooling:
        """Runs the vision tower and MS-Resampler on `pixel_values` `(num_images, channels, height, width)`, or
        MS-Resampler alone on `vision_features` (what `get_vision_features` returns for those pixels; the shape
        `check_vision_features` accepts).

        `pooler_output` holds the projected tokens, one `(M, text_hidden)` tensor per image.
        """
        if image_sizes is not None:
            raise ValueError("MS-LLaVA takes fixed-size square crops; image_sizes is not supported")
        if (pixel_values is None) == (vision_features is None):
            raise ValueError(
                "get_image_features takes either pixel_values or vision_features (the vision tower's selected hidden "
                f"states for those pixels); got {'both' if vision_features is not None else 'neither'}"
            )
        if vision_features is not None:
            grid_size = self.check_vision_features(vision_features)
            image_outputs = BaseModelOutputWithPooling()
        else:
            image_outputs = self.vision_tower(pixel_values, return_dict=True, **kwargs)
            vision_features, grid_size = self._select_vision_features(
                image_outputs, pixel_values, vision_feature_layer, vision_feature_select_strategy
            )
        image_features = self.multi_modal_projector(
            vision_features,
            grid_size=grid_size,
            num_prefix_tokens=vision_features.shape[1] - grid_size[0] * grid_size[1],
        )
        image_outputs.pooler_output = list(image_features)
        return image_outputs

    @merge_with_config_defaults
    @select_hidden_states("vision_feature_layer")
    def get_vision_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """The vision tower's hidden states that MS-Resampler reads, `(num_images, prefix + H*W, vision_hidden *
        layers)`: the `vision_feature_layer` layers concatenated on channels, CLS dropped under "default". Passed as
        `vision_features` (to `forward`, `generate` or `get_image_features`) they stand for `pixel_values`."""
        image_outputs = self.vision_tower(pixel_values, return_dict=True, **kwargs)
        return self._select_vision_features(
            image_outputs, pixel_values, vision_feature_layer, vision_feature_select_strategy
        )[0]

    def _select_vision_features(self, image_outputs, pixel_values, vision_feature_layer, strategy):
        patch_size = self.config.vision_config.patch_size
        patch_h, patch_w = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
        grid_size = (pixel_values.shape[-2] // patch_h, pixel_values.shape[-1] // patch_w)
        layers = [vision_feature_layer] if isinstance(vision_feature_layer, int) else vision_feature_layer
        # Tokens before the H x W patches: CLS for CLIP, none for SigLIP. "default" drops CLS as LLaVA does.
        num_tower_prefix = image_outputs.hidden_states[layers[0]].shape[1] - grid_size[0] * grid_size[1]
        if strategy == "default" and num_tower_prefix < 1:
            raise ValueError(
                f"vision_feature_select_strategy='default' drops the CLS token, but this vision tower returns "
                f"{grid_size[0]}x{grid_size[1]} patch tokens and no CLS token; use 'full'"
            )
        dropped = 1 if strategy == "default" else 0
        hidden_states = [image_outputs.hidden_states[layer][:, dropped:] for layer in layers]
        return torch.cat(hidden_states, dim=-1), grid_size  # (num_images, prefix + H*W, vision_hidden * layers)

    def check_vision_features(self, vision_features: torch.Tensor) -> tuple[int, int]:
        """The patch grid `(H, W)` of `vision_features`; ValueError naming the shapes unless it is `(num_images,
        H*W or 1 + H*W, vision_hidden * layers)` for the tower's native H x W grid (`config.vision_grid_size`),
        after at most one prefix token (the CLS that vision_feature_select_strategy='full' keeps)."""
        layer = self.config.vision_feature_layer
        width = self.config.vision_config.hidden_size * (1 if isinstance(layer, int) else len(layer))
        grid_h, grid_w = self.config.vision_grid_size
        shape = tuple(vision_features.shape)
        if len(shape) != 3 or shape[1] - grid_h * grid_w not in (0, 1) or shape[2] != width:
            raise ValueError(
                f"vision_features must have shape (num_images, {grid_h * grid_w} or {grid_h * grid_w + 1}, {width}): "
                f"the vision tower's {grid_h}x{grid_w} patch tokens after at most one prefix token, with the hidden "
                f"states of vision_feature_layer={layer} concatenated (get_vision_features); got {shape}"
            )
        return grid_h, grid_w

    def forward(
        self, input_ids=None, pixel_values=None, *args, vision_features=None, mm_encoder_outputs=None, **kwargs
    ):
        """As LLaVA's; `vision_features` (`get_vision_features`) stand for `pixel_values`."""
        mm_encoder_outputs = _encode_vision_features(self, vision_features, pixel_values, mm_encoder_outputs)
        return super().forward(input_ids, pixel_values, *args, mm_encoder_outputs=mm_encoder_outputs, **kwargs)

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features):
        """As LLaVA's, and also checks every image's run of placeholder tokens: each must hold exactly M tokens."""
        num_queries = self.config.resampler_config.num_queries
        if input_ids is not None and not is_torchdynamo_compiling():
            num_images = image_features.shape[0] // num_queries
            is_image = (input_ids == self.config.image_token_id).to(torch.int8)
            total = int(is_image.sum())
            if total != num_images * num_queries:
                raise ValueError(
                    f"Image features and image tokens do not match: the prompts hold {total} image tokens, but "
                    f"{num_images} images need {num_images * num_queries} (M = {num_queries} per image)"
                )
            edges = torch.diff(nn.functional.pad(is_image, (1, 1)), dim=-1)  # +1 where a run starts, -1 after it ends
            starts, ends = (edges == 1).nonzero(), (edges == -1).nonzero()
            for (row, start), (_, end) in zip(starts.tolist(), ends.tolist(), strict=True):
                if (end - start) % num_queries != 0:
                    raise ValueError(
                        f"Image tokens do not match M: prompt {row} has a run of {end - start} image tokens at "
                        f"position {start}; every image needs exactly M = {num_queries}"
                    )
        return super().get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=image_features)


class MSLlavaForConditionalGeneration(MSLlavaPreTrainedModel, LlavaForConditionalGeneration):
    """MS-LLaVA with a language modeling head: use it as `LlavaForConditionalGeneration`."""

    def __init__(self, config: MSLlavaConfig):
        LlavaPreTrainedModel.__init__(self, config)
        self.model = MSLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        vision_features: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPooling:
        """`MSLlavaModel.get_image_features`: `pixel_values` or `vision_features`."""
        return self.model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            vision_features=vision_features,
            **kwargs,
        )

    def forward(
        self, input_ids=None, pixel_values=None, *args, vision_features=None, mm_encoder_outputs=None, **kwargs
    ):
        """As LLaVA's; `vision_features` (`MSLlavaModel.get_vision_features`) stand for `pixel_values`. `labels` at
        image placeholder positions (`input_ids == image_token_id`) count as -100 (the caller's tensor is unchanged)."""
        mm_encoder_outputs = _encode_vision_features(self, vision_features, pixel_values, mm_encoder_outputs)
        if kwargs.get("labels") is not None and input_ids is not None:
            # LLaVA's loss takes labels as given: labels copied from input_ids (a plain causal-LM collator, llava-hf's
            # fine-tuning examples) would train the model to predict the M placeholders the projector's outputs fill.
            is_image = input_ids == self.config.image_token_id
            kwargs["labels"] = kwargs["labels"].masked_fill(is_image.to(kwargs["labels"].device), -100)
        if self.training and not args and kwargs.get("use_cache") is None:
            # Training reads no KV cache. The LLM would fill one anyway, and a decoder layer recomputed by FSDP's
            # activation checkpointing (torch's checkpoint_wrapper) would append its keys to it a second time.
            kwargs["use_cache"] = False
        return super().forward(input_ids, pixel_values, *args, mm_encoder_outputs=mm_encoder_outputs, **kwargs)

    def generate(self, *args, vision_features=None, **kwargs):
        """As LLaVA's; `vision_features` stand for `pixel_values` (encoded here: `generate` would drop them)."""
        if vision_features is not None:
            with torch.no_grad():
                kwargs["mm_encoder_outputs"] = _encode_vision_features(
                    self, vision_features, kwargs.get("pixel_values"), kwargs.get("mm_encoder_outputs")
                )
        return super().generate(*args, **kwargs)


def _encode_vision_features(model, vision_features, pixel_values, mm_encoder_outputs):
    """`mm_encoder_outputs` (transformers' input for images encoded beforehand) with `vision_features` projected."""
    if vision_features is None:
        return mm_encoder_outputs
    if pixel_values is not None:
        raise ValueError(
            "got both pixel_values and vision_features; pass one (vision_features are the vision tower's selected "
            "hidden states for the pixels)"
        )
    if (mm_encoder_outputs or {}).get("image") is not None:
        raise ValueError("got both vision_features and mm_encoder_outputs['image']; pass one")
    image = model.get_image_features(vision_features=vision_features, return_dict=True)
    return {**(mm_encoder_outputs or {}), "image": image}


__all__ = [
    "MSLlavaForConditionalGeneration",
    "MSLlavaModel",
    "MSLlavaPreTrainedModel",
    "MSResampler",
    "build_scope_bias",
    "query_anchors",
]
