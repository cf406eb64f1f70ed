"""Peak memory and wall time of `ms-llava convert llava-to-ms-llava` on a synthetic LLaVA-1.5-7B-sized checkpoint.

Builds a random-weight float16 checkpoint with the real key names and shapes of LLaVA-1.5-7B (Llama-2-7B language
model, CLIP ViT-L/14-336 tower, `mlp2x_gelu` projector) in the transformers 4.x key layout of
`llava-hf/llava-1.5-7b-hf` (`language_model.model.*`, `vision_tower.vision_model.*`, `multi_modal_projector.*`,
32064-row vocabulary, sharded safetensors + index, LlavaProcessor) in a temporary directory, converts it in a child
process through the command line (`ms-llava convert llava-to-ms-llava`, with `--no-parity` unless `--parity`), reports
the child's peak resident set size (`ru_maxrss` of the `os.wait4` rusage of that one child) and its wall time, then
deletes every file it wrote.

Linux starts a child's `ru_maxrss` at its parent's resident set size when it is spawned, so this driver process stays
small: it imports neither torch nor ms_llava, and builds the synthetic checkpoint in a child of its own. It also
measures a child that only imports torch, transformers and the conversion modules (the floor).

Disk: about twice the synthetic checkpoint (source + output; 14.1 GB each at the full 32 layers, so ~28.3 GB; 2.8 GB
each with `--layers 4`); the script first checks that `--workdir` (default: the system temporary directory) has that
much free, plus 2 % and 1 GiB. Memory: each synthetic source shard is built in memory (`--source-shard-size`, 4.95 GB)
in a child of its own, not part of the measured peak.

Run from the repository root, with the package installed:

    python benchmarks/conversion_memory.py                                           # 7B size
    python benchmarks/conversion_memory.py --layers 4 --source-shard-size 1GB        # 4 language-model layers
    python benchmarks/conversion_memory.py --layers 4 --source-shard-size 1GB --parity
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# No torch / transformers / ms_llava import at module level: see the docstring. The functions that build and compare
# checkpoints import them, and only run in children (--internal-build, --internal-compare).

# LLaVA-1.5-7B: Llama-2-7B (Vicuna-7B v1.5) and CLIP ViT-L/14-336
TEXT_HIDDEN, TEXT_INTERMEDIATE, TEXT_LAYERS, TEXT_HEADS = 4096, 11008, 32, 32
HF_VOCAB, ORIGINAL_VOCAB = 32064, 32000  # llava-hf pads 32002 tokens (+<image>, <pad>) to 32064 rows
VISION_HIDDEN, VISION_INTERMEDIATE, VISION_LAYERS, VISION_HEADS = 1024, 4096, 24, 16
IMAGE_SIZE, PATCH_SIZE = 336, 14
POSITIONS = (IMAGE_SIZE // PATCH_SIZE) ** 2 + 1  # 577: 24 x 24 patches + CLS
DTYPE_BYTES = 2  # float16
DEFAULT_SOURCE_SHARD_SIZE = "4.95GB"
# The child: `python -c CHILD args...` runs `ms-llava args...` (the command line, in-process).
CHILD = "import sys; from ms_llava_cli import main; sys.exit(main(sys.argv[1:]))"
IMPORTS_ONLY = "import ms_llava.conversion, ms_llava.compose"


# --------------------------------------------------------------------------------------------------------------------
# Key names and shapes
# --------------------------------------------------------------------------------------------------------------------


def language_model_shapes(layers: int, prefix: str, vocab: int) -> dict[str, tuple[int, ...]]:
    shapes = {f"{prefix}embed_tokens.weight": (vocab, TEXT_HIDDEN)}
    for layer in range(layers):
        p = f"{prefix}layers.{layer}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{name}.weight"] = (TEXT_HIDDEN, TEXT_HIDDEN)
        shapes[f"{p}mlp.gate_proj.weight"] = (TEXT_INTERMEDIATE, TEXT_HIDDEN)
        shapes[f"{p}mlp.up_proj.weight"] = (TEXT_INTERMEDIATE, TEXT_HIDDEN)
        shapes[f"{p}mlp.down_proj.weight"] = (TEXT_HIDDEN, TEXT_INTERMEDIATE)
        shapes[f"{p}input_layernorm.weight"] = (TEXT_HIDDEN,)
        shapes[f"{p}post_attention_layernorm.weight"] = (TEXT_HIDDEN,)
    shapes[f"{prefix}norm.weight"] = (TEXT_HIDDEN,)
    return shapes


def clip_shapes(prefix: str) -> dict[str, tuple[int, ...]]:
    shapes = {
        f"{prefix}embeddings.class_embedding": (VISION_HIDDEN,),
        f"{prefix}embeddings.patch_embedding.weight": (VISION_HIDDEN, 3, PATCH_SIZE, PATCH_SIZE),
        f"{prefix}embeddings.position_embedding.weight": (POSITIONS, VISION_HIDDEN),
        f"{prefix}pre_layrnorm.weight": (VISION_HIDDEN,),
        f"{prefix}pre_layrnorm.bias": (VISION_HIDDEN,),
    }
    for layer in range(VISION_LAYERS):
        p = f"{prefix}encoder.layers.{layer}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}self_attn.{name}.weight"] = (VISION_HIDDEN, VISION_HIDDEN)
            shapes[f"{p}self_attn.{name}.bias"] = (VISION_HIDDEN,)
        for name in ("layer_norm1", "layer_norm2"):
            shapes[f"{p}{name}.weight"] = (VISION_HIDDEN,)
            shapes[f"{p}{name}.bias"] = (VISION_HIDDEN,)
        shapes[f"{p}mlp.fc1.weight"] = (VISION_INTERMEDIATE, VISION_HIDDEN)
        shapes[f"{p}mlp.fc1.bias"] = (VISION_INTERMEDIATE,)
        shapes[f"{p}mlp.fc2.weight"] = (VISION_HIDDEN, VISION_INTERMEDIATE)
        shapes[f"{p}mlp.fc2.bias"] = (VISION_HIDDEN,)
    shapes[f"{prefix}post_layernorm.weight"] = (VISION_HIDDEN,)
    shapes[f"{prefix}post_layernorm.bias"] = (VISION_HIDDEN,)
    return shapes


def projector_shapes(first: str, second: str) -> dict[str, tuple[int, ...]]:
    return {
        f"{first}weight": (TEXT_HIDDEN, VISION_HIDDEN),
        f"{first}bias": (TEXT_HIDDEN,),
        f"{second}weight": (TEXT_HIDDEN, TEXT_HIDDEN),
        f"{second}bias": (TEXT_HIDDEN,),
    }


def llava_hf_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    """llava-hf/llava-1.5-7b-hf's keys (transformers 4.x layout) and shapes, with `layers` language-model layers."""
    return {
        **language_model_shapes(layers, "language_model.model.", HF_VOCAB),
        "language_model.lm_head.weight": (HF_VOCAB, TEXT_HIDDEN),
        **clip_shapes("vision_tower.vision_model."),
        **projector_shapes("multi_modal_projector.linear_1.", "multi_modal_projector.linear_2."),
    }


def numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def checkpoint_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(numel(shape) for shape in shapes.values()) * DTYPE_BYTES


def parse_size(text: str) -> int:
    """`"4.95GB"` -> 4_950_000_000, `"2GiB"` -> 2 * 2**30, `"500MB"`, or a number of bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size such as 5GB or 500MB: {text!r}")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1} | {f"{p}B": 1000 ** (i + 1) for i, p in enumerate("KMGT")}
    scale |= {f"{p}IB": 1024 ** (i + 1) for i, p in enumerate("KMGT")}
    return int(float(match.group(1)) * scale[unit])


def format_bytes(count: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count} B"


# --------------------------------------------------------------------------------------------------------------------
# Synthetic checkpoints
# --------------------------------------------------------------------------------------------------------------------


def random_tensor(shape: tuple[int, ...], generator):
    import torch

    return torch.empty(shape, dtype=torch.float16).normal_(0.0, 0.02, generator=generator)


def word_level_tokenizer(size: int):
    """A Llama-sized (32000 tokens) word-level tokenizer: <unk>, <s>, </s> and w3 ... w31999."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def clip_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=VISION_INTERMEDIATE,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=VISION_HEADS,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=768,
    )


def llama_config(layers: int, vocab: int, **kwargs):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=TEXT_INTERMEDIATE,
        num_hidden_layers=layers,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_HEADS,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        **kwargs,
    )


def make_llava_hf(directory: Path, layers: int, shard_bytes: int) -> tuple[dict, int]:
    """A llava-hf-like checkpoint: safetensors shards + index written shard by shard (random normal(0, 0.02)
    float16, generated as each shard is written), LlavaConfig, LlavaProcessor. Returns the shapes and the shard
    count."""
    from transformers import AddedToken, LlavaConfig, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from ms_llava import LLAVA_1_5_CHAT_TEMPLATE

    directory.mkdir(parents=True)
    shapes = llava_hf_shapes(layers)
    shards = write_random_weights(shapes, directory, shard_bytes)

    tokenizer = word_level_tokenizer(ORIGINAL_VOCAB)
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaConfig(
        vision_config=clip_config().to_dict(),
        text_config=llama_config(layers, HF_VOCAB, pad_token_id=tokenizer.pad_token_id).to_dict(),
        image_token_index=image_token_id,
        image_seq_length=POSITIONS - 1,
    )
    config.dtype = "float16"
    config.architectures = ["LlavaForConditionalGeneration"]
    config.save_pretrained(directory)
    processor = LlavaProcessor(
        image_processor=LlavaImageProcessorPil(),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_1_5_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(directory)
    return shapes, shards


def write_random_weights(shapes: dict, directory: Path, shard_bytes: int) -> int:
    """Random normal(0, 0.02) float16 tensors of `shapes` as safetensors shards + index, generated shard by shard
    (`ms_llava.conversion.streaming.write_weights` loads each entry when its shard is written, and again to read the
    shard back: each tensor is seeded by its name). Returns the shard count."""
    import zlib

    import torch

    from ms_llava.conversion.streaming import write_weights

    class Random:  # a tensor made when its shard is written
        def __init__(self, name, shape):
            self.name, self.shape, self.dtype = name, shape, torch.float16

        def load(self):
            return random_tensor(self.shape, torch.Generator().manual_seed(zlib.crc32(self.name.encode())))

    write_weights({name: Random(name, shape) for name, shape in shapes.items()}, directory, shard_bytes)
    index = directory / "model.safetensors.index.json"
    return len(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else 1


# --------------------------------------------------------------------------------------------------------------------
# Measuring a child
# --------------------------------------------------------------------------------------------------------------------


def run_child(arguments: list[str]) -> dict:
    """Runs `python arguments...`; returns its exit code, output, wall time and peak RSS (bytes, from the rusage
    `os.wait4` gives for this one child)."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, *arguments], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = process.stdout.read()
    process.stdout.close()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    peak = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
    reported = re.search(r"peak resident memory \(RSS\): ([^;]+);", output)
    return {
        "returncode": process.returncode,
        "output": output,
        "seconds": seconds,
        "peak_rss": peak,
        "reported_peak_rss": reported.group(1) if reported else "-",
    }


def convert(arguments: list[str]) -> dict:
    """Runs `ms-llava arguments...` in a child; prints its report; exits if it failed."""
    result = run_child(["-c", CHILD, *arguments])
    if result["returncode"] != 0:
        sys.exit(f"the conversion failed (exit {result['returncode']}):\n{result['output']}")
    for line in result["output"].splitlines():
        print(f"    {line}")
    return result


def directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def build_source(directory: Path, layers: int, shard_bytes: int) -> None:
    """--internal-build (in a child): writes the synthetic source, prints its shard count."""
    _, shards = make_llava_hf(directory, layers, shard_bytes)
    print(json.dumps({"shards": shards}))


def child_json(arguments: list[str]) -> dict:
    result = run_child([__file__, *arguments])
    if result["returncode"] != 0:
        sys.exit(f"{' '.join(arguments)} failed (exit {result['returncode']}):\n{result['output']}")
    return json.loads(result["output"].strip().splitlines()[-1])


def machine() -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    versions = run_child(["-c", "import torch, transformers; print(torch.__version__, transformers.__version__)"])
    torch_version, transformers_version = versions["output"].split()[-2:]
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, {format_bytes(memory)} RAM; "
        f"Python {platform.python_version()}, torch {torch_version}, transformers {transformers_version}"
    )


# --------------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=TEXT_LAYERS, help="language-model layers (32: the full 7B)")
    parser.add_argument(
        "--source-shard-size", default=DEFAULT_SOURCE_SHARD_SIZE, help="largest shard of the synthetic source (4.95GB)"
    )
    parser.add_argument("--parity", action="store_true", help="run the parity check too")
    parser.add_argument("--workdir", help="where the temporary directory goes (default: the system temp directory)")
    parser.add_argument("--internal-build", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.layers < 1:
        parser.error("--layers must be at least 1")
    shard_bytes = parse_size(args.source_shard_size)
    if args.internal_build:
        build_source(Path(args.internal_build), args.layers, shard_bytes)
        return 0
    shapes = llava_hf_shapes(args.layers)
    source_bytes = checkpoint_bytes(shapes)
    needed = int(2 * source_bytes * 1.02) + 2**30
    workdir = Path(args.workdir or tempfile.gettempdir())
    free = shutil.disk_usage(workdir).free
    print(machine())
    print(
        f"the synthetic checkpoint is {source_bytes / 1e9:.2f} GB; about {needed / 1e9:.1f} GB of disk needed in "
        f"{workdir} ({free / 1e9:.1f} GB free)"
    )
    if free < needed:
        print(f"error: not enough free disk in {workdir}; pass --workdir or fewer --layers", file=sys.stderr)
        return 1

    baseline = run_child(["-c", IMPORTS_ONLY])
    print(
        f"importing torch, transformers and ms_llava's conversions alone: peak RSS {format_bytes(baseline['peak_rss'])}"
    )
    with tempfile.TemporaryDirectory(prefix="ms-llava-conversion-memory-", dir=workdir) as temporary:
        root = Path(temporary)
        started = time.perf_counter()
        source = root / "source"
        build = [
            "--layers",
            str(args.layers),
            "--internal-build",
            str(source),
            "--source-shard-size",
            str(shard_bytes),
        ]
        shards = child_json(build)["shards"]
        parameters = sum(numel(shape) for shape in shapes.values())
        described = (
            f"{args.layers} language-model layer{'s' if args.layers > 1 else ''}: {parameters / 1e9:.2f}e9 "
            f"parameters, {source_bytes / 1e9:.2f} GB float16, {shards} safetensors (transformers 4.x layout) "
            f"shard{'s' if shards > 1 else ''} of <= {shard_bytes / 1e9:.2f} GB"
        )
        print(f"synthetic source ({described}) written in {time.perf_counter() - started:.0f} s")
        arguments = ["convert", "llava-to-ms-llava", "--source", str(source), "--output", str(root / "ms-llava")]
        result = convert(arguments + ["--num-queries", "144"] + ([] if args.parity else ["--no-parity"]))
        written = directory_bytes(root / "ms-llava")
    print(f"deleted {temporary}")
    print()
    print("| conversion | source | peak RSS (child, os.wait4) | peak RSS (its report) | wall time | output |")
    print("|---|---|---|---|---|---|")
    name = "llava-to-ms-llava" + (" (with parity)" if args.parity else " --no-parity")
    print(
        f"| `{name}` | {described} | {format_bytes(result['peak_rss'])} | {result['reported_peak_rss']} | "
        f"{result['seconds']:.0f} s | {written / 1e9:.2f} GB |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
