"""MS-Resampler against the projectors the paper compares with (Table 1 and Table 7), per image, on the CPU.

The peers are reference implementations written for this benchmark from their papers' descriptions (none is a copy of
its authors' code; sizes follow the papers' LLaVA-1.5 settings), except the Idefics2 perceiver resampler, which is
transformers' own `Idefics2PerceiverResampler` inside transformers' `Idefics2Connector`:

* Pixel-shuffle + MLP (InternVL-1.5, the paper's [9]): space-to-depth by a factor r, then LayerNorm and a two-layer
  GELU MLP from r*r*C to the LLM width. M is set by r: r = 2, 3, 4 give (24/r)^2 = 144, 64, 36 tokens.
* C-Abstractor (Honeybee [7]): a learned positional embedding, `depth` = 3 RegNet bottleneck blocks (1x1 conv, 3x3
  depth-wise conv, squeeze-excitation 0.25, 1x1 conv; LayerNorm2d and SiLU), adaptive average pooling of the grid to
  sqrt(M) x sqrt(M), 3 more blocks, and a two-layer SiLU MLP readout to the LLM width (hidden width 1024). M is set by
  the adaptive pool.
* LDP-v2 (MobileVLM V2 [11]): a per-token two-layer GELU MLP (C -> D -> D) at full resolution, adaptive average pooling
  of the grid to sqrt(M) x sqrt(M), and a positional 3x3 depth-wise convolution with a skip connection (PEG). M is set
  by the adaptive pool.
* TokenPacker [19]: point queries from the last-layer grid bilinearly downsampled by s (so M = (24/s)^2: s = 2, 3, 4),
  region keys / values from multi-level features (4 CLIP layers concatenated, 4 * 1024 wide) through two-layer GELU
  MLPs, region-to-point attention in which each point query attends only to the s x s tokens of its own region
  (`nn.MultiheadAttention`, 8 heads), and a two-layer GELU MLP to the LLM width. Its multi-level input is part of
  its design: it reads 4 vision layers where the others read one.
* Idefics2 connector: transformers' `Idefics2Connector` (a SwiGLU modality projection C -> 11008 -> D, with the LLM's
  intermediate width as Idefics2 does, then the perceiver resampler: depth 3, 16 heads of 96, 4 key/value heads,
  SwiGLU MLP 4D, transformers' default SDPA attention) with M latents (Idefics2 itself uses 64).

Measured at LLaVA-1.5-7B sizes (CLIP ViT-L/14-336: N = 576 = 24 x 24 tokens of width C = 1024; Vicuna-7B: D = 4096),
batch 1, fp32, `torch.inference_mode()`, for M = 144, 64, 36:

* MACs: `torch.utils.flop_counter.FlopCounterMode` FLOPs / 2 (matmuls and convolutions, with projector_cost.py's
  formula for the CPU SDPA kernel), checked against an analytic count of the same ops (`hand_count`);
* parameters; peak activation memory as projector_cost.py measures it (peak of the CPU allocator's allocations minus
  frees during one forward, from `torch.profiler` memory events; weights and input excluded, output included);
* latency: median and min of interleaved rounds (every round runs every projector once, in turns); the ratio to
  MS-Resampler is the median over rounds of the ratio within each round (the two ran seconds apart, under the same
  load), which a shared machine disturbs far less than a ratio of medians;
* MS-Resampler's achieved GEMM throughput as a fraction of this machine's `torch.matmul` throughput at the same
  shapes: every matmul MS-Resampler runs (mm, addmm, bmm, baddbmm, and SDPA's two products) is recorded and replayed
  as plain `torch.matmul` calls right after it, in rounds of their own (`--gemm-rounds`); fraction = replay time /
  MS-Resampler time (median of the per-round ratios).

Run `nice python benchmarks/projector_peers.py` from the repository root; it rewrites its section of BENCHMARKS.md.
`--quick` runs reduced sizes with two rounds and writes nothing. On a small machine that other jobs load, `--threads 1`
gives steadier times (two threads oversubscribe the cores and one straggling thread stalls the other).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import math
import os
import platform
from pathlib import Path

import torch
import transformers
from torch import nn
from torch.nn import functional as F
from transformers import CLIPVisionConfig, Idefics2Config, LlamaConfig
from transformers.models.idefics2.configuration_idefics2 import Idefics2PerceiverConfig
from transformers.models.idefics2.modeling_idefics2 import Idefics2Connector

from markdown_section import write_section
from ms_llava.configuration_ms_llava import MSLlavaConfig
from ms_llava.modeling_ms_llava import MSResampler
from projector_cost import (
    MatmulReplay,
    count_macs,
    cpu_model,
    init_weights,
    paired_ratio,
    peak_activation_bytes,
    record_gemms,
    time_in_turns,
)

START, END = "<!-- projector_peers:start -->", "<!-- projector_peers:end -->"
PAPER_TABLE7 = {
    "C-Abstractor": 12.09,
    "TokenPacker": 10.73,
    "LDP-v2": 12.10,
    "MS-Resampler": 10.43,
}  # "Projector FLOPs"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The dimensions a run uses: LLaVA-1.5-7B by default, a reduced set for `--quick`."""

    grid: tuple[int, int] = (24, 24)  # the vision tower's patch grid (CLIP ViT-L/14-336)
    vision_width: int = 1024  # C
    text_width: int = 4096  # D (Vicuna-7B)
    text_intermediate: int = 11008  # the LLM's MLP width (Idefics2's modality projection uses it)
    abstractor_width: int = 1024  # C-Abstractor's hidden width
    levels: int = 4  # TokenPacker's vision layers
    resampler_width: int = 1024  # MS-Resampler's attention width
    resampler_heads: int = 16
    budgets: tuple[int, ...] = (144, 64, 36)  # M

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]


FULL = Sizes()
QUICK = Sizes(
    grid=(12, 12),
    vision_width=128,
    text_width=256,
    text_intermediate=512,
    abstractor_width=128,
    resampler_width=128,
    resampler_heads=4,
    budgets=(36, 16, 9),
)


def side_for(num_queries: int, grid: tuple[int, int]) -> int:
    """sqrt(M) for the projectors that pool the grid to a square, checked."""
    side = math.isqrt(num_queries)
    if side * side != num_queries or side > min(grid):
        raise ValueError(f"num_queries must be a square no larger than the grid {grid}, got {num_queries}")
    return side


def factor_for(num_queries: int, grid: tuple[int, int]) -> int:
    """The downsampling factor r with (rows / r) * (cols / r) == M, for pixel-shuffle and TokenPacker."""
    side = side_for(num_queries, grid)
    if grid[0] != grid[1] or grid[0] % side:
        raise ValueError(f"num_queries={num_queries} needs a square grid divisible by {side}, got {grid}")
    return grid[0] // side


def grid_of(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(batch, rows * cols, channels) -> (batch, channels, rows, cols)."""
    batch, num_tokens, channels = tokens.shape
    if num_tokens != grid[0] * grid[1]:
        raise ValueError(f"expected {grid[0]} x {grid[1]} = {grid[0] * grid[1]} tokens, got {num_tokens}")
    return tokens.transpose(1, 2).reshape(batch, channels, *grid)


def mlp(widths: list[int], act: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for index, (width_in, width_out) in enumerate(itertools.pairwise(widths)):
        layers += ([act()] if index else []) + [nn.Linear(width_in, width_out)]
    return nn.Sequential(*layers)


class PixelShuffleProjector(nn.Module):
    """Pixel-shuffle + MLP (InternVL-1.5): token (i, j) of the output concatenates the input tokens
    (r*i + dy, r*j + dx) for dy, dx in 0..r-1 (row-major), then LayerNorm and Linear-GELU-Linear to the LLM width."""

    def __init__(self, sizes: Sizes, num_queries: int):
        super().__init__()
        self.grid, self.factor = sizes.grid, factor_for(num_queries, sizes.grid)
        width = sizes.vision_width * self.factor**2
        self.norm = nn.LayerNorm(width)
        self.mlp = mlp([width, sizes.text_width, sizes.text_width], nn.GELU)

    def shuffle(self, image_features: torch.Tensor) -> torch.Tensor:
        batch, _, channels = image_features.shape
        rows, cols, r = self.grid[0] // self.factor, self.grid[1] // self.factor, self.factor
        x = image_features.view(batch, rows, r, cols, r, channels)  # (batch, row, dy, col, dx, C)
        return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, rows * cols, r * r * channels)  # (batch, M, r*r*C)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(self.shuffle(image_features)))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (batch, channels, rows, cols) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class RegNetBottleneck(nn.Module):
    """A RegNet-Y bottleneck block as C-Abstractor stacks them (bottleneck ratio 1, group width 1, so the 3x3 conv is
    depth-wise; squeeze-excitation with round(0.25 * in) channels): conv-norm-act, dwconv-norm-act, SE, conv-norm, plus
    the shortcut (a 1x1 conv-norm when the widths differ), then SiLU."""

    def __init__(self, width_in: int, width_out: int):
        super().__init__()
        squeeze = round(0.25 * width_in)
        self.conv1 = nn.Conv2d(width_in, width_out, 1, bias=False)
        self.norm1 = LayerNorm2d(width_out)
        self.conv2 = nn.Conv2d(width_out, width_out, 3, padding=1, groups=width_out, bias=False)
        self.norm2 = LayerNorm2d(width_out)
        self.se_reduce = nn.Conv2d(width_out, squeeze, 1)
        self.se_expand = nn.Conv2d(squeeze, width_out, 1)
        self.conv3 = nn.Conv2d(width_out, width_out, 1, bias=False)
        self.norm3 = LayerNorm2d(width_out)
        self.shortcut = (
            nn.Identity()
            if width_in == width_out
            else nn.Sequential(nn.Conv2d(width_in, width_out, 1, bias=False), LayerNorm2d(width_out))
        )
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.act(self.norm2(self.conv2(out)))
        scale = self.se_expand(self.act(self.se_reduce(out.mean((2, 3), keepdim=True))))
        out = self.norm3(self.conv3(out * scale.sigmoid()))
        return self.act(out + self.shortcut(x))


class CAbstractor(nn.Module):
    """C-Abstractor (Honeybee): positional embedding, `depth` RegNet blocks, adaptive average pooling to the token
    budget, `depth` RegNet blocks, and a Linear-SiLU-Linear readout to the LLM width."""

    def __init__(self, sizes: Sizes, num_queries: int, depth: int = 3):
        super().__init__()
        self.grid, side, hidden = sizes.grid, side_for(num_queries, sizes.grid), sizes.abstractor_width
        self.position_embedding = nn.Parameter(torch.zeros(1, sizes.num_tokens, sizes.vision_width))
        widths = [sizes.vision_width] + [hidden] * depth
        self.stage1 = nn.Sequential(*(RegNetBottleneck(a, b) for a, b in itertools.pairwise(widths)))
        self.pool = nn.AdaptiveAvgPool2d((side, side))
        self.stage2 = nn.Sequential(*(RegNetBottleneck(hidden, hidden) for _ in range(depth)))
        self.readout = mlp([hidden, sizes.text_width, sizes.text_width], nn.SiLU)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        x = grid_of(image_features + self.position_embedding, self.grid)  # (batch, C, rows, cols)
        x = self.stage2(self.pool(self.stage1(x)))  # (batch, hidden, side, side)
        return self.readout(x.flatten(2).transpose(1, 2))  # (batch, M, D)


class LDPv2(nn.Module):
    """LDP-v2 (MobileVLM V2): Linear-GELU-Linear per token, adaptive average pooling to the budget, and a 3x3 depth-wise
    positional convolution added to its input (PEG)."""

    def __init__(self, sizes: Sizes, num_queries: int):
        super().__init__()
        self.grid, side, width = sizes.grid, side_for(num_queries, sizes.grid), sizes.text_width
        self.mlp = mlp([sizes.vision_width, width, width], nn.GELU)
        self.pool = nn.AdaptiveAvgPool2d((side, side))
        self.peg = nn.Conv2d(width, width, 3, padding=1, groups=width)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        x = self.pool(grid_of(self.mlp(image_features), self.grid))  # (batch, D, side, side)
        x = x + self.peg(x)
        return x.flatten(2).transpose(1, 2)  # (batch, M, D)


class TokenPacker(nn.Module):
    """TokenPacker: coarse point queries (the grid bilinearly downsampled by s), multi-level region keys and values,
    region-to-point attention (each query sees only the s x s tokens of its region), and Linear-GELU-Linear out."""

    def __init__(self, sizes: Sizes, num_queries: int, num_heads: int = 8):
        super().__init__()
        self.grid, self.factor = sizes.grid, factor_for(num_queries, sizes.grid)
        width, multi_width = sizes.vision_width, sizes.levels * sizes.vision_width
        self.query_proj = nn.Linear(width, width, bias=False)
        self.key_proj = mlp([multi_width, width, width], nn.GELU)
        self.value_proj = mlp([multi_width, width, width], nn.GELU)
        self.query_norm, self.key_norm, self.value_norm = (nn.LayerNorm(width, eps=1e-6) for _ in range(3))
        self.attention = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.mlp = mlp([width, sizes.text_width, sizes.text_width], nn.GELU)

    def regions(self, tokens: torch.Tensor) -> torch.Tensor:
        """(batch, rows * cols, E) -> (batch * M, s * s, E): the high-resolution tokens of each query's region."""
        batch, _, width = tokens.shape
        s = self.factor
        rows, cols = self.grid[0] // s, self.grid[1] // s
        x = tokens.view(batch, rows, s, cols, s, width)  # (batch, row, dy, col, dx, E)
        return x.permute(0, 1, 3, 2, 4, 5).reshape(batch * rows * cols, s * s, width)

    def point_queries(self, image_features: torch.Tensor) -> torch.Tensor:
        """(batch, N, C) -> (batch, M, E): the bilinearly downsampled grid, projected and normalised."""
        rows, cols = self.grid[0] // self.factor, self.grid[1] // self.factor
        coarse = F.interpolate(grid_of(image_features, self.grid), size=(rows, cols), mode="bilinear")
        return self.query_norm(self.query_proj(coarse.flatten(2).transpose(1, 2)))

    def forward(self, image_features: torch.Tensor, multi_level_features: torch.Tensor) -> torch.Tensor:
        query = self.point_queries(image_features)  # (batch, M, E)
        batch, num_queries, width = query.shape
        key = self.regions(self.key_norm(self.key_proj(multi_level_features)))  # (batch * M, s * s, E)
        value = self.regions(self.value_norm(self.value_proj(multi_level_features)))
        packed, _ = self.attention(query.reshape(batch * num_queries, 1, width), key, value, need_weights=False)
        return self.mlp(packed.view(batch, num_queries, width))  # (batch, M, D)


class Idefics2Projector(nn.Module):
    """transformers' `Idefics2Connector` (SwiGLU modality projection, then `Idefics2PerceiverResampler`), all tokens
    valid."""

    def __init__(self, sizes: Sizes, num_queries: int):
        super().__init__()
        vision = CLIPVisionConfig(hidden_size=sizes.vision_width, num_attention_heads=8).to_dict()
        text = LlamaConfig(
            hidden_size=sizes.text_width,
            intermediate_size=sizes.text_intermediate,
            num_attention_heads=4,
            hidden_act="silu",
        )
        perceiver = Idefics2PerceiverConfig(
            hidden_size=sizes.text_width,
            resampler_n_latents=num_queries,
            resampler_depth=3,
            resampler_n_heads=16 if sizes.text_width >= 1536 else 4,
            resampler_head_dim=96 if sizes.text_width >= 1536 else sizes.text_width // 8,
            num_key_value_heads=4 if sizes.text_width >= 1536 else 2,
            hidden_act="silu",
        )
        config = Idefics2Config(vision_config=vision, text_config=text.to_dict(), perceiver_config=perceiver.to_dict())
        config.text_config.hidden_act = "silu"
        self.connector = Idefics2Connector(config)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(image_features.shape[:2], dtype=torch.bool, device=image_features.device)
        return self.connector(image_features, attention_mask=mask)


class MSResamplerProjector(nn.Module):
    """ms_llava's MSResampler (k = [2, 6, grid], beta = 5, SDPA), called with the grid."""

    def __init__(self, sizes: Sizes, num_queries: int):
        super().__init__()
        rows = sizes.grid[0]
        patch = 14
        vision = CLIPVisionConfig(
            hidden_size=sizes.vision_width,
            num_attention_heads=8,
            image_size=rows * patch,
            patch_size=patch,
            num_hidden_layers=1,
        )
        text = LlamaConfig(hidden_size=sizes.text_width, num_attention_heads=4, num_hidden_layers=1)
        resampler = dict(
            num_queries=num_queries,
            scope_windows=[2, 6, rows],
            scope_bias_strength=5.0,
            hidden_size=sizes.resampler_width,
            num_attention_heads=sizes.resampler_heads,
        )
        config = MSLlavaConfig(vision_config=vision, text_config=text, resampler_config=resampler)
        config._attn_implementation = "sdpa"
        self.resampler = MSResampler(config)
        self.resampler.reset_parameters()  # a sub-model: its init runs from the enclosing model's post_init otherwise
        self.grid = sizes.grid

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.resampler(image_features, self.grid)


PEERS = {
    "MS-Resampler": MSResamplerProjector,
    "TokenPacker": TokenPacker,
    "C-Abstractor": CAbstractor,
    "LDP-v2": LDPv2,
    "Pixel-shuffle + MLP": PixelShuffleProjector,
    "Idefics2 perceiver": Idefics2Projector,
}

M_SETTING = {
    "MS-Resampler": "M queries",
    "TokenPacker": "downsampling s = sqrt(N/M)",
    "C-Abstractor": "adaptive pool to sqrt(M)^2",
    "LDP-v2": "adaptive pool to sqrt(M)^2",
    "Pixel-shuffle + MLP": "shuffle factor r = sqrt(N/M)",
    "Idefics2 perceiver": "M latents",
}


def example_inputs(module: nn.Module, sizes: Sizes, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, sizes.num_tokens, sizes.vision_width, generator=generator)
    if isinstance(module, TokenPacker):
        multi = torch.randn(batch, sizes.num_tokens, sizes.levels * sizes.vision_width, generator=generator)
        return features, multi
    return (features,)


def hand_count(name: str, sizes: Sizes, num_queries: int) -> int:
    """MACs of the matmuls and convolutions (what FlopCounterMode counts), from the sizes alone."""
    N, C, D, M = sizes.num_tokens, sizes.vision_width, sizes.text_width, num_queries
    readout = M * (D * D)  # the second layer of every Linear-act-Linear to the LLM width
    if name == "Pixel-shuffle + MLP":
        r2 = N // M
        return M * r2 * C * D + readout
    if name == "LDP-v2":
        return N * (C * D + D * D) + M * 9 * D
    if name == "C-Abstractor":
        H = sizes.abstractor_width
        squeeze = round(0.25 * H)  # all blocks here have in == out == H when C == H

        def block(tokens: int) -> int:
            return tokens * (2 * H * H + 9 * H) + 2 * H * squeeze

        if C != H:
            raise ValueError("the hand count assumes C == abstractor_width")
        return 3 * block(N) + 3 * block(M) + M * H * D + readout
    if name == "TokenPacker":
        E, s2 = C, N // M
        keys_values = 2 * N * (sizes.levels * C * E + E * E)
        attention = M * E * E + 2 * N * E * E + 2 * M * s2 * E + M * E * E  # in-proj q, k, v; QK^T and PV; out-proj
        return M * C * E + keys_values + attention + M * E * D + readout
    if name == "Idefics2 perceiver":
        I = sizes.text_intermediate  # noqa: E741
        perceiver = PEERS[name](sizes, num_queries).connector.perceiver_resampler.config
        heads, head_dim, kv_heads = (
            perceiver.resampler_n_heads,
            perceiver.resampler_head_dim,
            perceiver.num_key_value_heads,
        )
        context = N + M  # the latents attend to the context and themselves
        layer = (
            M * D * heads * head_dim  # q
            + 2 * context * D * kv_heads * head_dim  # k, v
            + 2 * M * context * heads * head_dim  # QK^T and PV
            + M * heads * head_dim * D  # o
            + 3 * M * D * 4 * D  # SwiGLU MLP
        )
        return N * (2 * C * I + I * D) + perceiver.resampler_depth * layer
    if name == "MS-Resampler":
        W, E = sizes.resampler_width, 3
        kv = N * C * 2 * E * W
        attention = 2 * E * M * N * W
        fusion = M * W * (E + 1) * 16
        return kv + attention + fusion + M * W * D
    raise ValueError(f"unknown projector {name!r}; known: {sorted(PEERS)}")


def share_weights(module: nn.Module, donor: nn.Module) -> nn.Module:
    """Points every tensor of `module` at `donor`'s tensor of the same name and shape (all but the M-sized ones), so
    that the three Idefics2 rows hold one copy of its ~2.6 GB of weights instead of three on a shared 24 GiB machine.
    The timing is unaffected: each forward reads the same amount of weights either way."""
    shapes = {name: tensor.shape for name, tensor in module.state_dict().items()}
    shared = {name: tensor for name, tensor in donor.state_dict().items() if shapes.get(name) == tensor.shape}
    module.load_state_dict(shared, strict=False, assign=True)
    return module


def measure(name: str, sizes: Sizes, num_queries: int, donor: nn.Module | None = None) -> dict:
    module = init_weights(PEERS[name](sizes, num_queries))
    if donor is not None:
        share_weights(module, donor)
    # no gradients: FlopCounterMode's module tracker cannot hook a parameter-derived tensor under inference mode
    module.requires_grad_(False)
    inputs = example_inputs(module, sizes)
    with torch.inference_mode():
        output = module(*inputs)  # also fills MS-Resampler's scope-bias cache
    if output.shape != (1, num_queries, sizes.text_width):
        raise RuntimeError(f"{name} gave {tuple(output.shape)}, expected (1, {num_queries}, {sizes.text_width})")
    macs, by_op = count_macs(module, inputs)
    return dict(
        name=name,
        tokens=num_queries,
        module=module,
        inputs=inputs,
        macs=macs,
        hand=hand_count(name, sizes, num_queries),
        by_op=by_op,
        params=sum(p.numel() for p in module.parameters()),
        peak=peak_activation_bytes(module, inputs),
    )


def render(results, replays, sizes, threads, args, load):
    runs, warmup = args.runs, args.warmup
    budgets = " / ".join(str(m) for m in sizes.budgets)
    factors = " / ".join(str(factor_for(m, sizes.grid)) for m in sizes.budgets)
    scale = "LLaVA-1.5-7B sizes" if sizes == FULL else "reduced sizes (--quick)"
    lines = [
        f"## Projector peers: MS-Resampler against the paper's compared projectors ({scale}, per image)",
        "",
        f"- Machine: {cpu_model()}, {os.cpu_count()} cores, {_memory_gib():.0f} GiB, no GPU; torch.set_num_threads"
        f"({threads}); torch {torch.__version__}, transformers {transformers.__version__}, Python"
        f" {platform.python_version()}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC;"
        f" 1/5/15-min load average {load} (before and after the timed rounds): the machine was shared with other"
        " sessions' jobs, and this ran under `nice`.",
        "- Reproduce: `nice python benchmarks/projector_peers.py` (`--quick`: reduced sizes, nothing written).",
        f"- Input: 1 x {sizes.num_tokens} x {sizes.vision_width} (CLIP ViT-L/14-336 grid {sizes.grid[0]}x"
        f"{sizes.grid[1]}), output M x {sizes.text_width}; fp32, batch 1, CPU, `torch.inference_mode()`.",
        "- Peers are written from their papers for this benchmark (`benchmarks/projector_peers.py` says what each"
        f" holds); the Idefics2 row is transformers' `Idefics2Connector` (SwiGLU modality projection to {sizes.text_width} with"
        f" the LLM's {sizes.text_intermediate} intermediate width + `Idefics2PerceiverResampler`, depth 3). TokenPacker"
        f" reads {sizes.levels} vision layers ({sizes.levels * sizes.vision_width} wide) for its keys and values, the"
        " others one.",
        f"- How M = {budgets} is set: MS-Resampler and Idefics2: M learned queries / latents; TokenPacker:"
        f" downsampling factor s = {factors} ({sizes.grid[0]}/s squared = M); pixel-shuffle: factor r = {factors}"
        " (InternVL itself uses r = 2); C-Abstractor and LDP-v2: adaptive average pooling to"
        f" {' / '.join(f'{math.isqrt(m)}x{math.isqrt(m)}' for m in sizes.budgets)}.",
        "- GMACs: `FlopCounterMode` FLOPs / 2 (matmuls and convolutions, plus the CPU SDPA kernel's two products);"
        " 'hand' is the analytic count of the same ops. Peak act.: peak of bytes allocated minus freed by PyTorch's"
        " CPU allocator during one forward (`torch.profiler` memory events), output included; weights and input"
        " excluded (MS-Resampler's scope-bias cache is filled before, as in the Projector cost section).",
        f"- Latency: median of {runs} timed rounds after {warmup} warm-up round(s); every round runs every projector"
        " (and the matmul replays below) once, in turns. 'x MS' divides by MS-Resampler at the same M; for latency"
        " it is the median over rounds of the ratio within each round.",
        "",
        "| Projector | M | GMACs | hand GMACs | x MS MACs | Params (M) | x MS params | Peak act. (MiB) | x MS peak"
        " | Latency median (ms) | IQR (ms) | min (ms) | x MS latency |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for tokens in sizes.budgets:
        ms = next(r for r in results if r["name"] == "MS-Resampler" and r["tokens"] == tokens)
        for r in (r for r in results if r["tokens"] == tokens):
            lines.append(
                f"| {r['name']} | {tokens} | {r['macs'] / 1e9:.3f} | {r['hand'] / 1e9:.3f}"
                f" | {r['macs'] / ms['macs']:.2f} | {r['params'] / 1e6:.2f} | {r['params'] / ms['params']:.2f}"
                f" | {r['peak'] / 2**20:.1f} | {r['peak'] / ms['peak']:.2f} | {r['median']:.1f} | {r['iqr']:.1f}"
                f" | {r['min']:.1f} | {paired_ratio(r, ms):.2f} |"
            )
    lines += [
        "",
        "MS-Resampler's GEMM efficiency: every matrix product it runs (mm / addmm / bmm / baddbmm / mv and the two"
        " products in the SDPA kernel), replayed as plain fp32 `torch.matmul` calls at the same shapes, right after it, in"
        f" {args.gemm_rounds} rounds of their own (after {warmup} warm-up)."
        " 'Fraction' = replay time / MS-Resampler time in the same round (median over rounds, and its quartiles) ="
        " achieved GEMM throughput / this machine's matmul throughput at those shapes; the rest of MS-Resampler's"
        " time is layer norms, softmax, the bias add, reshapes and the fusion's element-wise work.",
        "",
        "| M | GEMM GMACs | MS-Resampler median (ms) | achieved GFLOP/s | matmul replay median (ms) | matmul GFLOP/s"
        " | Fraction | Fraction IQR |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for replay in replays:
        ms, matmul = replay["pair"]
        fraction, q1, q3 = paired_ratio(matmul, ms, quartiles=True)
        gflop = 2 * replay["macs"] / 1e9
        lines.append(
            f"| {replay['resampler']['tokens']} | {replay['macs'] / 1e9:.3f} | {ms['median']:.1f}"
            f" | {gflop / ms['median'] * 1e3:.1f} | {matmul['median']:.1f} | {gflop / matmul['median'] * 1e3:.1f}"
            f" | {fraction:.2f} | {q1:.2f} - {q3:.2f} |"
        )
    if sizes == FULL:
        ours = {r["name"]: r["macs"] / 1e9 for r in results if r["tokens"] == 144}
        lines += [
            "",
            "Against the paper's Table 7 (projector FLOPs at M = 144, which are MACs: its LLaVA-1.5 MLP row, 12.09 G,"
            f" is the MLP's 12.08 GMACs): TokenPacker {PAPER_TABLE7['TokenPacker']} G there, {ours['TokenPacker']:.2f}"
            f" here; LDP-v2 {PAPER_TABLE7['LDP-v2']} G there, {ours['LDP-v2']:.2f} here; C-Abstractor"
            f" {PAPER_TABLE7['C-Abstractor']} G there, {ours['C-Abstractor']:.2f} here (Honeybee's depth-3, width-1024"
            " setting; the paper's figure equals the MLP's and its C-Abstractor configuration is not given);"
            f" MS-Resampler {PAPER_TABLE7['MS-Resampler']} G there, {ours['MS-Resampler']:.2f} here (this repository's"
            " choices where the paper is silent: see the Projector cost section).",
        ]
    noisy = [r["name"] + f" M={r['tokens']}" for r in results if r["median"] > 1.5 * r["min"]]
    if noisy:
        lines += [
            "",
            f"Note: the CPU was contended during the run: {len(noisy)} of {len(results)} rows have a median over 1.5x"
            " their fastest round; the interleaving keeps the ratios fairer than the absolute times. MACs, parameters"
            " and peak memory do not depend on the load.",
        ]
    return lines


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_path = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
    parser.add_argument("--write", type=Path, default=default_path, help="Markdown file to update (BENCHMARKS.md)")
    parser.add_argument("--no-write", action="store_true", help="only print the section")
    parser.add_argument("--quick", action="store_true", help="reduced sizes, 2 rounds, nothing written")
    parser.add_argument("--runs", type=int, default=10, help="timed rounds of all projectors")
    parser.add_argument(
        "--gemm-rounds", type=int, default=60, help="timed rounds of MS-Resampler vs its matmul replay"
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: the usable CPU cores)")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    if args.quick:
        args.runs, args.warmup, args.gemm_rounds, args.no_write = 2, 1, 4, True

    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"torch.set_num_threads({threads}); load average {load}", flush=True)

    results, replays, donors = [], [], {}
    for tokens in sizes.budgets:
        for name in PEERS:
            donor = donors.get(name) if name == "Idefics2 perceiver" else None
            results.append(r := measure(name, sizes, tokens, donor))
            donors.setdefault(name, r["module"])
            print(
                f"  {name} M={tokens}: {r['macs'] / 1e9:.3f} GMACs (hand {r['hand'] / 1e9:.3f}),"
                f" {r['params'] / 1e6:.2f} M params, peak {r['peak'] / 2**20:.1f} MiB",
                flush=True,
            )
            if abs(r["macs"] - r["hand"]) > 0.01 * r["hand"]:
                raise SystemExit(f"{name} M={tokens}: FlopCounterMode {r['macs']:.0f} != hand count {r['hand']:.0f}")
            if name == "MS-Resampler":
                replay = MatmulReplay(record_gemms(r["module"], r["inputs"]))
                if abs(replay.macs - r["macs"]) > 0.01 * r["macs"]:
                    raise SystemExit(f"the replay has {replay.macs} MACs, MS-Resampler {r['macs']}")
                replays.append(dict(call=replay, macs=replay.macs, resampler=r))
    for r in results:
        r["call"] = lambda r=r: r["module"](*r["inputs"])
    print(f"timing {len(results)} projectors in turns: {args.warmup} warm-up + {args.runs} timed rounds", flush=True)
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    time_in_turns(results, args.warmup, args.runs, progress=True)
    # The GEMM-efficiency pairs run in a phase of their own, each replay right after its MS-Resampler, so that the two
    # times of a pair are a fraction of a second apart (in the main rounds the slow Idefics2 rows sit between them).
    for replay in replays:
        replay["pair"] = (dict(call=replay["resampler"]["call"]), dict(call=replay["call"]))
    print(f"timing MS-Resampler against its matmul replay: {args.gemm_rounds} rounds", flush=True)
    time_in_turns([entry for replay in replays for entry in replay["pair"]], args.warmup, args.gemm_rounds)
    load = f"{load}, then " + " / ".join(f"{x:.1f}" for x in os.getloadavg())

    section = "\n".join(render(results, replays, sizes, threads, args, load))
    print("\n" + section)
    if not args.no_write:
        write_section(args.write, section, START, END)
        print(f"\nwrote {args.write}")


if __name__ == "__main__":
    main()
