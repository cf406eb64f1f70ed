"""The projector and end-to-end measurements on a CUDA GPU, in one call of a few minutes.

1. Versions: Python, torch, CUDA, cuDNN, the GPU, transformers (this package needs >= 5.18), flash-attn if it imports.
2. Projectors at LLaVA-1.5-7B sizes (batch 1, `--dtype`, default bf16): LLaVA's MLP and MS-Resampler M = 144 / 64 / 36
   (k = 2/6/24, beta = 5), latency median and min over interleaved rounds; the same under `torch.compile` (MLP and
   M = 144, compile time reported).
3. Which SDPA backend MS-Resampler's biased attention (a float mask, beta * B) takes: each backend forced in turn with
   `torch.nn.attention.sdpa_kernel` (accepted or refused, and its latency), and the kernel the default dispatch runs
   (read from the profiler's kernel names).
4. End to end as benchmarks/end_to_end_7b.py measures it (the full CLIP ViT-L/14-336 tower, a Llama-2-7B-wide language
   model, MS-LLaVA M = 144 / 64 / 36 against the 576-token MLP, prefill / decode / KV cache / FLOPs, interleaved) at 4
   and 32 decoder layers, so the 32-layer row is measured, not extrapolated; once with the language model on SDPA and
   once on flash-attention-2 where `flash_attn` imports (MS-Resampler runs SDPA under both: FA2 takes no bias).

Run from the repository root on a machine with a GPU: `PYTHONPATH=src python benchmarks/gpu_benchmarks.py`. It prints
each part as it goes and writes all of it as Markdown to $OUT/gpu_benchmarks.md when the variable OUT is set, else to
`--output` if given. Without a CUDA device it stops at once with a message. `--device cpu --dry-run` runs every part
at tiny end-to-end sizes and few repetitions on the CPU (no GPU-only kernels), to check the script itself.
"""

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

MIN_TRANSFORMERS = (5, 18)


def versions(device: torch.device) -> list[str]:
    """The versions this run depends on; stops with a message where the device or transformers cannot do."""
    lines = [f"Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})"]
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(
                f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, built for CUDA"
                f" {torch.version.cuda}); run on a GPU machine, or check the script with --device cpu --dry-run"
            )
        props = torch.cuda.get_device_properties(device)
        lines.append(
            f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, compute"
            f" capability {props.major}.{props.minor}; cuDNN {torch.backends.cudnn.version()}"
        )
    try:
        import transformers
    except ImportError as error:
        raise SystemExit(f"transformers does not import ({error}); install transformers>=5.18,<5.26") from error
    found = tuple(int(part) for part in transformers.__version__.split(".")[:2])
    if found < MIN_TRANSFORMERS:
        raise SystemExit(
            f"transformers {transformers.__version__} is older than ms-llava's floor 5.18: carry a wheel of 5.23.0"
            " (BENCHMARKS.md, 'GPU') and put it first on PYTHONPATH"
        )
    lines.append(f"transformers {transformers.__version__}, flash-attn {flash_attn_version() or 'not importable'}")
    return lines


def flash_attn_version() -> str | None:
    try:
        import flash_attn
    except Exception:  # a broken build raises more than ImportError
        return None
    return getattr(flash_attn, "__version__", "unknown")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_in_turns(calls: dict, device, warmup: int, rounds: int) -> dict:
    """{name: (median ms, min ms)}: every round runs every call once, in turns."""
    samples = {name: [] for name in calls}
    with torch.inference_mode():
        for step in range(warmup + rounds):
            for name, call in calls.items():
                sync(device)
                start = time.perf_counter()
                call()
                sync(device)
                if step >= warmup:
                    samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: (statistics.median(times), min(times)) for name, times in samples.items()}


def table(header: list[str], rows: list[list]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|---|" + "--:|" * (len(header) - 1),
        *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows),
    ]


def projectors(device, dtype, rounds, compile_modules):
    from projector_cost import GRID, NUM_TOKENS, VISION_WIDTH, build_mlp, build_resampler

    modules = {"LLaVA MLP": build_mlp()}
    for queries in (144, 64, 36):
        modules[f"MS-Resampler M={queries}"] = build_resampler(queries, [2, 6, 24], 5.0)
    features = torch.randn(1, NUM_TOKENS, VISION_WIDTH, device=device, dtype=dtype)
    calls = {}
    for name, module in modules.items():
        module.to(device, dtype).requires_grad_(False)
        args = (features, GRID) if name.startswith("MS") else (features,)
        calls[name] = lambda module=module, args=args: module(*args)
    compiled = {}
    if compile_modules:
        for name in ("LLaVA MLP", "MS-Resampler M=144"):
            module, args = modules[name], (features, GRID) if name.startswith("MS") else (features,)
            start = time.perf_counter()
            compiled_module = torch.compile(module)
            with torch.inference_mode():
                compiled_module(*args)
            sync(device)
            compiled[name] = time.perf_counter() - start
            calls[f"{name}, torch.compile"] = lambda m=compiled_module, args=args: m(*args)
    timings = time_in_turns(calls, device, warmup=1 if rounds <= 2 else 3, rounds=rounds)
    mlp = timings["LLaVA MLP"]
    rows = [
        [name, f"{median:.3f}", f"{low:.3f}", f"{median / mlp[0]:.3f} ({low / mlp[1]:.3f})"]
        for name, (median, low) in timings.items()
    ]
    lines = [
        f"### Projectors (LLaVA-1.5-7B sizes, batch 1, {str(dtype).removeprefix('torch.')}, {rounds} interleaved"
        " rounds)",
        "",
        *table(["Projector", "median (ms)", "min (ms)", "x MLP (min)"], rows),
    ]
    if compiled:
        lines += ["", "torch.compile time (first call): " + ", ".join(f"{n} {s:.1f} s" for n, s in compiled.items())]
    return lines, modules["MS-Resampler M=144"], features


def sdpa_backends(resampler, features, device, rounds):
    """Each SDPA backend forced for MS-Resampler's biased attention, and the one the default dispatch takes."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    from projector_cost import GRID

    reference = None
    rows, calls = [], {}
    for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        try:
            with sdpa_kernel(getattr(SDPBackend, backend)), torch.inference_mode():
                output = resampler(features, GRID)
                sync(device)
        except RuntimeError as error:  # "No available kernel" when the backend refuses the inputs
            rows.append([backend, "refused", str(error).splitlines()[0][:100], "", ""])
            continue
        reference = output if reference is None else reference
        difference = (output.float() - reference.float()).abs().max().item()

        def call(backend=backend):
            with sdpa_kernel(getattr(SDPBackend, backend)):
                resampler(features, GRID)

        calls[backend] = call
        rows.append([backend, "accepted", "", "", f"{difference:.2e}"])
    timings = time_in_turns(calls, device, warmup=2, rounds=rounds)
    for row in rows:
        if row[0] in timings:
            row[2:4] = [f"{timings[row[0]][0]:.3f}", f"{timings[row[0]][1]:.3f}"]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof, torch.inference_mode():
        resampler(features, GRID)
        sync(device)
    names = {event.key for event in prof.key_averages()}
    patterns = {
        "FLASH_ATTENTION": ("flash_fwd", "flash_attention"),
        "EFFICIENT_ATTENTION": ("fmha", "efficient_attention", "mem_eff"),
        "CUDNN_ATTENTION": ("cudnn",),
    }
    taken = [b for b, keys in patterns.items() if any(k in n.lower() for n in names for k in keys)] or ["MATH"]
    kernels = sorted(n for n in names if "attention" in n.lower() or "fmha" in n.lower() or "flash" in n.lower())
    return [
        "### MS-Resampler's biased attention under each SDPA backend (M = 144)",
        "",
        *table(["Backend", "float mask", "median (ms)", "min (ms)", "max abs diff to the first accepted"], rows),
        "",
        f"Default dispatch takes: {', '.join(taken)} (attention ops and kernels seen: {', '.join(kernels)[:300]}).",
    ]


def end_to_end(device, dtype, layers, dims, rounds, new_tokens, command, emit):
    """end_to_end_7b's measurement at `layers`, once per attention implementation of the language model."""
    import end_to_end_7b

    rows = end_to_end_7b.build(layers, dims, device, dtype)
    language_models = {id(r["model"].model.language_model): r["model"].model.language_model for r in rows}
    implementations = ["sdpa"] + (["flash_attention_2"] if flash_attn_version() and device.type == "cuda" else [])
    for implementation in implementations:
        for language_model in language_models.values():
            language_model.set_attn_implementation(implementation)
        print(f"end to end, language model on {implementation}: {rounds} rounds", flush=True)
        load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
        end_to_end_7b.measure(rows, device, dtype, rounds, 1, new_tokens)
        args = argparse.Namespace(
            layers=layers, rounds=rounds, warmup=1, new_tokens=new_tokens, dims=dims, clock="wall"
        )
        section = end_to_end_7b.render(rows, end_to_end_7b.at_target(rows), args, device, dtype, load, command)
        emit([f"### End to end, language model on `{implementation}`", "", *section[2:]])
    if len(implementations) == 1:
        emit(["flash-attention-2: `flash_attn` does not import here (or no CUDA device); no FA2 rows."])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--dry-run", action="store_true", help="tiny end-to-end sizes, few repetitions")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 30; dry run 2)")
    parser.add_argument("--output", type=Path, help="Markdown file to write (default: $OUT/gpu_benchmarks.md)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark modules
    device = torch.device(args.device)
    dtype = torch.float32 if args.dry_run and device.type == "cpu" else getattr(torch, args.dtype)
    rounds = args.rounds or (2 if args.dry_run else 30)
    output = args.output or (Path(os.environ["OUT"]) / "gpu_benchmarks.md" if os.environ.get("OUT") else None)
    started = time.perf_counter()

    lines = ["## GPU: projectors and end to end", ""]

    def emit(part):  # print each part as it comes, and keep the file whole after each
        lines.extend([*part, ""])
        print("\n".join(part), flush=True)
        if output is not None:
            output.write_text("\n".join(lines))

    emit([f"- {line}" for line in versions(device)])
    torch.manual_seed(0)
    part, resampler, features = projectors(device, dtype, rounds, not args.no_compile)
    emit(part)
    emit(sdpa_backends(resampler, features, device, rounds))
    layers, dims, e2e_rounds = ((1, 2), "tiny", 1) if args.dry_run else ((4, 32), "7b", max(2, rounds // 6))
    command = "PYTHONPATH=src python benchmarks/gpu_benchmarks.py" + " ".join(["", *(argv or sys.argv[1:])])
    end_to_end(device, dtype, layers, dims, e2e_rounds, 32, command.rstrip(), emit)
    emit([f"Wall time of the whole run: {time.perf_counter() - started:.0f} s."])
    if output is not None:
        print(f"wrote {output}")
    return lines


if __name__ == "__main__":
    main()
