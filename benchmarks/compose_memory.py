"""Peak memory and wall time of `ms-llava compose` on random-weight parts of CLIP-ViT-L/14-336 + Vicuna-7B size.

Writes, in children of their own, two random-weight float16 parts with the real key names and shapes: a
`CLIPVisionModel` (ViT-L/14 at 336 px, 24 layers) and a `LlamaForCausalLM` of Llama-2-7B / Vicuna-7B-v1.5 size (32000
tokens, 32 layers, untied `lm_head`) with a Llama-sized word-level tokenizer and no pad token, both as safetensors
shards (`--source-shard-size`, default 4.95 GB). Then runs `ms-llava compose` in a child, reports that child's peak resident set size (`ru_maxrss` of its `os.wait4` rusage) and wall time,
and deletes every file it wrote. The compose adds `<image>` (32001 rows: the embedding and `lm_head` each grow by one
row, by transformers' mean resizing) and uses the LLM's unk token for padding, as for Vicuna.

The shapes, the random tensors, the tokenizer and the child runner are benchmarks/conversion_memory.py's (imported),
so the two benchmarks measure the same way; this driver imports neither torch nor ms_llava (a child's `ru_maxrss`
starts at its parent's resident set size).

Disk: about twice the parts (parts + output: 14.1 GB each at 32 layers, ~28.3 GB; ~5.7 GB with `--layers 4`).

    python benchmarks/compose_memory.py                 # CLIP-L/14-336 + 7B, --no-parity (as the 7B compose runs)
    python benchmarks/compose_memory.py --layers 4 --source-shard-size 1GB
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import conversion_memory as measured  # noqa: E402  (the shared shapes and child runner)

VOCAB = measured.ORIGINAL_VOCAB  # 32000, Vicuna-7B-v1.5's
CLIP_MEAN_STD = {
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
}


def part_shapes(layers: int) -> tuple[dict, dict]:
    """(CLIPVisionModel keys, LlamaForCausalLM keys) and shapes, in transformers 4.x's layout of the Hub files."""
    tower = measured.clip_shapes("vision_model.")
    llm = {**measured.language_model_shapes(layers, "model.", VOCAB), "lm_head.weight": (VOCAB, measured.TEXT_HIDDEN)}
    return tower, llm


def build_parts(root: Path, layers: int, shard_bytes: int) -> None:
    """--internal-build (in a child): writes `root/tower` and `root/llm`, prints their shard counts."""
    tower_shapes, llm_shapes = part_shapes(layers)
    shards = {}
    for name, shapes in (("tower", tower_shapes), ("llm", llm_shapes)):
        (root / name).mkdir(parents=True)
        shards[name] = measured.write_random_weights(shapes, root / name, shard_bytes)
    tower_config = measured.clip_config()
    tower_config.architectures = ["CLIPVisionModel"]
    tower_config.dtype = "float16"
    tower_config.save_pretrained(root / "tower")
    (root / "tower" / "preprocessor_config.json").write_text(json.dumps(CLIP_MEAN_STD), encoding="utf-8")
    tokenizer = measured.word_level_tokenizer(VOCAB)
    llm_config = measured.llama_config(layers, VOCAB, bos_token_id=1, eos_token_id=2)
    llm_config.architectures = ["LlamaForCausalLM"]
    llm_config.dtype = "float16"
    llm_config.save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    print(json.dumps(shards))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=measured.TEXT_LAYERS, help="LLM layers (32: the full 7B)")
    parser.add_argument("--source-shard-size", default="4.95GB", help="largest shard of the parts (4.95GB)")
    parser.add_argument("--parity", action="store_true", help="run compose's parity check too (loads the models)")
    parser.add_argument("--workdir", help="where the temporary directory goes (default: the system temp directory)")
    parser.add_argument("--internal-build", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.layers < 1:
        parser.error("--layers must be at least 1")
    shard_bytes = measured.parse_size(args.source_shard_size)
    if args.internal_build:
        build_parts(Path(args.internal_build), args.layers, shard_bytes)
        return 0
    tower_shapes, llm_shapes = part_shapes(args.layers)
    parts_bytes = measured.checkpoint_bytes(tower_shapes) + measured.checkpoint_bytes(llm_shapes)
    needed = int(2 * parts_bytes * 1.02) + 2**30
    workdir = Path(args.workdir or tempfile.gettempdir())
    free = shutil.disk_usage(workdir).free
    print(measured.machine())
    print(
        f"parts: {parts_bytes / 1e9:.2f} GB; about {needed / 1e9:.1f} GB of disk needed in {workdir} ({free / 1e9:.1f} GB free)"
    )
    if free < needed:
        print(f"error: not enough free disk in {workdir}; pass --workdir or fewer --layers", file=sys.stderr)
        return 1
    baseline = measured.run_child(["-c", measured.IMPORTS_ONLY])
    print(
        f"importing torch, transformers and ms_llava.compose alone: peak RSS {measured.format_bytes(baseline['peak_rss'])}"
    )
    with tempfile.TemporaryDirectory(prefix="ms-llava-compose-memory-", dir=workdir) as temporary:
        root = Path(temporary)
        started = time.perf_counter()
        built = measured.run_child([__file__, "--layers", str(args.layers), "--source-shard-size", str(shard_bytes),
                                    "--internal-build", str(root)])  # fmt: skip
        if built["returncode"] != 0:
            sys.exit(f"building the parts failed:\n{built['output']}")
        shards = json.loads(built["output"].strip().splitlines()[-1])
        parameters = sum(map(measured.numel, [*tower_shapes.values(), *llm_shapes.values()]))
        described = (
            f"CLIP-L/14-336 + {args.layers}-layer Llama-7B-width LLM: {parameters / 1e9:.2f}e9 parameters, "
            f"{parts_bytes / 1e9:.2f} GB float16, {shards['tower']} + {shards['llm']} safetensors shard(s)"
        )
        print(f"parts ({described}) written in {time.perf_counter() - started:.0f} s")
        arguments = ["compose", "--vision-tower", str(root / "tower"), "--language-model", str(root / "llm"),
                     "--output", str(root / "ms-llava"), "--num-queries", "144"]  # fmt: skip
        result = measured.convert(arguments + ([] if args.parity else ["--no-parity"]))
        written = measured.directory_bytes(root / "ms-llava")
    print(f"deleted {temporary}")
    print()
    print("| command | parts | peak RSS (child, os.wait4) | peak RSS (its report) | wall time | output |")
    print("|---|---|---|---|---|---|")
    name = "compose" + (" (with parity)" if args.parity else " --no-parity")
    print(
        f"| `{name}` | {described} | {measured.format_bytes(result['peak_rss'])} | {result['reported_peak_rss']} | "
        f"{result['seconds']:.0f} s | {written / 1e9:.2f} GB |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
