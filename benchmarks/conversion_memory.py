"""Peak memory and wall time of the streaming conversions on a synthetic LLaVA-1.5-7B-sized checkpoint.

Builds a random-weight float16 checkpoint with the real key names and shapes of LLaVA-1.5-7B (Llama-2-7B language
model, CLIP ViT-L/14-336 tower, `mlp2x_gelu` projector) in a temporary directory, converts it in a child process
through the command-line entry point (`ms_llava.conversion.llava.main`, i.e. `convert_llava_to_ms_llava`, or
`ms_llava.conversion.original.main`), reports the child's peak resident set size (`ru_maxrss` of the `os.wait4` rusage of
that one child) and its wall time, then deletes every file it wrote.

Linux starts a child's `ru_maxrss` at its parent's resident set size when it is spawned, so this driver process stays
small: it imports neither torch nor ms_llava, and builds the synthetic checkpoint and compares tensors in children of
its own. It also measures a child that only imports torch, transformers and the conversion modules (the floor).

Conversions (`--conversion`):

* `llava-to-ms-llava` (default): a transformers LLaVA checkpoint in the transformers 4.x key layout of
  `llava-hf/llava-1.5-7b-hf` (`language_model.model.*`, `vision_tower.vision_model.*`, `multi_modal_projector.*`,
  32064-row vocabulary, sharded safetensors + index, LlavaProcessor) -> MS-LLaVA, with `--no-parity` unless `--parity`.
* `original-round-trip`: an original-format checkpoint in the layout of `liuhaotian/llava-v1.5-7b` (`model.*`,
  `lm_head.*`, `model.mm_projector.*`, the CLIP tower under `model.vision_tower.vision_tower.vision_model.*`, 32000-row
  vocabulary, sharded `pytorch_model-*.bin` + index; `mm_vision_tower` a local CLIP config directory) -> HF
  (`original-to-hf`), then that HF checkpoint -> original (`hf-to-original --strip-image-token`), each in its own
  child, both with `--no-parity`; checks the round trip gave back every tensor bit for bit.

Disk: about twice the synthetic checkpoint for `llava-to-ms-llava` (source + output; 14.1 GB each at the full 32
layers, so ~28.3 GB; 2.8 GB each with `--layers 4`, ~5.6 GB) and three times for `original-round-trip` (~42.4 GB at
32 layers, ~8.4 GB with `--layers 4`). The script first checks that `--workdir` (default: the system temporary
directory) has that much free, plus 2 % and 1 GiB (30 / 7 GB and 44 / 10 GB).

Memory: each synthetic source shard is built in memory (safetensors' `save_file`, or `torch.save` for a `.bin`), so
building the source needs RAM for its largest shard (`--source-shard-size`: 4.95 GB, or 10 GB for
`original-round-trip`). That happens in a child of its own and is not part of the measured peaks.

Run from the repository root, with the package installed:

    python benchmarks/conversion_memory.py                                           # llava-to-ms-llava, 7B size
    python benchmarks/conversion_memory.py --layers 4 --source-shard-size 1GB        # 4 language-model layers
    python benchmarks/conversion_memory.py --layers 4 --source-shard-size 1GB --parity
    python benchmarks/conversion_memory.py --conversion original-round-trip          # original -> HF -> original
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
DEFAULT_SOURCE_SHARD_SIZE = {"llava-to-ms-llava": "4.95GB", "original-round-trip": "10GB"}
# The child: `python -c CHILD module args...` runs `module.main(args)`, the conversion's command line.
CHILD = "import importlib, sys; sys.exit(importlib.import_module(sys.argv[1]).main(sys.argv[2:]))"
IMPORTS_ONLY = "import ms_llava.conversion.llava, ms_llava.conversion.original"


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


def original_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    """The original code base's keys (LlavaLlamaForCausalLM, tower saved) and shapes."""
    return {
        **language_model_shapes(layers, "model.", ORIGINAL_VOCAB),
        **projector_shapes("model.mm_projector.0.", "model.mm_projector.2."),
        **clip_shapes("model.vision_tower.vision_tower.vision_model."),
        "lm_head.weight": (ORIGINAL_VOCAB, TEXT_HIDDEN),
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
    import torch
    from transformers import AddedToken, LlavaConfig, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from ms_llava import LLAVA_1_5_CHAT_TEMPLATE
    from ms_llava.conversion.checkpoint_io import TensorSource, write_safetensors

    directory.mkdir(parents=True)
    shapes = llava_hf_shapes(layers)
    generator = torch.Generator().manual_seed(0)
    entries = [
        (name, TensorSource(name, torch.float16, shape, lambda s=shape: random_tensor(s, generator), "random"))
        for name, shape in shapes.items()
    ]
    weight_map = write_safetensors(entries, directory, shard_bytes)

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
    return shapes, len(set(weight_map.values()))


def make_original(directory: Path, layers: int, shard_bytes: int) -> tuple[dict, int]:
    """An original-format checkpoint: `pytorch_model-0000i-of-0000n.bin` shards (each built in memory and saved with
    torch.save) + index, the original config.json (mm_vision_tower: a local CLIP config directory next to it), a
    tokenizer without <image>. Returns the shapes and the shard count."""
    import torch

    directory.mkdir(parents=True)
    shapes = original_shapes(layers)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = numel(shape) * DTYPE_BYTES
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for number, group in enumerate(groups, start=1):
        file_name = f"pytorch_model-{number:05d}-of-{len(groups):05d}.bin"
        shard = {name: random_tensor(shapes[name], generator) for name in group}
        torch.save(shard, directory / file_name)
        del shard
        weight_map.update(dict.fromkeys(group, file_name))
    index = {"metadata": {"total_size": checkpoint_bytes(shapes)}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))

    clip_dir = directory.parent / "clip-vit-large-patch14-336"
    clip_config().save_pretrained(clip_dir)
    config = {
        **{
            name: value
            for name, value in llama_config(layers, ORIGINAL_VOCAB, pad_token_id=0).to_dict().items()
            if name not in ("rope_parameters", "dtype", "transformers_version", "architectures", "model_type")
        },
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "torch_dtype": "float16",
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "mm_vision_tower": str(clip_dir),
        "mm_hidden_size": VISION_HIDDEN,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "mm_patch_merge_type": "flat",
        "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False,
        "unfreeze_mm_vision_tower": True,
        "use_mm_proj": True,
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    word_level_tokenizer(ORIGINAL_VOCAB).save_pretrained(directory)
    return shapes, len(groups)


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


def convert(module: str, arguments: list[str]) -> dict:
    """Runs `module.main(arguments)` in a child; prints its report; exits if it failed."""
    result = run_child(["-c", CHILD, module, *arguments])
    if result["returncode"] != 0:
        sys.exit(f"the conversion failed (exit {result['returncode']}):\n{result['output']}")
    for line in result["output"].splitlines():
        print(f"    {line}")
    return result


def directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def build_source(conversion: str, directory: Path, layers: int, shard_bytes: int) -> None:
    """--internal-build (in a child): writes the synthetic source, prints its shard count."""
    _, shards = (make_original if conversion == "original-round-trip" else make_llava_hf)(
        directory, layers, shard_bytes
    )
    print(json.dumps({"shards": shards}))


def compare_checkpoints(first: Path, second: Path) -> None:
    """--internal-compare (in a child): prints whether the two checkpoints hold the same tensors, bit for bit."""
    import torch

    from ms_llava.conversion.checkpoint_io import read_checkpoint

    before = {source.name: source for source in read_checkpoint(first)}
    after = {source.name: source for source in read_checkpoint(second)}
    same = sorted(before) == sorted(after)
    for name in before if same else ():
        expected, actual = before[name].load(), after[name].load()
        same = expected.dtype == actual.dtype and torch.equal(expected.view(torch.uint8), actual.view(torch.uint8))
        if not same:
            break
    print(json.dumps({"tensors": len(after), "same": same}))


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
    parser.add_argument(
        "--conversion", choices=("llava-to-ms-llava", "original-round-trip"), default="llava-to-ms-llava"
    )
    parser.add_argument("--layers", type=int, default=TEXT_LAYERS, help="language-model layers (32: the full 7B)")
    parser.add_argument(
        "--source-shard-size",
        help="largest shard of the synthetic source (default 4.95GB for llava-to-ms-llava, as llava-hf's; 10GB for "
        "original-round-trip, as liuhaotian/llava-v1.5-7b's .bin shards)",
    )
    parser.add_argument("--parity", action="store_true", help="llava-to-ms-llava: run the parity check too")
    parser.add_argument("--workdir", help="where the temporary directory goes (default: the system temp directory)")
    parser.add_argument("--internal-build", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--internal-compare", nargs=2, metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.layers < 1:
        parser.error("--layers must be at least 1")
    shard_bytes = parse_size(args.source_shard_size or DEFAULT_SOURCE_SHARD_SIZE[args.conversion])
    if args.internal_build:
        build_source(args.conversion, Path(args.internal_build), args.layers, shard_bytes)
        return 0
    if args.internal_compare:
        compare_checkpoints(*map(Path, args.internal_compare))
        return 0
    round_trip = args.conversion == "original-round-trip"
    shapes = original_shapes(args.layers) if round_trip else llava_hf_shapes(args.layers)
    source_bytes = checkpoint_bytes(shapes)
    copies = 3 if round_trip else 2  # source + output(s)
    needed = int(copies * source_bytes * 1.02) + 2**30
    workdir = Path(args.workdir or tempfile.gettempdir())
    free = shutil.disk_usage(workdir).free
    print(machine())
    print(
        f"{args.conversion}: the synthetic checkpoint is {source_bytes / 1e9:.2f} GB; about {needed / 1e9:.1f} GB of "
        f"disk needed in {workdir} ({free / 1e9:.1f} GB free)"
    )
    if free < needed:
        print(f"error: not enough free disk in {workdir}; pass --workdir or fewer --layers", file=sys.stderr)
        return 1

    baseline = run_child(["-c", IMPORTS_ONLY])
    print(f"importing torch, transformers and ms_llava alone: peak RSS {format_bytes(baseline['peak_rss'])}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="ms-llava-conversion-memory-", dir=workdir) as temporary:
        root = Path(temporary)
        started = time.perf_counter()
        source = root / "source"
        build = ["--conversion", args.conversion, "--layers", str(args.layers), "--internal-build", str(source)]
        shards = child_json([*build, "--source-shard-size", str(shard_bytes)])["shards"]
        parameters = sum(numel(shape) for shape in shapes.values())
        kind = "`pytorch_model-*.bin` (original layout)" if round_trip else "safetensors (transformers 4.x layout)"
        described = (
            f"{args.layers} language-model layer{'s' if args.layers > 1 else ''}: {parameters / 1e9:.2f}e9 "
            f"parameters, {source_bytes / 1e9:.2f} GB float16, {shards} {kind} shard{'s' if shards > 1 else ''} of "
            f"<= {shard_bytes / 1e9:.2f} GB"
        )
        print(f"synthetic source ({described}) written in {time.perf_counter() - started:.0f} s")

        if not round_trip:
            arguments = ["--source", str(source), "--output", str(root / "ms-llava"), "--num-queries", "144"]
            result = convert("ms_llava.conversion.llava", arguments + ([] if args.parity else ["--no-parity"]))
            name = "llava-to-ms-llava" + (" (with parity)" if args.parity else " --no-parity")
            rows.append((name, result, directory_bytes(root / "ms-llava")))
        else:
            result = convert(
                "ms_llava.conversion.original", ["--source", str(source), "--output", str(root / "hf"), "--no-parity"]
            )
            rows.append(("original-to-hf --no-parity", result, directory_bytes(root / "hf")))
            result = convert(
                "ms_llava.conversion.original",
                ["--direction", "hf-to-original", "--source", str(root / "hf"), "--output", str(root / "back")]
                + ["--strip-image-token", "--no-parity"],
            )
            rows.append(("hf-to-original --strip-image-token --no-parity", result, directory_bytes(root / "back")))
            compared = child_json(["--internal-compare", str(source), str(root / "back")])
            same = compared["same"]
            print(
                f"round trip: {compared['tensors']} tensors, {'all bit-identical' if same else 'DIFFERENT'} to the source"
            )
            if not same:
                return 1
    print(f"deleted {temporary}")
    print()
    print("| conversion | source | peak RSS (child, os.wait4) | peak RSS (its report) | wall time | output |")
    print("|---|---|---|---|---|---|")
    for name, result, written in rows:
        print(
            f"| `{name}` | {described} | {format_bytes(result['peak_rss'])} | {result['reported_peak_rss']} | "
            f"{result['seconds']:.0f} s | {written / 1e9:.2f} GB |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
