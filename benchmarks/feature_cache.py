"""Training step time with and without the frozen vision tower's feature cache (`train(cache_vision_features=True)`).

    python benchmarks/feature_cache.py            # writes its section of BENCHMARKS.md

At ScopeBench's size (experiments/scopebench/README.md): generated 336 x 336 images, its CLIP tower (24 x 24 grid, 2 layers, width
64) and language model (3 layers, width 128), MS-Resampler M = 64, k = {2, 6, 14}, random weights, stage `finetune`,
global batch 16, one thread, no data-loader workers. Both runs train the same steps in one process, uncached first,
the cache is built (and timed) between them and handed to the cached run (`feature_cache=`). The per-step losses of the two runs are compared too:
the cache must change the time only.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))  # experiments/ (ScopeBench's generator and models) is no installed package
from markdown_section import write_section  # noqa: E402

START, END = "<!-- feature-cache:start -->", "<!-- feature-cache:end -->"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400, help="training images (5 questions each)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--write", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from experiments.scopebench import generator as sb
    from experiments.scopebench.models import build_ms_llava, build_tokenizer
    from ms_llava.training import train
    from ms_llava.training.feature_cache import build_cache

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = sb.write_split(tmp / "data", "train", args.images)
        model, processor = build_ms_llava(
            None, None, build_tokenizer(), {"num_queries": 64, "scope_windows": [2, 6, 14]}
        )
        model.save_pretrained(tmp / "init")
        processor.save_pretrained(tmp / "init")
        settings = dict(
            learning_rate=3e-3, global_batch_size=16, max_steps=args.steps, dataloader_num_workers=0,
            save_steps=100000, logging_steps=1, warmup_ratio=0.05,
        )  # fmt: skip
        run = dict(model_name_or_path=tmp / "init", stage="finetune", data_path=paths["qa"],
                   image_folder=tmp / "data" / "images", **settings)  # fmt: skip
        plain = train(output_dir=tmp / "plain", **run)
        # The cache, built here to time it, then handed to train() (same tower, image processor and files).
        images = [tmp / "data" / "images" / record["image"] for record in json.loads(paths["qa"].read_text())]
        started = time.perf_counter()
        cache = build_cache(model, processor, images)
        build = time.perf_counter() - started
        cached = train(output_dir=tmp / "cached", cache_vision_features=True, feature_cache=cache, **run)
    step_plain, step_cached = plain.wall_time_s / args.steps, cached.wall_time_s / args.steps
    worst = max(abs(a - b) for (_, a), (_, b) in zip(plain.losses, cached.losses, strict=True))
    section = "\n".join(
        [
            "## Vision feature cache (ScopeBench size, CPU)",
            "",
            f"`python benchmarks/feature_cache.py` on {platform.processor() or platform.machine()} "
            f"({torch.get_num_threads()} torch thread; 2-core shared machine, no GPU), torch {torch.__version__}: "
            f"stage `finetune`, {args.steps} steps, global batch 16, {args.images} generated 336 x 336 images, "
            "ScopeBench's tower and LM with random weights, MS-Resampler M = 64, k = {2, 6, 14}.",
            "",
            "| | s per step | ratio |",
            "|---|---|---|",
            f"| tower every step | {step_plain:.3f} | 1.00 |",
            f"| `cache_vision_features=True` | {step_cached:.3f} | {step_cached / step_plain:.2f} |",
            "",
            f"Training time of the `train()` call (`TrainResult.wall_time_s`) divided by the steps, both runs in one "
            f"process. Building the cache (the tower over {args.images} images, before training) took "
            f"{build:.1f} s, outside the training time. Largest difference between the two runs' per-step losses: "
            f"{worst:.1e}.",
        ]
    )
    print(section)
    if not args.no_write:
        write_section(args.write, section, START, END)
        print(f"\nwrote {args.write}")


if __name__ == "__main__":
    main()
