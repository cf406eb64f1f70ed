"""Multi-process training beyond DDP, on CPU: FSDP2 and DeepSpeed ZeRO-2 / ZeRO-3 with the configs in
configs/accelerate/, each against one process with the same global batch (the standard of tests/training/
test_training.py's DDP test: per-step losses and weights to 1e-5), and the checkpoint each writes loads with
`from_pretrained`.

Every run is `ms_llava.training` in a subprocess that sees no GPU: 2 processes x 4 examples per step against 1 process
x 4 examples x 2 accumulation steps, 4 steps of the finetune stage (vision tower frozen), text-only records mixed in.

- FSDP: accelerate 1.15 drops the FSDP plugin on CPU processes (they are MULTI_CPU, and FSDP is enabled only for GPU
  types), so the runs go through tests/training/fsdp_cpu_launch.py, which keeps it; the plugin, the sharding and the
  save are the shipped config's and accelerate's.
- DeepSpeed: not a dependency of the project; the tests run where `deepspeed` imports (it runs on CPU with its CPU
  accelerator, gloo and a shared-memory op it compiles on first use, which needs a C++ compiler).
"""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText

import ms_llava  # noqa: F401  (registers the Auto classes)
from ms_llava.testing_utils import write_shapes_dataset

REPO_ROOT = Path(__file__).resolve().parents[2]
ACCELERATE_CONFIGS = REPO_ROOT / "configs" / "accelerate"
FSDP_CPU_LAUNCH = Path(__file__).resolve().parent / "fsdp_cpu_launch.py"
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_training(launcher: list[str], arguments: list[str], **extra_environment: str) -> str:
    """Runs a training command in a subprocess that sees no GPU; returns its output, failing the test on an error."""
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    environment.update(extra_environment)
    completed = subprocess.run(
        [sys.executable, *launcher, *arguments], env=environment, capture_output=True, text=True, timeout=400
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    return output


def accelerate_launch(config: str) -> list[str]:
    return [
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ACCELERATE_CONFIGS / config),
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
    ]


def losses(output_dir: Path) -> list[float]:
    import csv

    with open(output_dir / "loss_log.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["step"]) for row in rows] == [1, 2, 3, 4]
    return [float(row["loss"]) for row in rows]


def loaded_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return AutoModelForImageTextToText.from_pretrained(output_dir).state_dict()


@pytest.fixture(scope="module")
def baseline(tiny_dir, tmp_path_factory):
    """The training arguments and one process's run (4 per device x 2 accumulation = global batch 8)."""
    directory = tmp_path_factory.mktemp("distributed")
    qa = json.loads(write_shapes_dataset(directory, "qa", 24, seed=1).read_text())
    text = json.loads(write_shapes_dataset(directory, "text", 8, seed=3).read_text())
    (directory / "mixed.json").write_text(json.dumps(qa + text))
    arguments = ["--stage", "finetune", "--model", str(tiny_dir), "--data", str(directory / "mixed.json")]
    arguments += ["--image-folder", str(directory / "images"), "--global-batch-size", "8"]
    arguments += ["--per-device-batch-size", "4", "--learning-rate", "1e-2", "--max-steps", "4"]
    arguments += ["--num-workers", "0", "--save-steps", "1000"]
    output = run_training(["-m", "ms_llava.training"], [*arguments, "--output-dir", str(directory / "one")])
    assert "global batch 8 = 4 per device x 2 accumulation x 1 process(es)" in output, output[-4000:]
    one = directory / "one"
    assert losses(one)[-1] < losses(one)[0] - 0.3  # the steps did train
    return {"arguments": arguments, "directory": directory, "losses": losses(one), "weights": loaded_weights(one)}


def check_against_one_process(baseline, output_dir: Path, output: str):
    assert "global batch 8 = 4 per device x 1 accumulation x 2 process(es)" in output, output[-4000:]
    torch.testing.assert_close(losses(output_dir), baseline["losses"], **TOLERANCE)
    weights = loaded_weights(output_dir)  # the saved checkpoint loads with from_pretrained
    assert weights.keys() == baseline["weights"].keys()
    for key, value in baseline["weights"].items():
        torch.testing.assert_close(weights[key], value, **TOLERANCE, msg=key)


def check_checkpoint_files(output_dir: Path):
    """The folder is a normal MS-LLaVA checkpoint: our four module files and auto_map, nothing else's code."""
    config = json.loads((output_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_ms_llava.MSLlavaForConditionalGeneration"
    assert config["architectures"] == ["MSLlavaForConditionalGeneration"]
    python_files = sorted(path.name for path in output_dir.glob("*.py"))
    assert python_files == [
        "configuration_ms_llava.py",
        "image_processing_ms_llava.py",
        "modeling_ms_llava.py",
        "processing_ms_llava.py",
    ]


@pytest.mark.slow
def test_fsdp_two_processes_match_one_with_the_same_global_batch(baseline):
    """configs/accelerate/fsdp.yaml (FSDP2, transformer-based wrap of the LLM's and the tower's layers and the
    MS-Resampler, FULL_STATE_DICT) with 2 CPU processes; mixed precision off (the config's bf16 is for GPUs)."""
    output_dir = baseline["directory"] / "fsdp"
    launcher = [*accelerate_launch("fsdp.yaml"), "--mixed_precision", "no", str(FSDP_CPU_LAUNCH)]
    output = run_training(launcher, [*baseline["arguments"], "--output-dir", str(output_dir)])
    assert "fsdp_cpu_launch: FSDP kept" in output and "DDP constructor" not in output, output[-4000:]
    check_against_one_process(baseline, output_dir, output)
    check_checkpoint_files(output_dir)


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", ["--gradient-checkpointing", "fsdp_activation_checkpointing"])
def test_fsdp_with_activation_checkpointing_and_the_frozen_vision_tower(baseline, tiny_dir, checkpointing):
    """Activation checkpointing under FSDP while the vision tower is frozen (finetune stage), either transformers'
    (`--gradient-checkpointing`) or FSDP's own (`fsdp_activation_checkpointing: true`, torch's checkpoint_wrapper on
    the wrap units): the recomputation changes no loss or weight, and the frozen tower comes back unchanged. (FSDP's
    failed before the model stopped filling a KV cache in training: the recomputed decoder layers appended their keys
    to it a second time, "The size of tensor a (102) must match the size of tensor b (51)".)"""
    output_dir = baseline["directory"] / f"fsdp_{checkpointing.strip('-')}"
    launcher = [*accelerate_launch("fsdp.yaml"), "--mixed_precision", "no"]
    arguments = [*baseline["arguments"], "--output-dir", str(output_dir)]
    if checkpointing == "--gradient-checkpointing":
        arguments.append(checkpointing)
    else:
        launcher += ["--fsdp_activation_checkpointing", "true"]
    output = run_training([*launcher, str(FSDP_CPU_LAUNCH)], arguments, FSDP_CPU_LAUNCH_COUNT_CHECKPOINTS="1")
    assert "fsdp_cpu_launch: FSDP kept" in output, output[-4000:]
    if checkpointing == "--gradient-checkpointing":
        # transformers' per-layer checkpointing ran: the LLM's and the tower's layers, 4 steps, on both processes
        counts = [int(count) for count in re.findall(r"fsdp_cpu_launch: (\d+) checkpointed layer calls", output)]
        assert len(counts) == 2 and min(counts) > 0, output[-4000:]
    check_against_one_process(baseline, output_dir, output)
    check_checkpoint_files(output_dir)
    initial = loaded_weights(tiny_dir)
    trained = loaded_weights(output_dir)
    tower = [key for key in initial if ".vision_tower." in key]
    assert tower
    for key in tower:
        assert torch.equal(trained[key], initial[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_two_processes_match_one_with_the_same_global_batch(baseline, stage):
    """configs/accelerate/deepspeed_zero{2,3}.yaml (ZeRO-3 with zero3_init_flag: the weights are partitioned while
    from_pretrained builds the model, and gathered in 16-bit... here fp32, on save) with 2 CPU processes."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed; not a dependency)")
    output_dir = baseline["directory"] / f"zero{stage}"
    launcher = [*accelerate_launch(f"deepspeed_zero{stage}.yaml"), "-m", "ms_llava.training"]
    output = run_training(launcher, [*baseline["arguments"], "--output-dir", str(output_dir)])
    check_against_one_process(baseline, output_dir, output)
    check_checkpoint_files(output_dir)


def test_a_training_forward_fills_no_kv_cache(tiny):
    """In training mode the model asks its LLM for no KV cache unless the caller does (what lets FSDP's activation
    checkpointing recompute a decoder layer); in eval mode the cache is there as before."""
    model, processor = tiny
    inputs = processor(text="USER: Hi ASSISTANT: Hello", return_tensors="pt")
    try:
        model.train()
        assert model(**inputs).past_key_values is None
        assert model(**inputs, use_cache=True).past_key_values is not None
    finally:
        model.eval()
    with torch.no_grad():
        assert model(**inputs).past_key_values is not None
