"""`ms-llava convert llava-to-ms-llava` on tiny odd-sized random LLaVA checkpoints: bit-exact carry-over in every key
layout, strict key accounting, streaming shard by shard, staged output and what --overwrite may touch."""

import json
import re
import runpy
import sys
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from llava_checkpoints import leftovers, rewrite_weights, tensors_of
from messages import chat
from ms_llava import MSLlavaConfig, MSLlavaForConditionalGeneration, MSLlavaProcessor
from ms_llava.checkpoints import DOWNLOAD_PATTERNS
from ms_llava.conversion import ConversionError, convert_llava_to_ms_llava
from ms_llava.conversion.streaming import check_output, prepare_output, write_weights
from ms_llava.modeling_ms_llava import MSResampler
from ms_llava.testing_utils import sample_image
from ms_llava_cli import main

ROOT = Path(__file__).resolve().parents[2]
HUB_4X_BUFFER = "vision_tower.vision_model.embeddings.position_ids"
QUIET = {"log": lambda line: None}
TINY = {"num_queries": 16, **QUIET}
slow = pytest.mark.slow  # runs a conversion (with its parity check: three models loaded)


def run(args, capsys) -> tuple[int, str, str]:
    """`ms-llava ARGS` in this process: (exit status, stdout, stderr)."""
    try:
        code = main(args)
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------------------------- carry-over


@slow
@pytest.mark.parametrize("layout", ["saved by transformers 5", "new layout", "4.x hub layout"])
def test_llava_to_ms_llava_carries_tower_lm_tokenizer_over_bit_exactly(llava_dirs, layout, tmp_path):
    source = llava_dirs[layout]
    report = convert_llava_to_ms_llava(source, tmp_path / "out", num_queries=16, scope_windows=[2, 4, 8], **QUIET)
    output = tmp_path / "out"

    assert report.parity == {
        "language model logits (text-only prompt)": 0.0,
        "vision tower hidden states (random image)": 0.0,
    }
    projector_keys = [key for key in tensors_of(source) if "multi_modal_projector" in key]
    assert len(projector_keys) == 4
    expected_dropped = {"MLP projector replaced by MS-Resampler": projector_keys}
    if layout == "4.x hub layout":
        expected_dropped["buffer recomputed by transformers"] = [HUB_4X_BUFFER]
    assert report.dropped == expected_dropped
    source_model = LlavaForConditionalGeneration.from_pretrained(source)
    converted = AutoModelForImageTextToText.from_pretrained(output)
    assert isinstance(converted, MSLlavaForConditionalGeneration)
    converted_state = converted.state_dict()
    for name, tensor in source_model.state_dict().items():
        if "multi_modal_projector" not in name:
            assert torch.equal(converted_state[name], tensor), name
    assert converted.config.image_token_id == source_model.config.image_token_id == 4
    assert converted.config.vision_feature_layer == -2
    assert converted.config.vision_feature_select_strategy == "default"
    assert converted.config.resampler_config.num_queries == 16

    # tokenizer and chat template carried over, processor set to M
    processor, source_processor = AutoProcessor.from_pretrained(output), AutoProcessor.from_pretrained(source)
    assert isinstance(processor, MSLlavaProcessor) and processor.num_image_tokens == 16
    assert (output / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    assert (output / "chat_template.jinja").read_bytes() == (source / "chat_template.jinja").read_bytes()
    assert processor.chat_template == source_processor.chat_template
    assert processor.tokenizer.get_vocab() == source_processor.tokenizer.get_vocab()
    assert processor.image_processor.size == source_processor.image_processor.size
    assert processor.image_processor.crop_size == source_processor.image_processor.crop_size
    if layout == "saved by transformers 5":  # the converted checkpoint generates, M image tokens per image
        prompt = processor.apply_chat_template(chat("What is it?"), add_generation_prompt=True)
        inputs = processor(images=sample_image(40), text=prompt, return_tensors="pt")
        assert (inputs["input_ids"] == converted.config.image_token_id).sum() == 16
        generated = converted.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert generated.shape[1] == inputs["input_ids"].shape[1] + 3


@slow
def test_resampler_is_freshly_initialised_like_init_weights(llava_dirs, tmp_path):
    convert_llava_to_ms_llava(
        llava_dirs["new layout"],
        tmp_path / "out",
        num_queries=16,
        scope_bias_strength=3.0,
        fusion="mean",
        seed=7,
        check_parity=False,
        **QUIET,
    )
    written = tensors_of(tmp_path / "out")
    config = MSLlavaConfig.from_pretrained(tmp_path / "out")
    assert config.resampler_config.fusion == "mean" and config.resampler_config.scope_bias_strength == 3.0
    torch.manual_seed(7)
    expected = MSResampler(config)
    expected.reset_parameters()  # what _init_weights runs
    for name, tensor in expected.state_dict().items():
        assert torch.equal(written[f"model.multi_modal_projector.{name}"], tensor), name
    assert torch.equal(written["model.multi_modal_projector.input_layernorm.weight"], torch.ones(24))
    assert 0.015 < written["model.multi_modal_projector.queries"].std() < 0.025


@slow
def test_command_line_sizes_the_resampler_and_shards_the_output(llava_dirs, tmp_path, capsys):
    """`ms-llava convert llava-to-ms-llava` with the sizing flags and small shards: the card-relevant settings reach
    the config, the report is printed, every shard is at most the size (unless one tensor is larger) and loads."""
    args = ["convert", "llava-to-ms-llava", "--source", str(llava_dirs["saved by transformers 5"])]
    args += ["--output", str(tmp_path / "out"), "--num-queries", "16", "--scope-windows", "2", "8"]
    args += ["--scope-bias-strength", "2.5", "--fusion", "attention", "--resampler-hidden-size", "20"]
    code, printed, err = run([*args, "--resampler-heads", "5", "--max-shard-size", "40KB"], capsys)
    assert code == 0, err
    assert "dropped: MLP projector replaced by MS-Resampler: 4 keys" in printed
    assert "peak resident memory (RSS)" in printed and "max |difference| = 0" in printed
    resampler = MSLlavaConfig.from_pretrained(tmp_path / "out").resampler_config
    assert (resampler.scope_windows, resampler.scope_bias_strength, resampler.fusion) == ([2, 8], 2.5, "attention")
    assert (resampler.num_queries, resampler.hidden_size, resampler.num_attention_heads) == (16, 20, 5)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 3
    for shard in shards:  # at most 40 kB of tensors, unless one tensor alone is larger
        in_shard = [name for name, file in index["weight_map"].items() if file == shard]
        assert (tmp_path / "out" / shard).stat().st_size < 42_000 or len(in_shard) == 1
    model = MSLlavaForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert sorted(model.state_dict()) == sorted(index["weight_map"])
    code, printed, _ = run([*args, "--output", str(tmp_path / "out"), "--no-parity"], capsys)
    assert code == 1  # --output is not empty: refused, named
    code, printed, _ = run(["convert", "llava-to-ms-llava", "--help"], capsys)
    assert code == 0 and "576" in printed and "--resampler-hidden-size" in printed and "(default 16)" in printed


def test_write_weights_shards_are_indexed_within_the_size_and_loaded_one_shard_at_a_time(tmp_path):
    """Every shard opens with safe_open and holds exactly what the index's weight_map says; the weight map covers
    every key; a shard exceeds the size only when one tensor alone does; at most one shard's tensors are alive while
    writing (what bounds the conversions' memory); tensors sharing memory (tied in a .bin) are written both."""
    from safetensors import safe_open

    alive, peak = weakref.WeakSet(), [0]

    class Lazy:  # a source tensor, loaded on demand, its copies tracked
        def __init__(self, values: torch.Tensor):
            self.values, self.dtype, self.shape = values, values.dtype, tuple(values.shape)

        def load(self):
            tensor = self.values.clone()
            alive.add(tensor)
            peak[0] = max(peak[0], sum(t.nbytes for t in alive))
            return tensor

    torch.manual_seed(0)
    expected = {f"layers.{i}.weight": torch.randn(10 + 7 * i, 25) for i in range(12)}  # 1,000 to 8,700 bytes
    expected["embed.weight"] = torch.randn(130, 25)  # 13,000 bytes: alone in a shard above the size
    expected.update({"bf16": torch.randn(3, 5).bfloat16(), "int": torch.arange(6), "empty": torch.zeros(0, 4)})
    expected["scalar"] = torch.tensor(2.5)
    entries = {name: Lazy(tensor) for name, tensor in expected.items()}
    tied = torch.randn(7, 3)  # two keys, one storage: save_file would refuse them as they are
    entries.update({"tied.a": tied, "tied.b": tied})
    expected.update({"tied.a": tied, "tied.b": tied})
    max_shard_size = 10_000
    assert write_weights(entries, tmp_path, max_shard_size) == sum(t.nbytes for t in expected.values())

    assert peak[0] <= 13_000
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    assert sorted(weight_map) == sorted(expected)
    assert index["metadata"] == {
        "total_parameters": sum(tensor.numel() for tensor in expected.values()),
        "total_size": sum(tensor.nbytes for tensor in expected.values()),
    }
    shards = sorted(set(weight_map.values()))
    assert len(shards) > 3 and shards == sorted(path.name for path in tmp_path.glob("model-*.safetensors"))
    for shard in shards:
        with safe_open(str(tmp_path / shard), framework="pt") as handle:
            assert sorted(handle.keys()) == sorted(name for name, file in weight_map.items() if file == shard)
            assert handle.metadata() == {"format": "pt"}  # what transformers' from_pretrained expects
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        assert sum(t.nbytes for t in tensors.values()) <= max_shard_size or list(tensors) == ["embed.weight"], shard
        for name, tensor in tensors.items():
            assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name

    single = tmp_path / "single"  # under the size: one model.safetensors and no index
    single.mkdir()
    write_weights(entries, single, 10**9)
    assert sorted(path.name for path in single.iterdir()) == ["model.safetensors"]
    written = load_file(single / "model.safetensors")
    assert sorted(written) == sorted(expected) and all(torch.equal(written[k], v) for k, v in expected.items())


# --------------------------------------------------------------------------------------------- bad inputs


def test_bad_settings_and_non_llava_sources_are_refused_before_writing(llava_dirs, tmp_path):
    with pytest.raises(ConversionError, match=r"num_queries \(M\) must be a positive perfect square"):
        convert_llava_to_ms_llava(llava_dirs["new layout"], tmp_path / "out", num_queries=15, **QUIET)
    with pytest.raises(ConversionError, match="finer than the visual token grid"):
        convert_llava_to_ms_llava(llava_dirs["new layout"], tmp_path / "out", num_queries=144, **QUIET)
    (tmp_path / "ms").mkdir()
    (tmp_path / "ms" / "config.json").write_text(json.dumps({"model_type": "ms_llava"}))
    with pytest.raises(ConversionError, match="expected a transformers LLaVA checkpoint"):
        convert_llava_to_ms_llava(tmp_path / "ms", tmp_path / "out", **TINY)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def damaged(source: Path, target: Path, damage) -> Path:
    """A copy of `source` with one safetensors file, then `damage(tensors, folder)` applied."""
    folder = rewrite_weights(source, target)
    tensors = load_file(folder / "model.safetensors")
    damage(tensors, folder)
    return folder


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda t, d: save_file({**t, "model.image_newline": torch.zeros(32)}, d / "model.safetensors"),
            r"source keys the key map does not know: model\.image_newline \(model\.safetensors\)",
        ),
        (
            lambda t, d: save_file(
                {k: v for k, v in t.items() if k != "language_model.model.norm.weight"}, d / "model.safetensors"
            ),
            r"target keys no source key fills: model\.language_model\.norm\.weight",
        ),
        (
            lambda t, d: save_file(
                {**t, "language_model.lm_head.weight": torch.zeros(400, 16)}, d / "model.safetensors"
            ),
            r"shape mismatches: lm_head\.weight \(language_model\.lm_head\.weight in model\.safetensors: \[400, 16\]",
        ),
        (
            lambda t, d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-1000]),
            r"model\.safetensors is not a readable safetensors file \(truncated or corrupt",
        ),
        (
            lambda t, d: ((d / "model.safetensors").unlink(), torch.save({"model": t}, d / "pytorch_model.bin")),
            r"pytorch_model\.bin is not a plain state dict of tensors by name",
        ),
        (
            lambda t, d: (
                (d / "model.safetensors").unlink(),
                torch.save({**t, "x": _Pickled()}, d / "pytorch_model.bin"),
            ),
            r"pytorch_model\.bin is not a plain state dict: it holds pickled objects \(Unsupported global: GLOBAL \w+\), and unpickling them could run code",
        ),
        (
            lambda t, d: (d / "model.safetensors.index.json").write_text(
                json.dumps({"weight_map": {"a": "model-00002-of-00002.safetensors"}})
            ),
            r"model\.safetensors\.index\.json lists shards that are missing: model-00002-of-00002\.safetensors",
        ),
    ],
    ids=["unknown key", "missing key", "shape", "truncated", "nested .bin", "pickled object", "missing shard"],
)
def test_a_bad_source_is_named_and_nothing_is_written(damage, message, llava_dirs, tmp_path):
    """Strict key accounting (every source key used or dropped for a reason, every target filled, shapes as the
    config builds them), and unreadable weights: the error names the key and its file; no output folder is left."""
    source = damaged(llava_dirs["saved by transformers 5"], tmp_path / "src", damage)
    with pytest.raises(ValueError, match=message):  # ConversionError, or CheckpointError for unreadable weights
        convert_llava_to_ms_llava(source, tmp_path / "out", **TINY)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


class _Pickled:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_full_disk_is_named_before_any_weight_is_read(llava_dirs, tmp_path, monkeypatch):
    """The output folder's free space is checked (`outputs.check_writable`) before the source's weights are read."""
    import shutil

    from ms_llava.conversion import streaming

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    monkeypatch.setattr(streaming, "read_sources", lambda *a: pytest.fail("weights were read before the disk check"))
    with pytest.raises(OSError, match=r"GiB free, 0\.00 GiB are needed") as error:
        convert_llava_to_ms_llava(llava_dirs["new layout"], tmp_path / "out", **TINY)
    assert error.value.filename == str(tmp_path / "out")


# --------------------------------------------------------------------------------------------- the output folder


def previous_checkpoint(directory: Path, model_type: str = "ms_llava") -> Path:
    """A folder that looks like an earlier conversion's output (what --overwrite may replace)."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": model_type}))
    return directory


@slow
def test_overwrite_replaces_only_a_conversion_output_and_keeps_the_users_files(llava_dirs, tmp_path, monkeypatch):
    source, output = llava_dirs["new layout"], previous_checkpoint(tmp_path / "out")
    (output / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match=r"already holds a checkpoint \(config\.json\); .*pass --overwrite"):
        convert_llava_to_ms_llava(source, output, **TINY)
    assert (output / "keep.txt").read_text() == "mine"

    # a late failure (a parity mismatch) removes the staged folder and keeps what --output held
    from ms_llava.conversion import streaming

    monkeypatch.setattr(streaming, "max_abs_difference", lambda *args: 1e-3)
    with pytest.raises(ConversionError, match="parity check failed"):
        convert_llava_to_ms_llava(source, output, overwrite=True, **TINY)
    assert sorted(path.name for path in output.iterdir()) == ["config.json", "keep.txt"]
    assert json.loads((output / "config.json").read_text()) == {"model_type": "ms_llava"}
    monkeypatch.undo()

    report = convert_llava_to_ms_llava(source, output, overwrite=True, check_parity=False, **TINY)
    assert (output / "keep.txt").read_text() == "mine" and (output / "config.json").is_file()
    assert report.output == output and not [path for path in output.iterdir() if path.is_dir()]
    convert_llava_to_ms_llava(source, output, seed=3, overwrite=True, check_parity=False, **TINY)  # its own output
    assert MSLlavaConfig.from_pretrained(output).model_type == "ms_llava" and not leftovers(tmp_path)


@pytest.mark.parametrize(
    "setup",
    [
        "project folder",
        "config.json of another model",
        "config.json that is not JSON",
        "checkpoint with a subdirectory",
    ],
)
def test_overwrite_replaces_the_checkpoint_files_only_whatever_else_the_folder_holds(setup, llava_dirs, tmp_path):
    """Without --overwrite a folder that holds a checkpoint (a config.json, weights) is refused and unchanged, and one
    that holds none gets the checkpoint next to its files; with --overwrite only the checkpoint's files are replaced:
    notes, source code, a .git folder are kept as they were."""
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    if setup == "project folder":
        (output / "src").mkdir()
        (output / "src" / "main.py").write_text("print('mine')")
    elif setup == "config.json of another model":
        (output / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    elif setup == "config.json that is not JSON":
        (output / "config.json").write_text("{not json")
    else:
        (output / "config.json").write_text(json.dumps({"model_type": "llava"}))
        (output / ".git").mkdir()
        (output / ".git" / "HEAD").write_text("ref")
    others = {
        str(p.relative_to(output)): p.read_bytes()
        for p in output.rglob("*")
        if p.is_file() and p.name != "config.json"
    }
    if setup != "project folder":
        with pytest.raises(
            ConversionError, match=rf"{re.escape(str(output))} already holds a checkpoint \(config\.json\)"
        ):
            convert_llava_to_ms_llava(llava_dirs["new layout"], output, check_parity=False, **TINY)
        assert (output / "config.json").read_bytes() != b"" and not (output / "model.safetensors").exists()
    convert_llava_to_ms_llava(
        llava_dirs["new layout"], output, overwrite=setup != "project folder", check_parity=False, **TINY
    )
    assert MSLlavaConfig.from_pretrained(output).model_type == "ms_llava"
    assert {name: (output / name).read_bytes() for name in others} == others and not leftovers(tmp_path)


def test_overwrite_never_replaces_the_working_directory_home_or_a_root(llava_dirs, tmp_path, monkeypatch, capsys):
    """`--output . --overwrite` in a folder (even one that looks like a checkpoint) is refused, and so is a folder
    holding the working directory, the home directory (also through a link) or a filesystem root."""
    project = previous_checkpoint(tmp_path / "project")
    (project / "keep.txt").write_text("mine")
    (project / "sub").mkdir()
    monkeypatch.chdir(project)
    args = ["convert", "llava-to-ms-llava", "--source", str(llava_dirs["new layout"]), "--num-queries", "16"]
    code, _, err = run([*args, "--no-parity", "--overwrite", "--output", "."], capsys)
    assert code == 1 and f"{project} cannot be written or replaced: it is the current working directory" in err
    monkeypatch.chdir(project / "sub")
    code, _, err = run([*args, "--no-parity", "--overwrite", "--output", ".."], capsys)
    assert code == 1 and "cannot be written or replaced: it contains the current working directory" in err
    assert sorted(path.name for path in project.iterdir()) == ["config.json", "keep.txt", "sub"]

    monkeypatch.chdir(tmp_path.parent)
    home = previous_checkpoint(tmp_path / "home")
    (home / "keep.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    (tmp_path / "link-to-home").symlink_to(home, target_is_directory=True)
    for output in (home, tmp_path / "link-to-home"):
        with pytest.raises(ConversionError, match=r"cannot be written or replaced: it is the home directory"):
            convert_llava_to_ms_llava(llava_dirs["new layout"], output, overwrite=True, **TINY)
    assert sorted(path.name for path in home.iterdir()) == ["config.json", "keep.txt"]
    with pytest.raises(ConversionError, match=r"it contains the home directory"):
        check_output(tmp_path, overwrite=True)
    with pytest.raises(ConversionError, match=r"^/ cannot be written or replaced: it is a filesystem root"):
        check_output("/", overwrite=True)
    with pytest.raises(ConversionError, match=r"would overwrite the source"):
        prepare_output(llava_dirs["new layout"].parent, [llava_dirs["new layout"]])
    assert not leftovers(tmp_path)


# --------------------------------------------------------------------------------------------- parity, sources


@slow
def test_parity_limit_image_token_and_failure_message(llava_dirs, tmp_path, monkeypatch):
    from ms_llava.conversion import streaming

    parameters = sum(
        tensor.numel()
        for tensor in MSLlavaForConditionalGeneration.from_pretrained(
            convert_llava_to_ms_llava(llava_dirs["new layout"], tmp_path / "a", check_parity=False, **TINY).output
        )
        .state_dict()
        .values()
    )
    monkeypatch.setattr(streaming, "PARITY_MAX_PARAMETERS", parameters)  # the limit itself is still checked
    report = convert_llava_to_ms_llava(llava_dirs["new layout"], tmp_path / "b", **TINY)
    assert set(report.parity.values()) == {0.0} and report.parity_skipped is None
    monkeypatch.setattr(streaming, "PARITY_MAX_PARAMETERS", 1000)
    report = convert_llava_to_ms_llava(llava_dirs["new layout"], tmp_path / "c", **TINY)
    assert report.parity == {} and report.parity_skipped.endswith("parameters > 1,000: too large to build both models")
    assert report.tensors_written == len(tensors_of(tmp_path / "c")) and report.peak_rss > 0 and report.seconds > 0
    for directory in (tmp_path / "c", llava_dirs["new layout"]):  # the output's image token is its source's
        processor, image_token_id = (
            AutoProcessor.from_pretrained(directory),
            AutoConfig.from_pretrained(directory).image_token_id,
        )
        assert (
            processor.image_token == "<image>"
            and processor.tokenizer.convert_ids_to_tokens(image_token_id) == "<image>"
        )
    monkeypatch.undo()
    monkeypatch.setattr(streaming, "max_abs_difference", lambda *args: 1e-3)
    with pytest.raises(
        ConversionError,
        match=r"^parity check failed, the carried-over parts differ: \{'language model logits \(text-only prompt\)': 0\.001",
    ):
        convert_llava_to_ms_llava(llava_dirs["new layout"], tmp_path / "d", **TINY)
    assert not (tmp_path / "d").exists()


def test_hub_sources_download_the_checkpoint_files_without_pickles(tmp_path, monkeypatch, capsys):
    """--source given as a Hub id downloads `checkpoints.DOWNLOAD_PATTERNS` (configs, safetensors, tokenizers of every
    kind, chat templates; no pickled weights), once, and a failure names both attempts; the command line says it in
    one line."""
    import huggingface_hub

    asked = []

    def snapshot_download(repo_id, allow_patterns):
        asked.append((repo_id, allow_patterns))
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(ValueError, match="not a local folder .* downloading it from the Hub failed: offline"):
        convert_llava_to_ms_llava("org/llava", tmp_path / "a", **QUIET)
    assert asked == [("org/llava", DOWNLOAD_PATTERNS)]
    assert {
        "config.json",
        "*.safetensors",
        "tokenizer.model",
        "merges.txt",
        "*.tiktoken",
        "chat_template.jinja",
    } <= set(DOWNLOAD_PATTERNS) and not [pattern for pattern in DOWNLOAD_PATTERNS if ".bin" in pattern]
    code, _, err = run(
        ["convert", "llava-to-ms-llava", "--source", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")],
        capsys,
    )
    assert code == 1 and "no such folder" in err and "Traceback" not in err and not (tmp_path / "out").exists()


def test_memory_benchmark_synthesises_llava_1_5_7b_keys_and_shapes():
    """benchmarks/conversion_memory.py's synthetic checkpoint has exactly the keys and shapes of LLaVA-1.5-7B as
    transformers builds it, once renamed by transformers' loader (checked on the meta device: no memory)."""
    import importlib.util

    from transformers import LlavaConfig

    from ms_llava.conversion.streaming import build_on_meta, loader_renames

    spec = importlib.util.spec_from_file_location("conversion_memory", ROOT / "benchmarks" / "conversion_memory.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    assert "torch" not in vars(benchmark)  # the driver stays light (see its docstring)
    assert benchmark.parse_size("4.95GB") == 4_950_000_000 and benchmark.parse_size("2GiB") == 2 * 2**30
    config = LlavaConfig(
        vision_config=benchmark.clip_config().to_dict(),
        text_config=benchmark.llama_config(32, 32064).to_dict(),
        image_token_index=31999,
    )
    meta = build_on_meta(LlavaForConditionalGeneration, config)
    rename, shapes = loader_renames(meta), benchmark.llava_hf_shapes(32)
    assert {rename(name): shape for name, shape in shapes.items()} == {
        k: tuple(v.shape) for k, v in meta.state_dict().items()
    }
    # llava-hf/llava-1.5-7b-hf's 7,063,427,072 parameters, in float16
    assert benchmark.checkpoint_bytes(shapes) == 2 * 7_063_427_072


def test_wrapper_script_is_the_command(monkeypatch, capsys):
    """conversion_scripts/convert_llava_to_ms_llava.py runs `ms-llava convert llava-to-ms-llava`."""
    monkeypatch.setattr(sys, "argv", ["convert_llava_to_ms_llava.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "conversion_scripts" / "convert_llava_to_ms_llava.py"), run_name="__main__")
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--source", "--output", "--num-queries", "--scope-windows", "--scope-bias-strength", "--fusion"):
        assert flag in help_text
