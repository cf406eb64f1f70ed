"""End-to-end cost of MS-LLaVA (M = 144 / 64 / 36) against LLaVA-1.5's 576-token MLP projector at LLaVA-1.5-7B widths,
with the 32-layer figures extrapolated from two measured depths of the language model.

Models (random weights, batch 1, `torch.inference_mode()`): the full CLIP ViT-L/14-336 tower (24 layers, width 1024,
16 heads, MLP 4096; 336 px, patch 14: 576 patch tokens + CLS, LLaVA's layer -2 without CLS) and a language model of
Llama-2-7B's widths (hidden 4096, 32 heads, MLP 11008, vocabulary 32064 as llava-hf/llava-1.5-7b-hf) with only
`--layers` decoder layers: two depths, the shallower model's layers being the first layers of the deeper one (the very
same modules). The baseline is transformers' `LlavaForConditionalGeneration` (MLP projector, 576 image tokens);
MS-LLaVA uses k = 2/6/24, beta = 5, channel-MLP fusion, D = 1024 over 16 heads. All variants share the tower, the
language model and the LM head, so only the projector and the number of image tokens differ. Prompt: <s>, 4 text
tokens, the image's tokens, 35 text tokens (40 text tokens, LLaVA-1.5's chat layout).

Measured in one run, interleaved: every round runs every variant at both depths once, in a rotating order, so that
slow spells of a shared machine hit all alike. On the CPU with one thread (the default) the times are the process's
CPU time, which leaves out the preemption by other jobs that a shared machine's wall clock counts (`--clock wall`):

* prefill: one forward of the prompt with its image (tower + projector + LLM prefill, KV cache filled, logits of the
  last position), as `generate` does before its first token;
* decode: `--new-tokens` greedy tokens, one forward each with the KV cache (eos never stops it); tokens/s;
* KV cache: bytes of the cache's keys and values after the prefill, checked against layers x 2 x heads x head_dim x
  sequence length x bytes;
* prefill FLOPs, counted once per variant and depth with `FlopCounterMode` (matrix products, with projector_cost.py's
  formula for the CPU SDPA kernel; the language model's causal attention counts as full);
* a check, once per variant and depth, that `model.generate` (greedy) gives the timed loop's tokens (reported).

The 32-layer figures: every decoder layer costs the same, so each figure is fixed + layers x per-layer. The two depths
L1 < L2 give per-layer = (f(L2) - f(L1)) / (L2 - L1) and fixed = f(L1) - L1 x per-layer, and the estimate is fixed +
32 x per-layer: for the prefill time and the time per decoded token from their medians (and, as a check, the median
over rounds of each round's own extrapolated ratio), for FLOPs and KV bytes exactly.

Run `python benchmarks/end_to_end_7b.py` from the repository root (CPU, fp32, one thread, depths 2 and 6: about 7.5 GB
of weights, 8 GiB peak RSS); it rewrites its section of BENCHMARKS.md. benchmarks/gpu_benchmarks.py runs the same
measurement on a GPU at 32 layers.
"""

import argparse
import datetime
import os
import platform
import resource
import statistics
from pathlib import Path

import torch
import transformers
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModel, LlavaConfig, LlavaForConditionalGeneration

from generation_speed import (
    BETA,
    DIMS,
    IMAGE_TOKEN_ID,
    PROMPT_BEFORE,
    QUERIES,
    SCOPE_WINDOWS,
    configs,
    formula_bytes,
    prompt_ids,
    run_generate,
    run_once,
)
from markdown_section import cpu_model, write_section
from ms_llava.configuration_ms_llava import MSLlavaConfig
from ms_llava.modeling_ms_llava import MSLlavaForConditionalGeneration, MSResampler
from projector_cost import EXTRA_FLOP_FORMULAS

START, END = "<!-- end_to_end_7b:start -->", "<!-- end_to_end_7b:end -->"
ROOT = Path(__file__).resolve().parents[1]
TEXT_AFTER = 35  # with the 5 before the image: 40 text tokens
TARGET_LAYERS = 32  # Llama-2-7B
GOAL_PREFILL, GOAL_KV = 0.30, 0.25  # issue 26, at M = 144 and 32 layers


def shared_language_model(deepest: nn.Module, text_config, attn: str) -> nn.Module:
    """A language model of `text_config`'s depth made of `deepest`'s embeddings, first layers, norm and rotary
    tables."""
    if text_config.num_hidden_layers == deepest.config.num_hidden_layers:
        return deepest
    text_config._attn_implementation = attn
    with torch.device("meta"):  # no memory: every tensor is the deeper model's
        model = AutoModel.from_config(text_config)
    model.embed_tokens, model.norm, model.rotary_emb = deepest.embed_tokens, deepest.norm, deepest.rotary_emb
    model.layers = deepest.layers[: text_config.num_hidden_layers]
    return model.eval()


def variant_config(dims, layers, queries, attn):
    """A fresh LLaVA (576 tokens) or MS-LLaVA config: a composite config sets its sub-configs' attention implementation
    when built, so sub-configs shared with another model's config would lose theirs."""
    vision, text = configs(dims, layers)
    if queries == 576:
        config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID)
    else:
        resampler = {"num_queries": queries, "scope_windows": SCOPE_WINDOWS, "scope_bias_strength": BETA}
        config = MSLlavaConfig(
            vision_config=vision,
            text_config=text,
            resampler_config={**resampler, **DIMS[dims]["resampler"]},
            image_token_id=IMAGE_TOKEN_ID,
        )
    config._attn_implementation = attn
    return config


def build(layer_counts, dims, device, dtype, attn="sdpa"):
    """Rows (name, image tokens, layers, model) for the MLP baseline and the MS-LLaVA variants at each depth."""
    deepest = max(layer_counts)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            baseline = LlavaForConditionalGeneration(variant_config(dims, deepest, 576, attn)).eval()
            projectors = {576: baseline.model.multi_modal_projector}
            for queries in QUERIES:
                projectors[queries] = MSResampler(variant_config(dims, deepest, queries, "sdpa")).eval()
                projectors[queries].reset_parameters()  # its init runs from an enclosing model's post_init otherwise
    finally:
        torch.set_default_dtype(previous)
    rows = []
    for layers in sorted(layer_counts):
        language_model = shared_language_model(baseline.model.language_model, configs(dims, layers)[1], attn)
        for queries in (576, *QUERIES):
            with torch.device("meta"):  # no memory: every module is replaced by a shared one
                config = variant_config(dims, layers, queries, attn)
                model = (LlavaForConditionalGeneration if queries == 576 else MSLlavaForConditionalGeneration)(config)
            model.model.vision_tower = baseline.model.vision_tower
            model.model.multi_modal_projector = projectors[queries]
            model.model.language_model = language_model
            model.lm_head = baseline.lm_head
            model.eval().generation_config.eos_token_id = None  # a fixed number of new tokens
            model.generation_config.pad_token_id = 0
            if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
                raise RuntimeError(f"a tensor of the {queries}-token model at {layers} layers was left on meta")
            name = "LLaVA-1.5 MLP (576 tokens)" if queries == 576 else f"MS-LLaVA M={queries}"
            rows.append(dict(name=name, image_tokens=queries, layers=layers, model=model))
    return rows


def extrapolate(depths, values, target=TARGET_LAYERS):
    """(fixed, per layer, value at `target` layers) of the line through (depths[0], values[0]) and
    (depths[1], values[1])."""
    per_layer = (values[1] - values[0]) / (depths[1] - depths[0])
    fixed = values[0] - depths[0] * per_layer
    return fixed, per_layer, fixed + target * per_layer


def count_prefill_flops(model, inputs):
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        model(**inputs, use_cache=True, logits_to_keep=1)
    return counter.get_total_flops()


def measure(rows, device, dtype, rounds, warmup, new_tokens, clock="wall"):
    """Times every row in interleaved rounds; `clock` "cpu" takes the process CPU time (one thread), "wall" the wall
    time, for the figures (the wall-clock prefill median is kept beside them)."""
    which = 1 if clock == "cpu" else 0
    pixel_values = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    for row in rows:
        ids = prompt_ids(row["image_tokens"], device, torch.Generator().manual_seed(1), TEXT_AFTER)
        row.update(inputs=dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values))
        row.update(seq_len=ids.shape[1], prefill=[], decode=[], prefill_wall=[])
    for step in range(warmup + rounds):
        for row in rows[step % len(rows) :] + rows[: step % len(rows)]:  # rotate who goes first
            if step == 0:
                row["flops"] = count_prefill_flops(row["model"], row["inputs"])
            prefill, decode, kv, tokens = run_once(row["model"], row["inputs"], new_tokens, device)
            if step == 0:  # the timed loop decodes what generate() does (reported: low precision may flip a tie)
                generated = run_generate(row["model"], row["inputs"], new_tokens + 1, device)
                row["kv"], row["agrees"] = kv, torch.equal(generated, tokens)
                expected = formula_bytes(row["model"].config.text_config, row["seq_len"], dtype)
                if kv != expected:
                    raise RuntimeError(f"{row['name']}: KV cache {kv} bytes, the formula gives {expected}")
            if step >= warmup:
                row["prefill"].append(prefill[which] * 1e3)
                row["decode"].append(decode[which] * 1e3 / new_tokens)  # ms per token
                row["prefill_wall"].append(prefill[0] * 1e3)
        print(f"  round {step + 1}/{warmup + rounds}{' (warm-up)' if step < warmup else ''} done", flush=True)
    for row in rows:
        row["prefill_median"], row["prefill_min"] = statistics.median(row["prefill"]), min(row["prefill"])
        row["prefill_wall_median"] = statistics.median(row["prefill_wall"])
        row["token_median"], row["token_min"] = statistics.median(row["decode"]), min(row["decode"])


def at_target(rows):
    """Per variant: the 32-layer estimates from the two depths (and per round for the prefill and decode ratios)."""
    variants = {}
    for row in rows:
        variants.setdefault(row["name"], []).append(row)
    estimates = []
    for name, (low, high) in variants.items():
        depths = (low["layers"], high["layers"])
        estimate = dict(name=name, image_tokens=low["image_tokens"], depths=depths)
        for key in ("prefill_median", "token_median", "flops", "kv"):
            estimate[key] = extrapolate(depths, (low[key], high[key]))
        estimate["seq_len"] = low["seq_len"]
        estimate["prefill_rounds"] = [
            extrapolate(depths, pair)[2] for pair in zip(low["prefill"], high["prefill"], strict=True)
        ]
        estimate["token_rounds"] = [
            extrapolate(depths, pair)[2] for pair in zip(low["decode"], high["decode"], strict=True)
        ]
        estimates.append(estimate)
    return estimates


def per_round_ratio(estimate, baseline, key):
    return statistics.median(a / b for a, b in zip(estimate[key], baseline[key], strict=True))


def render(rows, estimates, args, device, dtype, load, command):
    text = rows[-1]["model"].config.text_config
    vision = rows[-1]["model"].config.vision_config
    machine = (
        f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
        if device.type == "cuda"
        else f"{cpu_model()}, {os.cpu_count()} cores, torch.set_num_threads({torch.get_num_threads()})"
    )
    lines = [
        f"## End to end at {'LLaVA-1.5-7B widths' if args.dims == '7b' else args.dims + ' test sizes'}"
        f" ({device.type.upper()}, {str(dtype).removeprefix('torch.')})",
        "",
        f"- Machine: {machine}; torch {torch.__version__}, transformers {transformers.__version__}, Python"
        f" {platform.python_version()}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC;"
        f" 1/5/15-min load average {load} (before and after the timed rounds); peak RSS"
        f" {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB.",
        f"- Reproduce: `{command}`",
        f"- Models: CLIP ViT-L/14-336 tower ({vision.num_hidden_layers} layers, width {vision.hidden_size}); language"
        f" model of Llama-2-7B's widths (hidden {text.hidden_size}, {text.num_attention_heads} heads, MLP"
        f" {text.intermediate_size}, vocabulary {text.vocab_size}) at {args.layers[0]} and {args.layers[1]} decoder"
        " layers (the shallower made of the deeper one's first layers); random weights, batch 1, `sdpa` attention,"
        " `torch.inference_mode()`; all variants share the tower, the language model and the LM head. MS-LLaVA: k ="
        f" {SCOPE_WINDOWS}, beta = {BETA:g}, channel-MLP fusion.",
        f"- Prompt: {PROMPT_BEFORE} text tokens (<s> first), the image's tokens, {TEXT_AFTER} text tokens. Prefill:"
        " one forward of the prompt with its image (tower + projector + LLM, KV cache filled, last position's"
        f" logits). Decode: {args.new_tokens} greedy tokens with the KV cache, checked against `model.generate`."
        " KV cache: bytes after the prefill, checked against layers x 2 x heads x head_dim x length x bytes. FLOPs:"
        " `FlopCounterMode` on one prefill (matrix products; the causal attention counted as full).",
        f"- {args.rounds} timed rounds after {args.warmup} warm-up round(s); every round runs every variant at both"
        " depths once, in a rotating order; medians (minima in brackets); 'x MLP' compares with the MLP baseline at"
        " the same depth. "
        + (
            "Times are the process's CPU time (one thread): other jobs on a shared machine preempt the run, which the"
            " wall clock counts and the CPU time does not (it still counts their contention for caches and memory);"
            " the wall-clock prefill median is beside them."
            if args.clock == "cpu"
            else "Times are wall-clock times."
        ),
        "",
        "| Model | Layers | Seq. length | Prefill median (min) ms | x MLP | wall median (ms) | Decode tokens/s"
        " median (max) | x MLP | KV cache (MiB) | x MLP | Prefill GFLOPs | x MLP |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        mlp = next(r for r in rows if r["layers"] == row["layers"] and r["image_tokens"] == 576)
        lines.append(
            f"| {row['name']} | {row['layers']} | {row['seq_len']} | {row['prefill_median']:.0f}"
            f" ({row['prefill_min']:.0f}) | {row['prefill_median'] / mlp['prefill_median']:.3f}"
            f" | {row['prefill_wall_median']:.0f}"
            f" | {1e3 / row['token_median']:.2f} ({1e3 / row['token_min']:.2f})"
            f" | {mlp['token_median'] / row['token_median']:.3f} | {row['kv'] / 2**20:.1f}"
            f" | {row['kv'] / mlp['kv']:.3f}"
            f" | {row['flops'] / 1e9:.0f} | {row['flops'] / mlp['flops']:.3f} |"
        )
    low, high = args.layers
    lines += [
        "",
        f"Extrapolated to {TARGET_LAYERS} layers: each figure f = fixed + layers x per-layer through its values at"
        f" {low} and {high} layers (per-layer = (f({high}) - f({low})) / {high - low}, fixed = f({low}) - {low} x"
        f" per-layer), from the medians; 'per round' is the median over rounds of each round's own extrapolated"
        " ratio. FLOPs and KV bytes are exact linear functions of the depth.",
        "",
        "| Model | Prefill fixed (ms) | per layer (ms) | Prefill at 32 (s) | x MLP | x MLP per round | Decode at 32"
        " (tokens/s) | x MLP | KV cache at 32 (MiB) | x MLP | Prefill TFLOPs at 32 | x MLP |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    mlp = estimates[0]
    for e in estimates:
        fixed, per_layer, prefill = e["prefill_median"]
        lines.append(
            f"| {e['name']} | {fixed:.0f} | {per_layer:.0f} | {prefill / 1e3:.2f}"
            f" | {prefill / mlp['prefill_median'][2]:.3f} | {per_round_ratio(e, mlp, 'prefill_rounds'):.3f}"
            f" | {1e3 / e['token_median'][2]:.2f} | {mlp['token_median'][2] / e['token_median'][2]:.3f}"
            f" | {e['kv'][2] / 2**20:.0f} | {e['kv'][2] / mlp['kv'][2]:.3f} | {e['flops'][2] / 1e12:.2f}"
            f" | {e['flops'][2] / mlp['flops'][2]:.3f} |"
        )
    differ = [f"{r['name']} at {r['layers']} layers" for r in rows if not r["agrees"]]
    agreed = "yes, for every row" if not differ else "NO for " + ", ".join(differ)
    lines += ["", f"`model.generate` (greedy) gave the timed loop's tokens: {agreed}."]
    ms = next(e for e in estimates if e["image_tokens"] == 144)
    prefill = ms["prefill_median"][2] / mlp["prefill_median"][2]
    image_kv = 144 / 576
    lines += [
        "",
        f"- Goal (issue 26): prefill at M = 144 <= {GOAL_PREFILL}x LLaVA-1.5's at {TARGET_LAYERS} layers:"
        f" {prefill:.3f} (medians), {per_round_ratio(ms, mlp, 'prefill_rounds'):.3f} (per round):"
        f" **{'PASS' if prefill <= GOAL_PREFILL else 'FAIL'}**. Its FLOPs are"
        f" {ms['flops'][2] / mlp['flops'][2]:.3f}x ({ms['flops'][2] / 1e12:.2f} vs {mlp['flops'][2] / 1e12:.2f}"
        " TFLOPs, the tower's included); the paper's 0.246x (0.94 vs 3.82 T) counts the language model alone.",
        f"- KV cache at M = 144: {ms['kv'][2] / mlp['kv'][2]:.3f}x for the whole prompt ({ms['seq_len']} vs"
        f" {mlp['seq_len']} positions); the image's part is {image_kv:.2f}x (144 vs 576 positions) by construction"
        f" (goal {GOAL_KV}x).",
    ]
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--layers",
        type=int,
        nargs=2,
        default=[2, 6],
        help="the two depths of the language model (the further apart, the less the 32-layer estimate magnifies noise;"
        " 6 layers hold about 7.5 GB of fp32 weights in all)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads on the CPU (default 1: on a shared machine, a second thread stalls every op while the"
        " other core is busy, and the prefill times scatter several fold)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        help="cpu: the process's CPU time (one thread only); wall: wall-clock time (default: cpu on the CPU with one"
        " thread, else wall)",
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--dims", choices=sorted(DIMS), default="7b", help="'tiny' for the tests")
    parser.add_argument("--write", type=Path, default=ROOT / "BENCHMARKS.md", help="Markdown file to update")
    parser.add_argument("--no-write", action="store_true", help="only print the section")
    args = parser.parse_args(argv)
    if not 1 <= args.layers[0] < args.layers[1]:
        parser.error(f"--layers takes two depths L1 < L2, both >= 1; got {args.layers[0]} {args.layers[1]}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    one_thread_cpu = device.type == "cpu" and args.threads == 1
    if args.clock == "cpu" and not one_thread_cpu:
        parser.error("--clock cpu needs --device cpu and --threads 1 (CPU time adds up every thread's)")
    args.clock = args.clock or ("cpu" if one_thread_cpu else "wall")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    command = "python benchmarks/end_to_end_7b.py" + "".join(
        f" --{name.replace('_', '-')} {' '.join(map(str, value)) if isinstance(value, list) else value}"
        for name, value in vars(args).items()
        if name not in ("write", "no_write", "clock") and value != parser.get_default(name)
    )

    print(f"building the variants ({args.dims}, layers {args.layers}, {dtype}, {device})", flush=True)
    rows = build(args.layers, args.dims, device, dtype)
    print(f"timing {len(rows)} rows in turns: {args.warmup} warm-up + {args.rounds} rounds", flush=True)
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    measure(rows, device, dtype, args.rounds, args.warmup, args.new_tokens, args.clock)
    load += ", then " + " / ".join(f"{x:.1f}" for x in os.getloadavg())
    estimates = at_target(rows)
    section = "\n".join(render(rows, estimates, args, device, dtype, load, command))
    print("\n" + section)
    if not args.no_write:
        write_section(args.write, section, START, END)
        print(f"\nwrote {args.write}")
    return rows, estimates


if __name__ == "__main__":
    main()
