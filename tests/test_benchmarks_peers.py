"""The benchmark scripts' logic at tiny sizes. benchmarks/projector_peers.py: the peer projectors (shapes, MAC counts,
one paper equation each for pixel-shuffle and TokenPacker's region-to-point attention) and the matmul replay behind the
GEMM-efficiency figure; projector_cost.py's matmul ceiling; end_to_end_7b.py's 32-layer extrapolation; the GPU
script's refusal without CUDA and its dry run on the CPU."""

import importlib
import math
import statistics
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def peers():
    # the benchmark scripts import each other by name, as they do when run from benchmarks/
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))
        yield importlib.import_module("projector_peers")


@pytest.fixture(scope="module")
def bench():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))
        yield {name: importlib.import_module(name) for name in ("projector_cost", "end_to_end_7b", "gpu_benchmarks")}


@pytest.fixture(scope="module")
def tiny(peers):
    return peers.Sizes(
        grid=(6, 6),
        vision_width=24,
        text_width=40,
        text_intermediate=56,
        abstractor_width=24,
        levels=2,
        resampler_width=16,
        resampler_heads=2,
        budgets=(9, 4),
    )


def build(peers, name, sizes, num_queries, seed=0):
    """With the modules' own initialisation (not the benchmark's N(0, 0.02) everywhere, under which the layer norms'
    tiny gains flatten the attention and a wrong region would go unnoticed)."""
    torch.manual_seed(seed)
    return peers.PEERS[name](sizes, num_queries).eval()


@pytest.mark.parametrize("num_queries", [9, 4])
@pytest.mark.parametrize(
    "name", ["MS-Resampler", "TokenPacker", "C-Abstractor", "LDP-v2", "Pixel-shuffle + MLP", "Idefics2 perceiver"]
)
def test_every_peer_maps_the_grid_to_m_tokens_of_the_llm_width(peers, tiny, name, num_queries):
    module = build(peers, name, tiny, num_queries)
    inputs = peers.example_inputs(module, tiny, batch=2)
    with torch.inference_mode():
        output = module(*inputs)
    assert output.shape == (2, num_queries, tiny.text_width)
    assert torch.isfinite(output).all()
    # the batch rows are independent: the second image alone gives the second row
    with torch.inference_mode():
        alone = module(*(x[1:] for x in inputs))
    torch.testing.assert_close(alone[0], output[1], rtol=1e-4, atol=1e-5)

    # FlopCounterMode's count (the benchmark's GMACs column) equals the benchmark's analytic count, per image
    macs, _ = peers.count_macs(module.requires_grad_(False), inputs)
    assert macs == 2 * peers.hand_count(name, tiny, num_queries)


def test_pixel_shuffle_macs_equal_a_count_by_hand(peers, tiny):
    """r = 2 on a 6x6 grid: M = 9 tokens of 4 * 24 = 96 channels; Linear 96 -> 40 then Linear 40 -> 40 per token."""
    module = build(peers, "Pixel-shuffle + MLP", tiny, 9).requires_grad_(False)
    macs, by_op = peers.count_macs(module, peers.example_inputs(module, tiny))
    assert macs == 9 * (96 * 40 + 40 * 40)  # count_macs gives FLOPs / 2
    assert set(by_op) == {"addmm"}


def test_pixel_shuffle_is_space_to_depth(peers, tiny):
    """Output token (i, j) holds the inputs (r*i + dy, r*j + dx), dy and dx row-major, as plain loops state it."""
    module = build(peers, "Pixel-shuffle + MLP", tiny, 4)  # r = 3
    features = torch.randn(2, 36, tiny.vision_width)
    rows = cols = 6
    r = 3
    expected = torch.stack(
        [
            torch.stack(
                [
                    torch.cat([features[b, (r * i + dy) * cols + r * j + dx] for dy in range(r) for dx in range(r)])
                    for i in range(rows // r)
                    for j in range(cols // r)
                ]
            )
            for b in range(2)
        ]
    )
    assert torch.equal(module.shuffle(features), expected)


def test_token_packer_attends_each_point_query_to_its_own_region_only(peers, tiny):
    """TokenPacker's region-to-point injection against its equation written out per query and head:
    out_m = W_o concat_h softmax(q_m W_q^h (K_m W_k^h)^T / sqrt(d)) V_m W_v^h + b_o, with K_m, V_m the s x s
    high-resolution keys / values of query m's region, then the output MLP."""
    module = build(peers, "TokenPacker", tiny, 4).eval()  # s = 3
    features, multi = peers.example_inputs(module, tiny, batch=2)
    with torch.no_grad():
        fast = module(features, multi)

        query = module.point_queries(features)  # (2, 4, E)
        keys = module.key_norm(module.key_proj(multi))  # (2, 36, E)
        values = module.value_norm(module.value_proj(multi))
        attention = module.attention
        width, heads = query.shape[-1], attention.num_heads
        head_dim = width // heads
        w_q, w_k, w_v = attention.in_proj_weight.chunk(3)
        b_q, b_k, b_v = attention.in_proj_bias.chunk(3)
        s, side, cols = 3, 2, 6
        packed = torch.empty_like(query)
        for b in range(2):
            for i in range(side):
                for j in range(side):
                    region = [(s * i + dy) * cols + s * j + dx for dy in range(s) for dx in range(s)]
                    q = query[b, i * side + j] @ w_q.T + b_q  # (E,)
                    k = keys[b, region] @ w_k.T + b_k  # (s*s, E)
                    v = values[b, region] @ w_v.T + b_v
                    per_head = []
                    for h in range(heads):
                        part = slice(h * head_dim, (h + 1) * head_dim)
                        weights = torch.softmax(k[:, part] @ q[part] / math.sqrt(head_dim), dim=0)  # (s*s,)
                        per_head.append(weights @ v[:, part])
                    packed[b, i * side + j] = torch.cat(per_head) @ attention.out_proj.weight.T
                    packed[b, i * side + j] += attention.out_proj.bias
        reference = module.mlp(packed)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)


def test_token_packer_point_queries_are_the_bilinear_downsampled_grid(peers, tiny):
    module = build(peers, "TokenPacker", tiny, 9)  # s = 2
    features = torch.randn(1, 36, tiny.vision_width)
    grid = features[0].view(6, 6, -1).permute(2, 0, 1)[None]  # (1, C, 6, 6)
    # with s = 2 and half-pixel centres, bilinear downsampling is the mean of each 2x2 block
    block_means = F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
    with torch.no_grad():
        expected = module.query_norm(module.query_proj(block_means))
        torch.testing.assert_close(module.point_queries(features), expected)


def test_ldp_v2_pools_then_adds_its_positional_convolution(peers, tiny):
    module = build(peers, "LDP-v2", tiny, 9)
    features = torch.randn(1, 36, tiny.vision_width)
    with torch.no_grad():
        tokens = module.mlp(features)[0]  # (36, D)
        pooled = torch.stack(
            [
                tokens[[(2 * i + dy) * 6 + 2 * j + dx for dy in range(2) for dx in range(2)]].mean(0)
                for i in range(3)
                for j in range(3)
            ]
        )  # (9, D): the mean of each 2x2 block, row-major
        grid = pooled.T.reshape(1, -1, 3, 3)
        expected = (grid + module.peg(grid)).flatten(2).transpose(1, 2)
        torch.testing.assert_close(module(features), expected)


def test_matmul_replay_runs_the_same_macs_as_ms_resampler(peers, tiny):
    """The GEMM-efficiency figure replays every product MS-Resampler runs: the replay's MACs equal FlopCounterMode's."""
    module = build(peers, "MS-Resampler", tiny, 9).requires_grad_(False)
    inputs = peers.example_inputs(module, tiny)
    macs, _ = peers.count_macs(module, inputs)
    replay = peers.MatmulReplay(peers.record_gemms(module, inputs))
    assert len(replay.operands) >= 4  # kv projection, QK^T, PV, fusion, output projection
    assert replay.macs == macs
    replay()  # runs


def test_budgets_that_the_grid_cannot_give_are_refused(peers, tiny):
    with pytest.raises(ValueError, match="got 10"):
        peers.PEERS["LDP-v2"](tiny, 10)
    with pytest.raises(ValueError, match="num_queries=16"):
        peers.PEERS["Pixel-shuffle + MLP"](tiny, 16)  # 6 is not divisible by 4
    with pytest.raises(ValueError, match="unknown projector 'MLP'"):
        peers.hand_count("MLP", tiny, 9)


def test_matmul_ceiling_is_each_products_time_times_its_count(bench):
    a, b = ((2, 3), (3, 4)), ((1, 5, 6), (1, 6, 7))
    shapes = {
        a: {"times": [1.0, 2.0, 3.0], "median": 2.0, "min": 1.0},
        b: {"times": [0.5, 0.1, 0.3], "median": 0.3, "min": 0.1},
    }
    result = {"gemms": {a: 2, b: 1}, "times": [4.0, 5.0, 10.0], "median": 5.0, "min": 4.0}
    bench["projector_cost"].add_ceiling(result, shapes)
    assert result["ceiling_median"] == pytest.approx(2 * 2.0 + 0.3)
    assert result["ceiling_min"] == pytest.approx(2 * 1.0 + 0.1)
    assert result["share_median"] == pytest.approx(4.3 / 5.0)
    assert result["share_min"] == pytest.approx(2.1 / 4.0)
    assert result["share_paired"] == pytest.approx(statistics.median([2.5 / 4.0, 4.1 / 5.0, 6.3 / 10.0]))
    assert bench["projector_cost"].shape_name(b) == "1 x 5 x 6 x 7"


def test_end_to_end_figures_are_linear_in_the_depth(bench):
    """The 32-layer figures rest on every decoder layer costing the same: at tiny sizes, the prefill FLOPs and KV bytes
    counted at 3 layers lie on the line through 1 and 5 layers, the KV bytes match the formula (checked by measure),
    the timed decode loop gives generate()'s tokens, and the tables render."""
    e2e = bench["end_to_end_7b"]
    assert e2e.extrapolate((2, 6), (10.0, 30.0)) == (0.0, 5.0, 160.0)  # fixed, per layer, at 32 layers
    rows = e2e.build((1, 3, 5), "tiny", torch.device("cpu"), torch.float32)
    assert len(rows) == 12 and all(r["model"].model.vision_tower is rows[0]["model"].model.vision_tower for r in rows)
    e2e.measure(rows, torch.device("cpu"), torch.float32, rounds=1, warmup=1, new_tokens=2, clock="cpu")
    for name in {r["name"] for r in rows}:
        low, mid, high = (r for r in rows if r["name"] == name)
        for key in ("flops", "kv"):
            assert mid[key] == e2e.extrapolate((1, 5), (low[key], high[key]), target=3)[2], (name, key)
        assert low["flops"] < mid["flops"] < high["flops"]
    assert all(r["agrees"] for r in rows)
    two_depths = [r for r in rows if r["layers"] != 3]
    estimates = e2e.at_target(two_depths)
    mlp = estimates[0]
    assert mlp["kv"][2] == 32 * two_depths[0]["kv"]  # one layer's cache, 32 times
    args = type("Args", (), dict(layers=(1, 5), rounds=1, warmup=1, new_tokens=2, dims="tiny", clock="cpu"))
    text = "\n".join(e2e.render(two_depths, estimates, args, torch.device("cpu"), torch.float32, "-", "cmd"))
    assert "Prefill at 32 (s)" in text and "yes, for every row" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal without a CUDA device")
def test_gpu_script_stops_at_once_without_cuda(bench):
    with pytest.raises(SystemExit, match="no CUDA device: torch.cuda.is_available"):
        bench["gpu_benchmarks"].main(["--device", "cuda"])


@pytest.mark.slow
def test_gpu_script_dry_run_on_the_cpu(bench, tmp_path):
    output = tmp_path / "gpu_benchmarks.md"
    bench["gpu_benchmarks"].main(["--device", "cpu", "--dry-run", "--no-compile", "--output", str(output)])
    text = output.read_text()
    for heading in (
        "### Projectors",
        "### MS-Resampler's biased attention",
        "### End to end, language model on `sdpa`",
    ):
        assert heading in text
    assert "| MATH | accepted |" in text  # the math backend takes any float mask
    assert "Wall time of the whole run" in text
