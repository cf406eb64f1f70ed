"""Cost per image of LLaVA's MLP projector, a vanilla resampler and MS-Resampler at LLaVA-1.5-7B dimensions, and the
ceiling this machine's `torch.matmul` sets for each.

CLIP ViT-L/14-336 gives N = 576 tokens (24 x 24 grid) of width 1024; the LLM (Vicuna-7B) is 4096 wide. Only the
projector modules are built. For each projector we measure, at batch 1 in fp32 on the CPU:

* MACs with `torch.utils.flop_counter.FlopCounterMode` (FLOPs / 2), checked against a hand count;
* parameters;
* peak activation memory: the running sum of the CPU allocator's allocations and frees during one forward, read
  from `torch.profiler` (profile_memory=True); weights, the input and the cached scope bias exist before and are
  not counted;
* latency: median, IQR and min of forwards under `torch.inference_mode()`, all projectors timed in turns;
* the matmul ceiling: every matrix product the projector runs (mm, addmm, bmm, baddbmm, mv, and the two products
  inside the CPU SDPA kernel) is recorded with its shapes; each distinct shape is timed as a plain `torch.matmul` on
  random operands in the same rounds as the projectors, and the ceiling is the time those products alone take at
  this machine's matmul rate for their shapes. Share = ceiling / projector latency = achieved FLOP rate / the
  matmul rate at the projector's own shapes; what is left is layer norms, softmax, the scope-bias add, the fusion's
  element-wise work and copies.

Run `python benchmarks/projector_cost.py` from the repository root; it rewrites its section of BENCHMARKS.md.
"""

import argparse
import collections
import datetime
import itertools
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from markdown_section import cpu_model, write_section
from ms_llava.configuration_ms_llava import MSLlavaConfig
from ms_llava.modeling_ms_llava import MSResampler

GRID, VISION_WIDTH, TEXT_WIDTH = (24, 24), 1024, 4096
NUM_TOKENS = GRID[0] * GRID[1]
BUDGET_GMACS, AIM_GMACS = 10.43, 7.0  # paper's Table 7 budget for M = 144, and our aim
GOAL_LATENCY, GOAL_SHARE = 0.42, 0.85  # issue 26: MS-Resampler M = 144 against the MLP, and of the matmul ceiling
START, END = "<!-- projector_cost:start -->", "<!-- projector_cost:end -->"
CLIP_336 = {"image_size": 336, "patch_size": 14, "num_hidden_layers": 1}  # configs only: no tower is built
aten = torch.ops.aten


def _sdpa_cpu_flop(query, key, value, *args, out_shape=None, **kwargs):
    """FLOPs of the CPU SDPA kernel, which FlopCounterMode does not count: QK^T and PV, both (b*h, M, N, d)."""
    batch, heads, queries, dim = query
    return 2 * batch * heads * queries * key[-2] * (dim + value[-1])


def _mv_flop(matrix, vector, *args, out_shape=None, **kwargs):
    return 2 * matrix[0] * matrix[1]


EXTRA_FLOP_FORMULAS = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop, aten.mv: _mv_flop}


def sub_configs():
    vision = CLIPVisionConfig(hidden_size=VISION_WIDTH, num_attention_heads=16, intermediate_size=4096, **CLIP_336)
    text = LlamaConfig(hidden_size=TEXT_WIDTH, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=1)
    return vision, text


def init_weights(module):
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(mean=0.0, std=0.02)
    return module.eval()


def build_mlp():
    vision, text = sub_configs()
    return init_weights(LlavaMultiModalProjector(LlavaConfig(vision_config=vision, text_config=text)))


def build_resampler(num_queries, windows, beta, attn="sdpa"):
    vision, text = sub_configs()
    resampler = {"num_queries": num_queries, "scope_windows": windows, "scope_bias_strength": beta}
    config = MSLlavaConfig(vision_config=vision, text_config=text, resampler_config=resampler)
    config._attn_implementation = attn
    return init_weights(MSResampler(config))


def hand_count(module):
    """MACs by hand: the matmuls only (layer norm, softmax, GELU and adds are not counted by FlopCounterMode)."""
    if isinstance(module, LlavaMultiModalProjector):
        return NUM_TOKENS * (VISION_WIDTH * TEXT_WIDTH + TEXT_WIDTH * TEXT_WIDTH)
    c = module.config
    num_branches, width, queries = c.num_branches, c.hidden_size, c.num_queries
    kv = NUM_TOKENS * VISION_WIDTH * 2 * num_branches * width
    attention = 2 * num_branches * queries * NUM_TOKENS * width
    fusion = queries * width * (num_branches + 1) * c.fusion_hidden_size if c.fusion == "channel_mlp" else 0
    return kv + attention + fusion + queries * width * TEXT_WIDTH


def count_macs(module, inputs):
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        module(*inputs)
    by_op = {str(op).removeprefix("aten."): flops / 2 for op, flops in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops() / 2, by_op


def peak_activation_bytes(module, inputs):
    """Peak of (bytes allocated - bytes freed) by the CPU allocator during one forward, from profiler events."""
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        module(*inputs)

    def walk(events):
        for event in events:
            yield event
            yield from walk(event.children)

    tree = prof.profiler.kineto_results.experimental_event_tree()
    allocations = sorted(
        (e.start_time_ns, e.extra_fields.alloc_size) for e in walk(tree) if e.tag == _EventType.Allocation
    )
    return max(itertools.accumulate((size for _, size in allocations), initial=0))


class GemmRecorder(TorchDispatchMode):
    """Records the operand shapes of every matrix product a forward runs (mm, addmm, bmm, baddbmm, mv, and the two
    products inside the CPU SDPA kernel), to replay them as plain `torch.matmul` calls."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func._overloadpacket
        if packet in (aten.mm, aten.bmm, aten.mv):
            self.shapes.append((tuple(args[0].shape), tuple(args[1].shape)))
        elif packet in (aten.addmm, aten.baddbmm):
            self.shapes.append((tuple(args[1].shape), tuple(args[2].shape)))
        elif packet is aten._scaled_dot_product_flash_attention_for_cpu:
            query, key, value = args[:3]
            *lead, queries, dim = query.shape
            batch = math.prod(lead)
            self.shapes.append(((batch, queries, dim), (batch, dim, key.shape[-2])))
            self.shapes.append(((batch, queries, key.shape[-2]), (batch, value.shape[-2], value.shape[-1])))
        elif packet in (aten.convolution, aten._scaled_dot_product_attention_math):
            raise NotImplementedError(f"GemmRecorder does not replay {packet}")
        else:
            # Composite ops (linear, matmul, scaled_dot_product_attention) reach the mode whole under inference mode:
            # run their decomposition so that the products above come through (as FlopCounterMode does).
            with self:
                out = func.decompose(*args, **(kwargs or {}))
            if out is not NotImplemented:
                return out
        return func(*args, **(kwargs or {}))


class MatmulReplay:
    """Runs the recorded products with `torch.matmul` on random fp32 operands (allocated once)."""

    def __init__(self, shapes):
        self.operands = [(torch.randn(a), torch.randn(b)) for a, b in shapes]
        self.macs = sum(math.prod(a) * (b[-1] if len(b) > 1 else 1) for a, b in shapes)

    def __call__(self):
        for a, b in self.operands:
            torch.matmul(a, b)


def record_gemms(module, inputs):
    with torch.inference_mode(), GemmRecorder() as recorder:
        module(*inputs)
    return recorder.shapes


def shape_name(shape):
    """'batch x m x k x n' of a recorded product (mv: 'm x k x 1')."""
    a, b = shape
    return " x ".join(str(d) for d in (*a, b[-1] if len(b) > 1 else 1))


def time_in_turns(entries, warmup, runs, progress=False):
    """Latency in ms of each entry's `call`: every round runs every entry once, in turns (A, B, A, B, ...: a shared
    machine's slow spells hit all alike). Sets median, IQR, min and the per-round times on each entry."""
    samples = [[] for _ in entries]
    with torch.inference_mode():
        for step in range(warmup + runs):
            for entry, times in zip(entries, samples, strict=True):
                start = time.perf_counter()
                entry["call"]()
                if step >= warmup:
                    times.append((time.perf_counter() - start) * 1e3)
            if progress:
                print(f"  round {step + 1}/{warmup + runs} done", flush=True)
    for entry, times in zip(entries, samples, strict=True):
        q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
        entry.update(median=median, iqr=q3 - q1, min=min(times), times=times)


def paired_ratio(entry: dict, reference: dict, quartiles: bool = False):
    """Median over rounds of entry's time / reference's time in the same round (with the quartiles if asked)."""
    ratios = [a / b for a, b in zip(entry["times"], reference["times"], strict=True)]
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return (median, q1, q3) if quartiles else median


def measure(name, module):
    is_resampler = isinstance(module, MSResampler)
    inputs = (torch.randn(1, NUM_TOKENS, VISION_WIDTH),) + ((GRID,) if is_resampler else ())
    with torch.inference_mode():
        module(*inputs)  # fills the resampler's scope-bias cache
    macs, by_op = count_macs(module, inputs)
    gemms = collections.Counter(record_gemms(module, inputs))
    gemm_macs = sum(count * MatmulReplay([shape]).macs for shape, count in gemms.items())
    if gemm_macs != macs:
        raise SystemExit(f"{name}: the recorded products hold {gemm_macs} MACs, FlopCounterMode counts {macs}")
    attn = module.config._attn_implementation if is_resampler else "-"
    cache = sum(t.numel() * t.element_size() for t in getattr(module, "_bias_cache", {}).values())
    return dict(
        name=name,
        call=lambda: module(*inputs),
        macs=macs,
        hand=hand_count(module),
        by_op=by_op,
        gemms=gemms,
        attn=attn,
        tokens=module.config.num_queries if is_resampler else NUM_TOKENS,
        cache=cache,
        params=sum(p.numel() for p in module.parameters()),
        peak=peak_activation_bytes(module, inputs),
    )


def add_ceiling(result, shapes):
    """The matmul ceiling of one projector from the shapes' times: per round, sum of count x that round's time.
    `result` holds the projector's `gemms` (shape: count) and times; `shapes` each shape's times."""
    rounds = range(len(result["times"]))
    ceiling = [sum(n * shapes[s]["times"][i] for s, n in result["gemms"].items()) for i in rounds]
    result["ceiling_median"] = sum(n * shapes[s]["median"] for s, n in result["gemms"].items())
    result["ceiling_min"] = sum(n * shapes[s]["min"] for s, n in result["gemms"].items())
    result["share_median"] = result["ceiling_median"] / result["median"]
    result["share_min"] = result["ceiling_min"] / result["min"]
    result["share_paired"] = statistics.median(c / t for c, t in zip(ceiling, result["times"], strict=True))


def load_average():
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def timed_at(threads, entries, args):
    """Times every entry in interleaved rounds on `threads` threads; returns each entry's timing, by position."""
    torch.set_num_threads(threads)
    print(f"torch.set_num_threads({threads}): {args.warmup} warm-up + {args.runs} timed rounds", flush=True)
    load = load_average()
    time_in_turns(entries, args.warmup, args.runs, progress=True)
    load = f"{load}, then {load_average()}"
    return load, [{key: entry[key] for key in ("median", "iqr", "min", "times")} for entry in entries]


def render(results, shapes, runs, args, command):
    """`runs`: per thread count, (load, {projector name: timing with its ceiling}, {shape: timing})."""
    mlp = results[0]
    ms144 = next(r for r in results if r["name"].startswith("MS-Resampler") and r["tokens"] == 144)
    lines = [
        "## Projector cost and the matmul ceiling (LLaVA-1.5-7B dimensions, per image)",
        "",
        f"- Machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, transformers"
        f" {transformers.__version__}, Python {platform.python_version()};"
        f" {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; 1/5/15-min load average before and"
        " after the timed rounds: "
        + "; ".join(f"{load} ({threads} thread{'s' * (threads > 1)})" for threads, (load, _, _) in runs.items())
        + ".",
        f"- Reproduce: `{command}`",
        f"- Input: 1 x {NUM_TOKENS} x {VISION_WIDTH} (CLIP ViT-L/14-336, {GRID[0]}x{GRID[1]} grid), output width"
        f" {TEXT_WIDTH}; fp32, batch 1, CPU, `torch.inference_mode()`.",
        f"- Latency: per thread count, {args.runs} timed rounds after {args.warmup} warm-up rounds; each round runs"
        " every projector and every distinct matrix-product shape below once, in turns, so that slow spells of a"
        " shared machine hit all rows alike; 'x MLP' divides medians (and, in brackets, minima).",
        "- GMACs: `FlopCounterMode` FLOPs / 2 (matmul-like ops only, plus formulas for the CPU SDPA kernel and"
        " `aten.mv` which it does not count); 'hand' is the analytic count of the same matmuls; the products recorded"
        " for the ceiling hold exactly these MACs.",
        "- Peak act.: peak of bytes allocated minus freed by PyTorch's CPU allocator during one forward (torch.profiler"
        " allocation events), output included; weights, input and the cached scope bias ('bias cache',"
        " persistent after the first call) are not included.",
        "- Matmul ceiling: every matrix product a projector runs (the two inside the CPU SDPA kernel included) timed"
        " alone as `torch.matmul` at its shapes, summed over the projector's products: the time its MACs take at this"
        " machine's matmul rate for those shapes. GFLOP/s = 2 x MACs / latency. Share = ceiling / latency = achieved"
        " rate / the matmul rate at its own shapes; from medians, minima, and the median over rounds of the"
        " per-round share.",
        "",
        "| Projector | Attn | Tokens to LLM | GMACs | hand GMACs | x MLP MACs | Params (M) | Peak act. (MiB)"
        " | Bias cache (MiB) |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['attn']} | {r['tokens']} | {r['macs'] / 1e9:.3f} | {r['hand'] / 1e9:.3f}"
            f" | {r['macs'] / mlp['macs']:.3f} | {r['params'] / 1e6:.2f} | {r['peak'] / 2**20:.1f}"
            f" | {r['cache'] / 2**20:.1f} |"
        )
    goals = []
    for threads, (_, timing, _) in runs.items():
        lines += [
            "",
            f"Latency and the matmul ceiling, torch.set_num_threads({threads}):",
            "",
            "| Projector | Attn | M | Latency median (ms) | IQR (ms) | min (ms) | x MLP latency (min) | GFLOP/s median"
            " (min) | ceiling median (min) (ms) | share median | share min | share per round |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        base = timing[mlp["name"], mlp["attn"]]
        for r in results:
            t = timing[r["name"], r["attn"]]
            gflop = 2 * r["macs"] / 1e6  # per ms
            lines.append(
                f"| {r['name']} | {r['attn']} | {r['tokens']} | {t['median']:.1f} | {t['iqr']:.1f} | {t['min']:.1f}"
                f" | {t['median'] / base['median']:.3f} ({t['min'] / base['min']:.3f})"
                f" | {gflop / t['median']:.1f} ({gflop / t['min']:.1f}) | {t['ceiling_median']:.1f}"
                f" ({t['ceiling_min']:.1f}) | {t['share_median']:.2f} | {t['share_min']:.2f}"
                f" | {t['share_paired']:.2f} |"
            )
        if any(timing[r["name"], r["attn"]]["median"] > 1.5 * timing[r["name"], r["attn"]]["min"] for r in results):
            lines += ["", "Some medians are over 1.5x the fastest round: the CPU was contended during these rounds."]
        t = timing[ms144["name"], ms144["attn"]]
        latency = (t["median"] / base["median"], t["min"] / base["min"])
        goals += [
            f"- Goal (issue 26), {threads} thread{'s' * (threads > 1)}: MS-Resampler M=144 latency <="
            f" {GOAL_LATENCY}x the MLP's: {latency[0]:.3f} (medians), {latency[1]:.3f} (minima):"
            f" **{'PASS' if max(latency) <= GOAL_LATENCY else 'FAIL'}**; its matmul ceiling alone is"
            f" {t['ceiling_median'] / base['median']:.3f} ({t['ceiling_min'] / base['min']:.3f}) x the MLP's latency."
            f" At >= {GOAL_SHARE:.0%} of the matmul rate at its own shapes: {t['share_median']:.0%} (medians),"
            f" {t['share_min']:.0%} (minima), {t['share_paired']:.0%} (per round):"
            f" **{'PASS' if min(t['share_median'], t['share_min']) >= GOAL_SHARE else 'FAIL'}**.",
        ]
    lines += [
        "",
        f"`torch.matmul` at {ms144['name']}'s own shapes (batch x m x k x n; the SDPA rows are the kernel's two"
        " products, the fusion's are its baddbmm layers), timed in the same rounds; median (min) ms and GFLOP/s:",
        "",
        "| Shape | Count | GMACs | " + " | ".join(f"{t} thread(s): ms | GFLOP/s" for t in runs) + " |",
        "|---|--:|--:|" + "--:|--:|" * len(runs),
    ]
    for shape, count in sorted(ms144["gemms"].items(), key=lambda item: -shapes[item[0]]["macs"]):
        gflop = 2 * shapes[shape]["macs"] / 1e6
        cells = []
        for _, _, shape_timing in runs.values():
            t = shape_timing[shape]
            cells.append(f"{t['median']:.2f} ({t['min']:.2f}) | {gflop / t['median']:.1f} ({gflop / t['min']:.1f})")
        lines.append(f"| {shape_name(shape)} | {count} | {shapes[shape]['macs'] / 1e9:.3f} | {' | '.join(cells)} |")
    ops = sorted({op for r in results for op in r["by_op"]})
    lines += ["", "GMACs by op:", "", f"| Projector | Attn | {' | '.join(ops)} |", "|---|---|" + "--:|" * len(ops)]
    for r in results:
        cells = " | ".join(f"{r['by_op'].get(op, 0) / 1e9:.3f}" for op in ops)
        lines.append(f"| {r['name']} | {r['attn']} | {cells} |")
    gmacs = ms144["macs"] / 1e9
    lines += [
        "",
        f"- Budget (paper Table 7): MS-Resampler M=144 {gmacs:.3f} GMACs <= {BUDGET_GMACS}:"
        f" **{'PASS' if gmacs <= BUDGET_GMACS else 'FAIL'}**",
        f"- Aim: MS-Resampler M=144 {gmacs:.3f} GMACs <= {AIM_GMACS}: **{'PASS' if gmacs <= AIM_GMACS else 'FAIL'}**",
        *goals,
    ]
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_path = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
    parser.add_argument("--write", type=Path, default=default_path, help="Markdown file to update (BENCHMARKS.md)")
    parser.add_argument("--no-write", action="store_true", help="only print the section")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        help="torch thread counts, each timed in rounds of its own (default: 1 and the usable CPU cores)",
    )
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    thread_counts = list(dict.fromkeys(args.threads or [1, cores]))
    torch.set_num_threads(thread_counts[-1])
    torch.manual_seed(0)
    command = "python benchmarks/projector_cost.py" + "".join(
        f" --{name} {getattr(args, name)}"
        for name in ("runs", "warmup")
        if getattr(args, name) != parser.get_default(name)
    )
    if args.threads:
        command += " --threads " + " ".join(map(str, args.threads))

    builders = [("LLaVA MLP projector", build_mlp)]
    for q in (144, 64, 36):
        builders.append((f"Resampler k=[24], beta=0, M={q}", lambda q=q: build_resampler(q, [24], 0.0)))
    for q in (144, 64, 36):
        builders.append((f"MS-Resampler k=[2,6,24], M={q}", lambda q=q: build_resampler(q, [2, 6, 24], 5.0)))
    builders.append(("MS-Resampler k=[2,6,24], M=144", lambda: build_resampler(144, [2, 6, 24], 5.0, attn="eager")))

    results = []
    for name, build in builders:
        results.append(r := measure(name, build()))
        print(f"  {name} ({r['attn']}): {r['macs'] / 1e9:.3f} GMACs (hand count {r['hand'] / 1e9:.3f})", flush=True)
        if abs(r["macs"] - r["hand"]) > 0.01 * r["hand"]:
            print("  WARNING: the measured MACs differ from the hand count by more than 1%")
    shapes = {shape: {} for r in results for shape in r["gemms"]}
    for shape, entry in shapes.items():
        replay = MatmulReplay([shape])
        entry.update(call=replay, macs=replay.macs)
    print(f"{len(results)} projectors and {len(shapes)} product shapes, timed in turns", flush=True)
    runs = {}
    for threads in thread_counts:
        load, timings = timed_at(threads, results + list(shapes.values()), args)
        timing = {(r["name"], r["attn"]): t for r, t in zip(results, timings, strict=False)}
        shape_timing = dict(zip(shapes, timings[len(results) :], strict=True))
        for r in results:
            timing[r["name"], r["attn"]]["gemms"] = r["gemms"]
            add_ceiling(timing[r["name"], r["attn"]], shape_timing)
        runs[threads] = (load, timing, shape_timing)

    gmacs = next(r for r in results if r["name"].startswith("MS-Resampler") and r["tokens"] == 144)["macs"] / 1e9
    section = "\n".join(render(results, shapes, runs, args, command))
    print("\n" + section)
    if not args.no_write:
        write_section(args.write, section, START, END)
        print(f"\nwrote {args.write}")
    if gmacs > BUDGET_GMACS:
        raise SystemExit(f"MS-Resampler M=144 costs {gmacs:.3f} GMACs, over the {BUDGET_GMACS} GMACs budget")


if __name__ == "__main__":
    main()
