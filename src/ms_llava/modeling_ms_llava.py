"""MS-LLaVA: transformers' LLaVA (its classes subclassed, its submodule names, forward, generation and loss kept) with
the MLP projector replaced by MS-Resampler (Sec. 3 of the paper). Imports from the package only relatively, so that it
ships with every checkpoint as remote code."""

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llava.modeling_llava import LlavaForConditionalGeneration, LlavaModel, LlavaPreTrainedModel
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults

from .configuration_ms_llava import MSLlavaConfig, MSResamplerConfig


def query_anchors(rows: int, cols: int, grid_height: int, grid_width: int) -> torch.Tensor:
    """Anchor (y, x) of each query in token-index coordinates, row-major, shape `(rows * cols, 2)`.

    The H grid rows are split into `rows` contiguous bands, band i covering rows floor(i*H/rows) ..
    floor((i+1)*H/rows) - 1 (likewise the columns); an anchor is the centre of its cell (2i + 0.5 for 2 x 2 cells).
    """
    if rows > grid_height or cols > grid_width:
        raise ValueError(
            f"the query grid {rows}x{cols} is finer than the visual token grid {grid_height}x{grid_width}: "
            "every query needs at least one token in its cell; use fewer queries or a larger image"
        )

    def centres(bands: int, size: int) -> torch.Tensor:
        index = torch.arange(bands)
        return ((index * size) // bands + ((index + 1) * size) // bands - 1) / 2  # (bands,)

    grid = torch.meshgrid(centres(rows, grid_height), centres(cols, grid_width), indexing="ij")
    return torch.stack(grid, dim=-1).view(rows * cols, 2)


def build_scope_bias(windows: list[int], rows: int, cols: int, grid_height: int, grid_width: int) -> torch.Tensor:
    """B of Eq. 5 for every branch, shape `(E, rows * cols, H * W)`: 0 where token l lies in the k x k window of Eq. 4
    around query i's anchor (|y_l - y_i| <= floor(k/2) and |x_l - x_i| <= floor(k/2)), -1 elsewhere."""
    anchors = query_anchors(rows, cols, grid_height, grid_width)  # (M, 2)
    tokens = torch.stack(torch.meshgrid(torch.arange(grid_height), torch.arange(grid_width), indexing="ij"), -1)
    distance = (anchors[:, None] - tokens.view(1, -1, 2)).abs()  # (M, N, 2)
    half_windows = torch.tensor([k // 2 for k in windows]).view(-1, 1, 1, 1)  # (E, 1, 1, 1)
    inside = (distance[None] <= half_windows).all(dim=-1)  # (E, M, N)
    return torch.where(inside, 0.0, -1.0)


class ChannelMLPFusion(nn.Module):
    """Eq. 7-8: per token i and channel j, a two-layer MLP over the expert vector z_ij in R^E, shared by all (i, j),
    with the paper's parameters W1 `(h, E)`, b1 `(h)`, w2 `(h)`, b2 `(1)`."""

    def __init__(self, num_branches: int, hidden_size: int, act: str):
        super().__init__()
        self.num_branches, self.hidden_size = num_branches, hidden_size
        self.weight1 = nn.Parameter(torch.empty(hidden_size, num_branches))
        self.bias1 = nn.Parameter(torch.empty(hidden_size))
        self.weight2 = nn.Parameter(torch.empty(hidden_size))
        self.bias2 = nn.Parameter(torch.empty(1))
        self.act = ACT2FN[act]

    def reset_parameters(self):
        # Variance-preserving: the library's N(0, 0.02) on both layers would shrink the fused tokens ~1000-fold. The
        # sizes come from the constructor: DeepSpeed ZeRO-3 has partitioned the parameters (shape (0,)) by now.
        init.normal_(self.weight1, mean=0.0, std=self.num_branches**-0.5)
        init.zeros_(self.bias1)
        init.normal_(self.weight2, mean=0.0, std=(2.0 / self.hidden_size) ** 0.5)
        init.zeros_(self.bias2)

    def forward(self, branch_outputs: torch.Tensor) -> torch.Tensor:
        batch_size, num_branches, num_queries, width = branch_outputs.shape  # (batch, E, M, D)
        experts = branch_outputs.view(batch_size, num_branches, num_queries * width)  # z_ij along dim 1
        # one batched product per layer with its bias added in the GEMM, each result row-major: no copy, no add pass
        hidden = self.act(torch.baddbmm(self.bias1[:, None], self.weight1.expand(batch_size, -1, -1), experts))
        fused = torch.baddbmm(self.bias2, self.weight2.expand(batch_size, 1, -1), hidden)  # (batch, 1, M*D)
        return fused.view(batch_size, num_queries, width)


class MeanFusion(nn.Module):
    """Table 6 "Average": the mean over the E branches."""

    def forward(self, branch_outputs: torch.Tensor) -> torch.Tensor:
        return branch_outputs.mean(dim=1)


class ScopeWeightedFusion(nn.Module):
    """Table 6 "Attention": per token, a softmax over the E branches of a linear score of each branch's output (the
    paper gives no more detail; this is our reading)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = nn.Linear(hidden_size, 1)

    def forward(self, branch_outputs: torch.Tensor) -> torch.Tensor:
        weights = self.score(branch_outputs).softmax(dim=1)  # (batch, E, M, 1)
        return (weights * branch_outputs).sum(dim=1)


class ConcatMLPFusion(nn.Module):
    """Table 6 "MLP": the E outputs concatenated to E*D channels, then Linear -> act -> Linear to D."""

    def __init__(self, num_branches: int, hidden_size: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(num_branches * hidden_size, hidden_size)
        self.act = ACT2FN[act]
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, branch_outputs: torch.Tensor) -> torch.Tensor:
        concatenated = branch_outputs.transpose(1, 2).flatten(2)  # (batch, M, E*D)
        return self.fc2(self.act(self.fc1(concatenated)))


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention with logits and softmax in float32 whatever the dtype, also under autocast. query `(batch, heads, M,
    head_dim)`, key/value `(batch, heads, N, head_dim)`; returns `(batch, M, heads, head_dim)` and the probabilities."""
    with torch.autocast(query.device.type, enabled=False):
        logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling  # (batch, heads, M, N)
        if attention_mask is not None:
            logits = logits + attention_mask.float()
        probs = logits.softmax(dim=-1)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs.to(value.dtype), value).transpose(1, 2).contiguous(), probs


class MSResampler(PreTrainedModel):
    """MS-Resampler: `(batch, N, vision_hidden)` visual tokens -> `(batch, M, text_hidden)`. E branches, each with its
    own M queries Q^(e) and projections W_K^(e), W_V^(e), attend to the tokens under the additive prior beta * B^(e)
    (Eq. 3), in one attention call with the branches folded into the batch; their outputs are fused per token (Eq.
    7-8). Where the paper is silent: a LayerNorm on the visual tokens first, attention width D over
    `num_attention_heads` heads, one linear map from D to the language model's width after the fusion. A sub-model
    with its own config, as Idefics2's perceiver, so that transformers sets its attention implementation."""

    config: MSResamplerConfig
    input_modalities = ("image",)
    _supports_sdpa = True
    _supports_flash_attn = True  # runs SDPA then, see `forward`
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: MSLlavaConfig):
        super().__init__(config.resampler_config)
        resampler = config.resampler_config
        self.num_branches, self.num_queries = resampler.num_branches, resampler.num_queries
        self.hidden_size, self.num_heads = resampler.hidden_size, resampler.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.scaling = self.head_dim**-0.5
        layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        self.vision_hidden_size = config.vision_config.hidden_size * layers

        self.input_layernorm = nn.LayerNorm(self.vision_hidden_size, eps=resampler.layer_norm_eps)
        self.queries = nn.Parameter(torch.empty(self.num_branches, self.num_queries, self.hidden_size))
        self.kv_proj = nn.Linear(self.vision_hidden_size, 2 * self.num_branches * self.hidden_size, bias=False)
        if resampler.fusion == "channel_mlp":
            self.fusion = ChannelMLPFusion(self.num_branches, resampler.fusion_hidden_size, resampler.fusion_act)
        elif resampler.fusion == "mean":
            self.fusion = MeanFusion()
        elif resampler.fusion == "attention":
            self.fusion = ScopeWeightedFusion(self.hidden_size)
        else:
            self.fusion = ConcatMLPFusion(self.num_branches, self.hidden_size, resampler.fusion_act)
        self.output_proj = nn.Linear(self.hidden_size, config.text_config.hidden_size)
        self.native_grid = config.vision_grid_size if resampler.learnable_scope_bias else None
        if self.native_grid is not None:
            grid_tokens = self.native_grid[0] * self.native_grid[1]
            self.learned_scope_bias = nn.Parameter(torch.empty(self.num_branches, self.num_queries, grid_tokens))
        self._bias_cache = {}  # beta * B padded for the prefix tokens, per (grid, prefix tokens, beta, device, dtype)
        # no post_init: the enclosing model's initialises it (`_init_weights`); built alone, call reset_parameters()

    def _init_weights(self, module):
        if module is self:
            init.normal_(self.queries, mean=0.0, std=self.config.initializer_range)
            if self.native_grid is not None:
                init.copy_(self.learned_scope_bias, self.scope_bias(*self.native_grid, learned=False))
        elif isinstance(module, ChannelMLPFusion):
            module.reset_parameters()
        else:
            super()._init_weights(module)

    def reset_parameters(self):
        """Initialises every parameter as `from_pretrained` does the missing ones."""
        for module in self.modules():
            self._init_weights(module)

    def scope_bias(self, grid_height: int, grid_width: int, learned: bool = True) -> torch.Tensor:
        """B before beta, `(E, M, H*W)`: Eq. 5's 0 / -1, or the learned values under `learnable_scope_bias`."""
        if learned and self.native_grid is not None:
            if (grid_height, grid_width) != tuple(self.native_grid):
                raise ValueError(
                    f"learnable_scope_bias was built for the {self.native_grid[0]}x{self.native_grid[1]} grid of the "
                    f"vision tower, got a {grid_height}x{grid_width} grid; resize images to the native resolution"
                )
            return self.learned_scope_bias
        rows, cols = self.config.query_grid_shape
        bias = build_scope_bias(self.config.scope_windows, rows, cols, grid_height, grid_width)
        empty = (bias == -1).all(dim=-1).nonzero()  # only k = 1 can be: anchors of even-sized cells sit between tokens
        if len(empty):
            branch, query = empty[0].tolist()
            raise ValueError(
                f"scope window k={self.config.scope_windows[branch]} holds no visual token for query {query} (anchor "
                f"{tuple(query_anchors(rows, cols, grid_height, grid_width)[query].tolist())}) on the "
                f"{grid_height}x{grid_width} grid: Eq. 4 keeps tokens within floor(k/2) of the anchor; use a larger k"
            )
        return bias

    def forward(
        self,
        image_features: torch.Tensor,
        grid_size: tuple[int, int] | None = None,
        num_prefix_tokens: int = 0,
        output_attentions: bool = False,
    ):
        """`image_features` `(batch, N, vision_hidden)`: `num_prefix_tokens` tokens without a grid position (CLS; scope
        bias 0 in every branch), then the `grid_size` (H, W; square if not given) patch tokens, row-major. Returns
        `(batch, M, text_hidden)`, and with `output_attentions` the probabilities `(batch, E, heads, M, N)` (eager)."""
        if image_features.dim() != 3 or image_features.shape[-1] != self.vision_hidden_size:
            raise ValueError(
                f"MSResampler expects image_features of shape (batch, N, {self.vision_hidden_size}), "
                f"got {tuple(image_features.shape)}"
            )
        batch_size, num_tokens, _ = image_features.shape
        grid_tokens = num_tokens - num_prefix_tokens
        if grid_size is None:
            side = round(grid_tokens**0.5)
            if side * side != grid_tokens:
                raise ValueError(
                    f"cannot infer the grid of {grid_tokens} visual tokens (not a square); pass grid_size"
                )
            grid_size = (side, side)
        if grid_size[0] * grid_size[1] != grid_tokens:
            raise ValueError(
                f"grid_size {grid_size[0]}x{grid_size[1]} holds {grid_size[0] * grid_size[1]} tokens, but "
                f"image_features has {grid_tokens} (after {num_prefix_tokens} prefix tokens)"
            )
        batch_branches, heads, head_dim = batch_size * self.num_branches, self.num_heads, self.head_dim

        hidden = self.input_layernorm(image_features.to(self.queries.dtype))
        kv = self.kv_proj(hidden).view(batch_size, num_tokens, 2, self.num_branches, heads, head_dim)
        # (2, batch * E, heads, N, head_dim): at batch 1 views of the product, which SDPA's CPU kernel reads strided
        key, value = kv.permute(2, 0, 3, 4, 1, 5).reshape(2, batch_branches, heads, num_tokens, head_dim)
        query = self.queries.view(1, self.num_branches, self.num_queries, heads, head_dim).transpose(2, 3)
        query = query.expand(batch_size, -1, -1, -1, -1).reshape(batch_branches, heads, self.num_queries, head_dim)
        if not torch.is_grad_enabled():  # at batch 1 a view of the parameter, which flex refuses on CPU
            query = query.detach()

        bias = None  # beta * B as an additive mask (batch * E, 1, M, N), broadcast over heads
        beta = float(self.config.scope_bias_strength)
        if beta != 0:
            # beta * B with zeros for the prefix tokens, cached as such: no pass over it per call
            bias = self._bias_cache.get(cache_key := (grid_size, num_prefix_tokens, beta, key.device, key.dtype))
            if bias is None:
                bias = beta * nn.functional.pad(self.scope_bias(*grid_size), (num_prefix_tokens, 0)).to(key)
                if self.native_grid is None:  # learned: rebuilt every call so that gradients reach it
                    self._bias_cache[cache_key] = bias
            bias = bias[None, :, None].expand(batch_size, -1, -1, -1, -1)  # a view at batch 1, a copy above
            bias = bias.reshape(batch_branches, 1, self.num_queries, num_tokens)  # broadcast over heads by the kernel

        implementation = "eager" if output_attentions else self.config._attn_implementation
        if implementation not in ("eager", "sdpa", "flex_attention"):  # FlashAttention takes no additive bias, and
            implementation = "sdpa"  # an engine's function (vLLM's) attends through its KV cache: the LM keeps those
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        extra = {}
        if implementation == "flex_attention" and bias is not None:
            # flex reads a 4D attention_mask through a score_mod that crashes on CPU (torch 2.13): a per-head bias works
            extra, bias = {"position_bias": bias.expand(-1, heads, -1, -1)}, None
        output, probs = attention(self, query, key, value, bias, scaling=self.scaling, is_causal=False, **extra)
        # output: (batch * E, M, heads, head_dim) -> (batch, E, M, D)
        branch_outputs = output.reshape(batch_size, self.num_branches, self.num_queries, self.hidden_size)
        projected = self.output_proj(self.fusion(branch_outputs))  # (batch, M, text_hidden)
        if output_attentions:
            return projected, probs.view(batch_size, self.num_branches, heads, self.num_queries, num_tokens)
        return projected


class MSLlavaPreTrainedModel(LlavaPreTrainedModel):
    config: MSLlavaConfig
    _no_split_modules = ["MSResampler"]
    # As BLIP-2's Q-Former: transformers' quantizers (bitsandbytes, torchao, ...) leave these modules unquantized, and a
    # float16 load keeps them in float32. The vision tower is quantized and lm_head is not, as in transformers' LLaVA.
    _keep_in_fp32_modules = ["model.multi_modal_projector", "multi_modal_projector"]  # matched from the root

    @classmethod
    def is_custom_code(cls) -> bool:
        # transformers' `_initialize_weights` skips, for custom code, every module whose own parameters look
        # initialised, and so left CLIP's attention blocks of a checkpoint that lacks them at N(0, 0.02) instead of
        # CLIP's init (tests/models/test_modeling.py::test_missing_weights_get_the_constructors_init_on_load). Every
        # init here goes through `transformers.initialization`, which keeps loaded tensors, so take the library's path.
        return False

    def save_pretrained(self, save_directory, *args, **kwargs):
        # transformers writes auto_map for the saved class only; SGLang resolves remote code through `AutoModel`.
        self.config.auto_map = {
            **(getattr(self.config, "auto_map", None) or {}),
            "AutoModel": "modeling_ms_llava.MSLlavaModel",
            "AutoModelForImageTextToText": "modeling_ms_llava.MSLlavaForConditionalGeneration",
        }
        return super().save_pretrained(save_directory, *args, **kwargs)


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
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPooling:
        """The vision tower and MS-Resampler on `pixel_values` `(num_images, channels, height, width)`; `pooler_output`
        holds one `(M, text_hidden)` tensor per image."""
        if image_sizes is not None:
            raise ValueError("MS-LLaVA takes fixed-size square crops; image_sizes is not supported")
        image_outputs = self.vision_tower(pixel_values, return_dict=True, **{**kwargs, "output_hidden_states": True})
        layers = [vision_feature_layer] if isinstance(vision_feature_layer, int) else vision_feature_layer
        patch_size = self.config.vision_config.patch_size
        grid_size = (pixel_values.shape[-2] // patch_size, pixel_values.shape[-1] // patch_size)
        # tokens before the H x W patches: CLS for CLIP, none for SigLIP; "default" drops CLS as LLaVA does
        num_prefix_tokens = image_outputs.hidden_states[layers[0]].shape[1] - grid_size[0] * grid_size[1]
        if vision_feature_select_strategy == "default":
            if num_prefix_tokens < 1:
                raise ValueError(
                    f"vision_feature_select_strategy='default' drops the CLS token, but this vision tower returns "
                    f"{grid_size[0]}x{grid_size[1]} patch tokens and no CLS token; use 'full'"
                )
            num_prefix_tokens -= 1
        selected = [
            image_outputs.hidden_states[layer][:, -grid_size[0] * grid_size[1] - num_prefix_tokens :]
            for layer in layers
        ]
        features = self.multi_modal_projector(torch.cat(selected, dim=-1), grid_size, num_prefix_tokens)
        image_outputs.pooler_output = list(features)  # (M, text_hidden) per image
        return image_outputs

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features):
        """As LLaVA's, and every image's run of placeholder tokens must hold exactly M."""
        num_queries = self.config.resampler_config.num_queries
        if input_ids is not None and not torch.compiler.is_compiling():
            is_image = (input_ids == self.config.image_token_id).to(torch.int8)
            num_images = image_features.shape[0] // num_queries
            if int(is_image.sum()) != num_images * num_queries:
                raise ValueError(
                    f"Image features and image tokens do not match: the prompts hold {int(is_image.sum())} image "
                    f"tokens, but {num_images} images need {num_images * num_queries} (M = {num_queries} per image)"
                )
            edges = torch.diff(nn.functional.pad(is_image, (1, 1)), dim=-1)  # +1 where a run starts, -1 after it
            for (row, start), (_, end) in zip(
                (edges == 1).nonzero().tolist(), (edges == -1).nonzero().tolist(), strict=True
            ):
                if (end - start) % num_queries:
                    raise ValueError(
                        f"Image tokens do not match M: prompt {row} has a run of {end - start} image tokens at "
                        f"position {start}; every image needs exactly M = {num_queries}"
                    )
        return super().get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=image_features)

    def forward(self, input_ids=None, pixel_values=None, *args, **kwargs):
        """As LLaVA's; a prompt (the first forward of a generation) must fit the language model's context, and image
        placeholders need `pixel_values`."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers >= 5.24 calls it `cache`
        if input_ids is not None and not torch.compiler.is_compiling() and not (cache and cache.get_seq_length()):
            context = getattr(self.config.text_config, "max_position_embeddings", None)
            if context is not None and input_ids.shape[1] > context:
                raise ValueError(
                    f"the prompt holds {input_ids.shape[1]} tokens, more than the language model's context "
                    f"(max_position_embeddings={context}); shorten the text"
                )
            if pixel_values is None and (input_ids == self.config.image_token_id).any():
                raise ValueError(
                    f"the prompt holds image tokens (id {self.config.image_token_id}) but no pixel_values were "
                    "given; pass the images, or remove the placeholders"
                )
        return super().forward(input_ids, pixel_values, *args, **kwargs)


class MSLlavaForConditionalGeneration(MSLlavaPreTrainedModel, LlavaForConditionalGeneration):
    """MS-LLaVA with a language modeling head: use it as `LlavaForConditionalGeneration`."""

    def __init__(self, config: MSLlavaConfig):
        LlavaPreTrainedModel.__init__(self, config)
        self.model = MSLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, pixel_values=None, *args, labels=None, use_cache=None, **kwargs):
        """As LLaVA's; `labels` at image placeholders count as -100 (a causal-LM collator's labels copied from
        `input_ids` would otherwise train the model to predict the placeholders)."""
        if labels is not None and input_ids is not None:
            labels = labels.masked_fill((input_ids == self.config.image_token_id).to(labels.device), -100)
        if self.training and use_cache is None:
            # Training reads no KV cache; a layer recomputed by FSDP's activation checkpointing would fill it twice.
            use_cache = False
        return super().forward(input_ids, pixel_values, *args, labels=labels, use_cache=use_cache, **kwargs)


__all__ = [
    "MSLlavaForConditionalGeneration",
    "MSLlavaModel",
    "MSLlavaPreTrainedModel",
    "MSResampler",
    "build_scope_bias",
    "query_anchors",
]
