"""Plain references written straight from the paper's equations (Sec. 3), with Python loops and no batching.

They share nothing with the fast implementation but its parameters, so a test comparing the two can fail.
"""

import math

import torch


def naive_anchor(index: int, bands: int, size: int) -> float:
    """Centre of band `index` when `size` rows are split in `bands` contiguous bands as evenly as possible."""
    first = math.floor(index * size / bands)
    last = math.floor((index + 1) * size / bands) - 1
    return (first + last) / 2


def naive_scope_bias(windows, rows, cols, height, width) -> torch.Tensor:
    """Eq. 4-5 with loops: B[e, i, l] = 0 if token l = (y, x) is in the k^(e) x k^(e) window of query i, else -1."""
    bias = torch.empty(len(windows), rows * cols, height * width)
    for e, k in enumerate(windows):
        for i in range(rows * cols):
            anchor_y = naive_anchor(i // cols, rows, height)
            anchor_x = naive_anchor(i % cols, cols, width)
            for l in range(height * width):  # noqa: E741 (the paper's index)
                y, x = l // width, l % width
                inside = abs(y - anchor_y) <= k // 2 and abs(x - anchor_x) <= k // 2
                bias[e, i, l] = 0.0 if inside else -1.0
    return bias


def naive_channel_mlp_fusion(branch_outputs, weight1, bias1, weight2, bias2, act) -> torch.Tensor:
    """Eq. 7-8 for one image: branch_outputs (E, M, c); out[i, j] = w2 . act(W1 z_ij + b1) + b2."""
    num_branches, num_queries, channels = branch_outputs.shape
    out = torch.empty(num_queries, channels, dtype=torch.float64)
    for i in range(num_queries):
        for j in range(channels):
            z = branch_outputs[:, i, j].double()  # Eq. 7: the expert vector z_ij in R^E
            out[i, j] = weight2.double() @ act(weight1.double() @ z + bias1.double()) + bias2.double()
    return out


def naive_ms_resampler(resampler, image_features, grid_height, grid_width, fuse=None) -> torch.Tensor:
    """MS-Resampler for one image (N, d) -> (M, text_hidden), in float64, one branch and one head at a time.

    Per branch e (Eq. 3): O^(e) = Softmax(Q^(e) K^(e)T / sqrt(d_head) + beta B^(e)) V^(e), heads concatenated,
    then the fusion over the E branch outputs and the output projection. `fuse` overrides the fusion (E, M, D) -> (M, D).
    """
    num_branches, num_heads, head_dim = resampler.num_branches, resampler.num_heads, resampler.head_dim
    width = resampler.hidden_size
    x = resampler.input_layernorm(image_features).double()  # (N, d)
    kv_weight = resampler.kv_proj.weight.double().view(2, num_branches, width, -1)  # (k|v, E, D, d)
    beta = resampler.config.scope_bias_strength
    bias = resampler.scope_bias(grid_height, grid_width).double()  # (E, M, H*W)
    outputs = []
    for e in range(num_branches):
        keys = x @ kv_weight[0, e].T  # (N, D): K^(e) = X W_K^(e)
        values = x @ kv_weight[1, e].T  # (N, D): V^(e) = X W_V^(e)
        queries = resampler.queries[e].double()  # (M, D): Q^(e)
        heads = []
        for h in range(num_heads):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            logits = queries[:, cols] @ keys[:, cols].T / math.sqrt(head_dim) + beta * bias[e]
            heads.append(torch.softmax(logits, dim=-1) @ values[:, cols])
        outputs.append(torch.cat(heads, dim=-1))  # O^(e): (M, D)
    stacked = torch.stack(outputs)  # (E, M, D)
    if fuse is None:
        fusion = resampler.fusion
        fused = naive_channel_mlp_fusion(
            stacked, fusion.weight1, fusion.bias1, fusion.weight2, fusion.bias2, fusion.act
        )
    else:
        fused = fuse(stacked)
    return fused @ resampler.output_proj.weight.double().T + resampler.output_proj.bias.double()
