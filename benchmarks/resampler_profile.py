"""Where MS-Resampler's time goes at LLaVA-1.5-7B sizes, and whether its attention would run faster outside SDPA.

1. `torch.profiler` over `--calls` forwards of MS-Resampler (M = 144, k = 2/6/24, beta = 5, SDPA; input 1 x 576 x 1024,
   fp32, batch 1): self CPU time per op and input shapes, per forward.
2. The attention alone at the resampler's shapes ((E, heads, M, head_dim) queries, K/V as the strided views of the one
   K/V product the model passes), interleaved rounds, median and min: SDPA with the (E, 1, M, N) float mask beta * B
   (the model's path), SDPA without a mask (beta = 0), and a direct batched path (matmul, scale and bias added in
   place, softmax, matmul), each checked equal to the first.

Run `python benchmarks/resampler_profile.py` from the repository root (`PYTHONPATH=<other src>` profiles another
version of the model); it prints, and writes nothing.
"""

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from projector_cost import GRID, NUM_TOKENS, VISION_WIDTH, build_resampler


def profile_forward(resampler, features, calls):
    with torch.inference_mode():
        for _ in range(3):
            resampler(features, GRID)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(calls):
                resampler(features, GRID)
    events = [e for e in prof.key_averages(group_by_input_shape=True) if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\nSelf CPU time per forward ({calls} forwards profiled; {total / calls / 1e3:.1f} ms in all):\n")
    print(f"{'op':48s} {'ms':>8s} {'share':>6s}  input shapes")
    for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[:14]:
        share = event.self_cpu_time_total / total
        print(
            f"{event.key[:48]:48s} {event.self_cpu_time_total / calls / 1e3:8.2f} {share:6.1%}  {event.input_shapes}"
        )


def attention_paths(resampler, features, rounds):
    """The three ways to compute the biased attention, on the model's own query, K/V views and mask."""
    config = resampler.config
    branches, heads, head_dim = resampler.num_branches, resampler.num_heads, resampler.head_dim
    with torch.inference_mode():
        hidden = resampler.input_layernorm(features)
        kv = resampler.kv_proj(hidden).view(1, NUM_TOKENS, 2, branches, heads, head_dim)
        key, value = kv.permute(2, 0, 3, 4, 1, 5).reshape(2, branches, heads, NUM_TOKENS, head_dim)  # views
        query = resampler.queries.view(branches, config.num_queries, heads, head_dim).transpose(1, 2)
        mask = config.scope_bias_strength * resampler.scope_bias(*GRID)[:, None]  # (E, 1, M, N)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    scale = resampler.scaling

    def direct():
        logits = torch.matmul(query, key.transpose(-1, -2)).mul_(scale).add_(mask)
        return torch.matmul(logits.softmax(dim=-1), value)

    paths = {
        "SDPA, float mask (the model's)": lambda: sdpa(query, key, value, attn_mask=mask, scale=scale),
        "SDPA, no mask (beta = 0)": lambda: sdpa(query, key, value, scale=scale),
        "direct: matmul, +bias, softmax, matmul": direct,
    }
    with torch.inference_mode():
        reference = paths["SDPA, float mask (the model's)"]()
        torch.testing.assert_close(direct(), reference, rtol=1e-4, atol=1e-5)
        times = {name: [] for name in paths}
        for step in range(rounds + 2):
            for name, path in paths.items():
                start = time.perf_counter()
                path()
                if step >= 2:
                    times[name].append((time.perf_counter() - start) * 1e3)
    print(
        f"\nThe attention alone ({branches * heads} heads of {config.num_queries} x {NUM_TOKENS}, {rounds} rounds):\n"
    )
    for name, samples in times.items():
        print(f"{name:42s} median {statistics.median(samples):7.2f} ms   min {min(samples):7.2f} ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=10, help="forwards profiled")
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds of the attention paths")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    resampler = build_resampler(144, [2, 6, 24], 5.0)  # parameters requiring grad, as a loaded model's
    features = torch.randn(1, NUM_TOKENS, VISION_WIDTH)
    print(f"torch {torch.__version__}, torch.set_num_threads({args.threads})")
    profile_forward(resampler, features, args.calls)
    attention_paths(resampler, features, args.rounds)


if __name__ == "__main__":
    main()
