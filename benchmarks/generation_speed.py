"""End-to-end speed of MS-LLaVA (M = 144 / 64 / 36) against LLaVA-1.5's 576-token MLP projector, random weights.

Every variant shares one vision tower (CLIP ViT-L/14-336 layout: 336 px, patch 14, a 24 x 24 grid of N = 576 tokens,
CLS dropped) and one language model (Llama-2-7B layout) with its LM head: the very same modules, so that only the
projector and the number of visual tokens in the prompt differ. The prompt is LLaVA-1.5's: 5 text tokens, the image's
tokens (576 for the MLP, M for MS-LLaVA), then 30 text tokens. Batch 1. Measured, interleaved round by round (every
round runs every variant once, in a rotating order, so that slow spells of a shared machine hit all variants alike):

* prefill latency: one forward of the whole prompt with its image (vision tower + projector + LLM prefill, KV cache
  filled, logits of the last position only), as `generate` does before the first token;
* decode tokens/s: greedy decoding of `--new-tokens` tokens, one forward per token with the KV cache (eos never
  stops it: the argmax is taken over the logits, whatever it is);
* a check, once per variant, that `model.generate` (greedy, eos disabled) produces exactly the tokens of the timed
  loop;
* KV-cache memory after prefill: the bytes of the cache's key and value tensors, checked against
  layers x 2 x kv_heads x head_dim x sequence length x bytes per element.

`--dims 7b` (the default with `--device cuda`) builds the full LLaVA-1.5-7B dimensions: CLIP ViT-L/14-336 (24 layers,
width 1024) and Llama-2-7B (32 layers, width 4096, 32 heads, MLP 11008, vocabulary 32064), fp16. `--dims reduced` (the
default on the CPU) keeps the image size, patch, grid and token counts (576 vs 144 / 64 / 36) and the MS-Resampler's
windows, and shrinks the widths and depths (see REDUCED below), in fp32.

Run `python benchmarks/generation_speed.py` from the repository root (CPU, reduced dimensions, a few minutes); it
rewrites its section of BENCHMARKS.md and the plot benchmarks/generation_speed.png. On a GPU:
`python benchmarks/generation_speed.py --device cuda --dims 7b --dtype float16`.
"""

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from PIL import Image, ImageDraw, ImageFont
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from markdown_section import cpu_model, write_section
from ms_llava.configuration_ms_llava import MSLlavaConfig
from ms_llava.modeling_ms_llava import MSLlavaForConditionalGeneration, MSResampler

START, END = "<!-- generation_speed:start -->", "<!-- generation_speed:end -->"
ROOT = Path(__file__).resolve().parents[1]
IMAGE_TOKEN_ID, VOCAB = 32000, 32064  # llava-hf/llava-1.5-7b-hf
PROMPT_BEFORE, PROMPT_AFTER = 5, 30  # "<s> USER:" ... "<question> ASSISTANT:"
SCOPE_WINDOWS, BETA = [2, 6, 24], 5.0
QUERIES = (144, 64, 36)

DIMS = {
    "7b": {
        "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
        "text": dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
        ),
        "resampler": dict(hidden_size=1024, num_attention_heads=16),
    },
    # CPU: the 576-token grid, the token counts and the windows stay; widths and depths shrink.
    "reduced": {
        "vision": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4),
        "text": dict(
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=6,
            num_attention_heads=12,
            num_key_value_heads=12,
        ),
        "resampler": dict(hidden_size=256, num_attention_heads=4),
    },
    # the tests' (end_to_end_7b.py): the same grid and token counts, every width tiny
    "tiny": {
        "vision": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2),
        "text": dict(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4
        ),
        "resampler": dict(hidden_size=32, num_attention_heads=2),
    },
}
REDUCED = DIMS["reduced"]


def configs(dims, text_layers=None):
    """CLIP tower and Llama configs of `dims`; `text_layers` overrides the language model's depth."""
    vision = CLIPVisionConfig(image_size=336, patch_size=14, projection_dim=768, **DIMS[dims]["vision"])
    text = {**DIMS[dims]["text"], **({"num_hidden_layers": text_layers} if text_layers else {})}
    return vision, LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, **text)


def build_variants(dims, device, dtype):
    """The MLP baseline and the MS-LLaVA variants, sharing the baseline's vision tower, language model and LM head."""
    vision, text = configs(dims)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            base_config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID)
            base_config._attn_implementation = "sdpa"
            baseline = LlavaForConditionalGeneration(base_config).eval()
        variants = [("LLaVA MLP (576 tokens)", 576, baseline)]
        for queries in QUERIES:
            resampler = {
                "num_queries": queries,
                "scope_windows": SCOPE_WINDOWS,
                "scope_bias_strength": BETA,
                **DIMS[dims]["resampler"],
            }
            config = MSLlavaConfig(
                vision_config=vision, text_config=text, resampler_config=resampler, image_token_id=IMAGE_TOKEN_ID
            )
            config._attn_implementation = "sdpa"
            config.resampler_config._attn_implementation_internal = "sdpa"
            with torch.device("meta"):  # no memory: the big parts are the baseline's
                model = MSLlavaForConditionalGeneration(config)
            model.model.vision_tower = baseline.model.vision_tower
            model.model.language_model = baseline.model.language_model
            model.lm_head = baseline.lm_head
            with torch.device(device):
                model.model.multi_modal_projector = MSResampler(config)
            model.model.multi_modal_projector.reset_parameters()  # run by an enclosing model's post_init otherwise
            model.eval()
            variants.append((f"MS-LLaVA M={queries}", queries, model))
    finally:
        torch.set_default_dtype(previous)
    for _, _, model in variants:
        model.generation_config.eos_token_id = None  # never stop early: a fixed number of new tokens
        model.generation_config.pad_token_id = 0
        assert not any(p.is_meta for p in model.parameters())
    return variants


def prompt_ids(image_tokens, device, generator, text_after=PROMPT_AFTER):
    before = torch.randint(3, IMAGE_TOKEN_ID, (PROMPT_BEFORE,), generator=generator)
    after = torch.randint(3, IMAGE_TOKEN_ID, (text_after,), generator=generator)
    before[0] = 1  # <s>
    ids = torch.cat([before, torch.full((image_tokens,), IMAGE_TOKEN_ID), after])
    return ids[None].to(device)


def cache_bytes(cache):
    layers = getattr(cache, "layers", None)
    if layers is not None:
        tensors = [t for layer in layers for t in (layer.keys, layer.values)]
    else:  # older DynamicCache
        tensors = list(cache.key_cache) + list(cache.value_cache)
    return sum(t.numel() * t.element_size() for t in tensors)


def formula_bytes(text, seq_len, dtype):
    head_dim = text.hidden_size // text.num_attention_heads
    bytes_per = torch.empty((), dtype=dtype).element_size()
    return text.num_hidden_layers * 2 * text.num_key_value_heads * head_dim * seq_len * bytes_per


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def clocks():
    """(wall, process CPU) seconds: on a shared machine the CPU time of a one-thread run leaves out preemption."""
    return time.perf_counter(), time.process_time()


@torch.inference_mode()
def run_once(model, inputs, new_tokens, device):
    """One prefill + `new_tokens` greedy decode steps; returns the prefill's and the decode's (wall s, CPU s), the
    cache bytes and the tokens."""
    sync(device)
    start = clocks()
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    prefill = tuple(end - begin for end, begin in zip(clocks(), start, strict=True))
    cache = out.past_key_values
    kv = cache_bytes(cache)
    tokens = [token]
    start = clocks()
    for _ in range(new_tokens):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
    sync(device)
    decode = tuple(end - begin for end, begin in zip(clocks(), start, strict=True))
    return prefill, decode, kv, torch.cat(tokens, dim=-1)


@torch.inference_mode()
def run_generate(model, inputs, new_tokens, device):
    """The tokens of `model.generate` (greedy, eos disabled): the check that the timed loop decodes the same."""
    output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    generated = output[:, inputs["input_ids"].shape[1] :]
    assert generated.shape[1] == new_tokens, f"generate made {generated.shape[1]} tokens, expected {new_tokens}"
    return generated


def summary(samples):
    q1, median, q3 = statistics.quantiles(samples, n=4)
    return median, q3 - q1


def measure(variants, device, dtype, rounds, warmup, new_tokens):
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(1, 3, 336, 336, generator=generator).to(device=device, dtype=dtype)
    rows = []
    for name, image_tokens, model in variants:
        ids = prompt_ids(image_tokens, device, torch.Generator().manual_seed(1))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixel_values}
        rows.append(dict(name=name, image_tokens=image_tokens, model=model, inputs=inputs, prefill=[], decode=[]))
    for step in range(warmup + rounds):
        order = rows[step % len(rows) :] + rows[: step % len(rows)]  # rotate who goes first
        for row in order:
            (prefill, _), (decode, _), kv, tokens = run_once(row["model"], row["inputs"], new_tokens, device)
            if step >= warmup:
                row["prefill"].append(prefill * 1e3)
                row["decode"].append(new_tokens / decode)
            if step == 0:  # the timed loop decodes exactly what generate() does
                generated = run_generate(row["model"], row["inputs"], new_tokens + 1, device)
                assert torch.equal(generated, tokens), f"{row['name']}: the decode loop and generate() disagree"
            row["kv"], row["seq_len"] = kv, row["inputs"]["input_ids"].shape[1]
        print(f"  round {step + 1}/{warmup + rounds}{' (warm-up)' if step < warmup else ''} done", flush=True)
    text = variants[0][2].config.text_config
    for row in rows:
        row["prefill_median"], row["prefill_iqr"] = summary(row["prefill"])
        row["decode_median"], row["decode_iqr"] = summary(row["decode"])
        row["kv_formula"] = formula_bytes(text, row["seq_len"], dtype)
        assert row["kv"] == row["kv_formula"], (row["name"], row["kv"], row["kv_formula"])
    return rows


def machine(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    return f"{cpu_model()}, {os.cpu_count()} cores, torch.set_num_threads({torch.get_num_threads()})"


def render(rows, args, device, dtype, command):
    mlp = rows[0]
    vision, text = configs(args.dims)
    dims = DIMS[args.dims]
    if args.dims == "7b":
        described = (
            "LLaVA-1.5-7B dimensions: CLIP ViT-L/14-336 (24 layers, width 1024, 16 heads) and Llama-2-7B (32 layers,"
            " width 4096, 32 heads, MLP 11008, vocabulary 32064); MS-Resampler D = 1024, 16 heads"
        )
    else:
        described = (
            f"REDUCED dimensions (CPU): CLIP-style tower at 336 px / patch 14 (24 x 24 grid, 576 tokens + CLS) with"
            f" {vision.num_hidden_layers} layers of width {vision.hidden_size} ({vision.num_attention_heads} heads,"
            f" MLP {vision.intermediate_size}); Llama with {text.num_hidden_layers} layers of width {text.hidden_size}"
            f" ({text.num_attention_heads} heads, MLP {text.intermediate_size}, vocabulary {text.vocab_size});"
            f" MS-Resampler D = {dims['resampler']['hidden_size']}, {dims['resampler']['num_attention_heads']} heads."
            " Not the 7B model: the absolute times are not 7B times, and the split of the prefill between vision"
            " tower, projector and LLM differs from 7B's, so the ratios indicate, they do not measure, 7B's"
        )
    lines = [
        f"## Generation speed, end to end ({'LLaVA-1.5-7B dimensions' if args.dims == '7b' else 'reduced dimensions'},"
        f" {device.type.upper()})",
        "",
        f"- Machine: {machine(device)}; torch {torch.__version__}, transformers {transformers.__version__}, Python"
        f" {platform.python_version()}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC."
        + (
            " The machine was shared with other CPU-heavy jobs during the run: absolute times are noisy; the ratios"
            " come from this one interleaved run."
            if device.type == "cpu"
            else ""
        ),
        f"- Reproduce: `{command}`",
        f"- Models: {described}. Random weights, {str(dtype).removeprefix('torch.')}, batch 1, `sdpa` attention,"
        f" `torch.inference_mode()`. All variants share one vision tower, LLM and LM head (the same modules); MS-LLaVA"
        f" uses k = {SCOPE_WINDOWS}, beta = {BETA:g}, channel-MLP fusion.",
        f"- Prompt: {PROMPT_BEFORE} text tokens, the image's tokens, {PROMPT_AFTER} text tokens (sequence length"
        " below).",
        "- Prefill: one forward of the prompt with its image (vision tower + projector + LLM prefill, KV cache"
        " filled, last position's logits). Decode: greedy, one forward per token with the KV cache,"
        f" {args.new_tokens} new tokens after the prefill's (eos ignored); tokens/s = {args.new_tokens} / decode"
        " time. The script checks that `model.generate` (greedy, eos disabled) gives exactly the timed loop's tokens.",
        f"- KV cache: bytes of the key and value tensors after prefill; equal, for every row, to layers x 2 x"
        f" kv_heads x head_dim x sequence length x bytes ({text.num_hidden_layers} x 2 x"
        f" {text.num_key_value_heads} x {text.hidden_size // text.num_attention_heads} x L x"
        f" {torch.empty((), dtype=dtype).element_size()}), checked by the script.",
        f"- {args.rounds} timed rounds after {args.warmup} warm-up round(s); every round runs every variant once,"
        " in a rotating order; medians and IQR; 'x MLP' divides medians (prefill: lower is better; decode tokens/s:"
        " higher is better).",
        "",
        "| Model | Visual tokens | Seq. length | Prefill median (ms) | IQR (ms) | x MLP | Decode (tokens/s) | IQR"
        " | x MLP | KV cache (MiB) | x MLP |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['image_tokens']} | {r['seq_len']} | {r['prefill_median']:.1f} | {r['prefill_iqr']:.1f}"
            f" | {r['prefill_median'] / mlp['prefill_median']:.3f} | {r['decode_median']:.1f} | {r['decode_iqr']:.1f}"
            f" | {r['decode_median'] / mlp['decode_median']:.3f} | {r['kv'] / 2**20:.2f}"
            f" | {r['kv'] / mlp['kv']:.3f} |"
        )
    return lines


def plot(rows, path, title):
    """Three bar charts (prefill, decode tokens/s, KV cache), each as a ratio to the MLP baseline; Pillow only."""
    metrics = [
        ("Prefill latency (x MLP, lower is better)", [r["prefill_median"] / rows[0]["prefill_median"] for r in rows]),
        ("Decode tokens/s (x MLP, higher is better)", [r["decode_median"] / rows[0]["decode_median"] for r in rows]),
        ("KV cache after prefill (x MLP)", [r["kv"] / rows[0]["kv"] for r in rows]),
    ]
    colours = [(120, 120, 120), (31, 119, 180), (44, 160, 44), (214, 39, 40)]
    panel_w, panel_h, top, bottom, left = 360, 300, 60, 70, 40
    canvas = Image.new("RGB", (panel_w * len(metrics) + 20, panel_h + top + bottom), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=13)
    small = ImageFont.load_default(size=11)
    draw.text((10, 8), title, fill="black", font=font)
    for index, (label, values) in enumerate(metrics):
        x0 = 10 + index * panel_w
        draw.text((x0 + left, top - 24), label, fill="black", font=font)
        scale_max = max(1.0, max(values)) * 1.15
        y_axis = top + panel_h
        draw.line((x0 + left, top, x0 + left, y_axis), fill="black")
        draw.line((x0 + left, y_axis, x0 + panel_w - 10, y_axis), fill="black")
        one = y_axis - panel_h * 1.0 / scale_max
        draw.line((x0 + left, one, x0 + panel_w - 10, one), fill=(180, 180, 180))
        draw.text((x0 + 8, one - 7), "1.0", fill="black", font=small)
        bar_w = (panel_w - left - 30) / len(values)
        for bar, (value, row) in enumerate(zip(values, rows, strict=True)):
            bx = x0 + left + 10 + bar * bar_w
            height = panel_h * value / scale_max
            draw.rectangle((bx, y_axis - height, bx + bar_w * 0.7, y_axis), fill=colours[bar % len(colours)])
            draw.text((bx, y_axis - height - 15), f"{value:.2f}", fill="black", font=small)
            name = "MLP 576" if row["image_tokens"] == 576 and bar == 0 else f"M={row['image_tokens']}"
            draw.text((bx, y_axis + 6), name, fill="black", font=small)
    canvas.save(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dims", choices=sorted(DIMS), help="7b or reduced (default: 7b on cuda, reduced on cpu)")
    parser.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"], help="default: fp16 on cuda, fp32 on cpu"
    )
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default: 15 on cpu, 20 on cuda)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads on the CPU (default 1: on a shared machine, more threads than free cores slow every op"
        " several fold and make the timings erratic)",
    )
    parser.add_argument("--write", type=Path, default=ROOT / "BENCHMARKS.md", help="Markdown file to update")
    parser.add_argument("--plot", type=Path, default=ROOT / "benchmarks" / "generation_speed.png")
    parser.add_argument("--no-write", action="store_true", help="only print the section (no Markdown, no plot)")
    args = parser.parse_args()

    device = torch.device(args.device)
    args.dims = args.dims or ("7b" if device.type == "cuda" else "reduced")
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    args.rounds = args.rounds or (20 if device.type == "cuda" else 15)
    if args.rounds < 2:
        parser.error(f"--rounds must be >= 2 (quartiles need two samples), got {args.rounds}")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    command = "python benchmarks/generation_speed.py" + (
        "" if device.type == "cpu" and args.dims == "reduced" else f" --device {args.device} --dims {args.dims}"
    )
    if device.type == "cpu" and args.threads != 1:
        command += f" --threads {args.threads}"
    if str(dtype) != ("torch.float32" if device.type == "cpu" else "torch.float16"):
        command += f" --dtype {str(dtype).removeprefix('torch.')}"

    print(f"building the variants ({args.dims} dimensions, {dtype}, {device})", flush=True)
    variants = build_variants(args.dims, device, dtype)
    shared = variants[0][2].model.language_model
    assert all(model.model.language_model is shared for _, _, model in variants)
    print(f"timing {len(variants)} variants in turns: {args.warmup} warm-up + {args.rounds} rounds", flush=True)
    rows = measure(variants, device, dtype, args.rounds, args.warmup, args.new_tokens)
    section = "\n".join(render(rows, args, device, dtype, command))
    if not args.no_write:
        plot(
            rows,
            args.plot,
            f"MS-LLaVA vs LLaVA MLP, {args.dims} dimensions, {device.type}, {dtype}".replace("torch.", ""),
        )
        section += f"\n\n![generation speed ratios](benchmarks/{args.plot.name})"
        write_section(args.write, section, START, END)
    print("\n" + section)
    if not args.no_write:
        print(f"\nwrote {args.write} and {args.plot}")


if __name__ == "__main__":
    main()
