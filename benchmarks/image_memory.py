"""Peak memory of the image processor and of `ms-llava demo` on ordinary and extreme aspect ratios.

Writes photo-like PNGs (smooth colour gradients plus noise) of 640 x 480, 20000 x 10 and 10 x 20000 pixels to a
temporary folder, then runs, each in a fresh child process, (a) `MSLlavaImageProcessor` on the image as
`ms_llava.images.load_image` opens it and (b) `ms-llava demo --image IMAGE --question ...` (the embedded default
checkpoint; the attention picture goes to the temporary folder), each twice: with the fused pad-and-resize (now) and
with the parent class's `_preprocess` (`LlavaImageProcessorPil`: pad to the full square, then resize: before). A
child that only imports the package gives the floor. Reported: the child's peak resident set size (`ru_maxrss` of
the `os.wait4` rusage of that one child) and its wall time.

Linux starts a child's `ru_maxrss` at its parent's resident set size when it is spawned, so this driver imports
neither torch nor ms_llava (the images are written by a child too).

    python benchmarks/image_memory.py            # prints a Markdown section for BENCHMARKS.md
    python benchmarks/image_memory.py --no-before   # only the fused path
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = [(640, 480), (20000, 10), (10, 20000)]
QUESTION = "What is in the picture?"

WRITE_IMAGES = """
import sys
import numpy as np
from PIL import Image
folder = sys.argv[1]
for spec in sys.argv[2:]:
    width, height = map(int, spec.split("x"))
    rng = np.random.default_rng(width * 7 + height)
    y, x = np.ogrid[0:height, 0:width]
    scale = max(width, height)
    channels = [128 + 80 * np.sin(2 * np.pi * (3 + c) * x / scale + c) * np.cos(2 * np.pi * (2 + c) * y / scale)
                for c in range(3)]
    pixels = np.stack(np.broadcast_arrays(*channels), axis=-1) + rng.normal(0, 6, (height, width, 3))
    Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)).save(f"{folder}/{spec}.png")
"""

# argv: path_or_-, padded|fused, then the demo's output path for the demo child
BEFORE = """
if sys.argv[2] == "padded":  # the path before the fusion: the parent's _preprocess pads to the square, then resizes
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    from ms_llava.image_processing_ms_llava import MSLlavaImageProcessor
    MSLlavaImageProcessor._preprocess = LlavaImageProcessorPil._preprocess
"""
PROCESSOR_CHILD = (
    "import sys\nimport ms_llava\n"
    + BEFORE
    + """
from ms_llava.images import load_image
pixel_values = ms_llava.MSLlavaImageProcessor()(images=load_image(sys.argv[1]), return_tensors="pt")["pixel_values"]
assert tuple(pixel_values.shape) == (1, 3, 336, 336), pixel_values.shape
"""
)
DEMO_CHILD = (
    "import sys\nimport ms_llava\n"
    + BEFORE
    + """
from ms_llava_cli import main
sys.exit(main(["demo", "--image", sys.argv[1], "--question", sys.argv[4], "--output", sys.argv[3]]))
"""
)
IMPORTS_ONLY = "import sys\nimport ms_llava, ms_llava.demo, ms_llava.images\n"


def run_child(code: str, *arguments: str) -> dict:
    """Runs `python -c code arguments...`; its peak RSS (bytes), wall time (s) and exit status."""
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-c", code, *arguments], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    peak = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
    return {"peak_rss": peak, "wall_s": time.perf_counter() - start, "status": process.returncode, "output": output}


def format_bytes(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"


def machine() -> str:
    cores = os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.machine()}, {cores} cores, {memory:.0f} GiB RAM, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-before", action="store_true", help="skip the padded-square (before) runs")
    args = parser.parse_args(argv)
    paths = ["fused"] if args.no_before else ["padded", "fused"]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        specs = [f"{w}x{h}" for w, h in SIZES]
        written = run_child(WRITE_IMAGES, folder, *specs)
        if written["status"] != 0:
            print(written["output"], file=sys.stderr)
            return 1
        floor = run_child(IMPORTS_ONLY)
        for spec in specs:
            image = str(Path(folder) / f"{spec}.png")
            for what, code in [("processor", PROCESSOR_CHILD), ("`ms-llava demo`", DEMO_CHILD)]:
                for path in paths:
                    result = run_child(code, image, path, str(Path(folder) / "demo.png"), QUESTION)
                    if result["status"] != 0:
                        print(f"{what} {spec} {path} failed:\n{result['output'][-3000:]}", file=sys.stderr)
                    rows.append((spec, what, path, result))
                    print(
                        f"{spec} {what} {path}: {format_bytes(result['peak_rss'])}, {result['wall_s']:.1f} s",
                        file=sys.stderr,
                    )
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    label = {"padded": "before: padded square, then resize", "fused": "now: fused pad-and-resize"}
    lines = [
        "## Image memory: processor and `ms-llava demo` by aspect ratio",
        "",
        f"- Machine: {machine()}, CPU only; {when}. Reproduce: `python benchmarks/image_memory.py`",
        "- Each row is a fresh child process; peak RSS is its `ru_maxrss`. Photo-like PNGs; the demo uses the embedded "
        "default checkpoint. 'before' replaces the processor's `_preprocess` by the parent class's "
        "(`LlavaImageProcessorPil`), which builds the padded square before resizing.",
        f"- Importing the package alone: peak RSS {format_bytes(floor['peak_rss'])}.",
        "",
        "| Image | What | Path | Peak RSS | Wall (s) | Exit |",
        "|---|---|---|--:|--:|--:|",
    ]
    for spec, what, path, result in rows:
        lines.append(
            f"| {spec.replace('x', ' x ')} | {what} | {label[path]} | {format_bytes(result['peak_rss'])} | "
            f"{result['wall_s']:.1f} | {result['status']} |"
        )
    print("\n".join(lines))
    return 0 if all(result["status"] == 0 for *_, result in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
