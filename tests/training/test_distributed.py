"""Several processes on CPU: DDP, FSDP2 and DeepSpeed ZeRO-2 / ZeRO-3 with the configs in configs/accelerate/, each
against one process with the same global batch (per-step losses and weights to 1e-5), and the checkpoint each writes
loads with `from_pretrained`.

One process runs in this process (4 examples x 2 accumulation steps); every launch is `accelerate launch` with 2
processes x 4 examples in subprocesses that see no GPU, 4 steps of the finetune stage (vision tower frozen) with
text-only records mixed in (a rank may see no image: the projector is then unused there).

- FSDP: accelerate drops the FSDP plugin on CPU processes (they are MULTI_CPU; FSDP is enabled only for GPU types),
  so the runs go through tests/training/fsdp_cpu_launch.py, which keeps it.
- DeepSpeed: not a dependency; the tests run where `deepspeed` imports.
"""

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText

from ms_llava.training import train

ACCELERATE_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
FSDP_CPU_LAUNCH = Path(__file__).resolve().parent / "fsdp_cpu_launch.py"
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
SETTINGS = {"global_batch_size": 8, "per_device_batch_size": 4, "learning_rate": 1e-2, "max_steps": 4}
SETTINGS.update(dataloader_num_workers=0, save_steps=1000)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def losses(output_dir: Path) -> list[float]:
    import csv

    with open(output_dir / "loss_log.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["step"]) for row in rows] == [1, 2, 3, 4]
    return [float(row["loss"]) for row in rows]


def loaded_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return AutoModelForImageTextToText.from_pretrained(output_dir).state_dict()


@pytest.fixture(scope="module")
def baseline(tiny_dir, shapes, tmp_path_factory, free_port):
    """One process's run (4 per device x 2 accumulation = global batch 8) and `launch(config, folder, ...)`, which
    runs the same training with 2 processes, checks it against the one, and returns its output and folder."""
    directory = tmp_path_factory.mktemp("distributed")
    records = json.loads(shapes["qa24"].read_text()) + json.loads(shapes["text"].read_text())[:8]
    (directory / "mixed.json").write_text(json.dumps(records))
    one = directory / "one"
    logger = logging.getLogger("ms_llava.training.trainer")
    logger.setLevel(logging.INFO)
    handler = logging.FileHandler(directory / "one.log")
    logger.addHandler(handler)
    try:
        train(tiny_dir, "finetune", directory / "mixed.json", shapes["images"], one, **SETTINGS)
    finally:
        logger.removeHandler(handler)
    assert "global batch 8 = 4 per device x 2 accumulation x 1 process(es)" in (directory / "one.log").read_text()
    assert losses(one)[-1] < losses(one)[0] - 0.3  # the steps did train
    arguments = ["--stage", "finetune", "--model", tiny_dir, "--data", directory / "mixed.json", "--image-folder"]
    arguments += [shapes["images"], "--global-batch-size", "8", "--per-device-batch-size", "4", "--learning-rate"]
    arguments += ["1e-2", "--max-steps", "4", "--num-workers", "0", "--save-steps", "1000"]

    def launch(config: str, folder: str, launcher: list[str], *extra: str, **environment: str) -> str:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", ACCELERATE_CONFIGS / config]
        command += ["--num_processes", "2", "--main_process_port", free_port(), *launcher, *arguments, *extra]
        command += ["--output-dir", directory / folder]
        environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **environment}
        completed = subprocess.run(
            list(map(str, command)),
            env={**environment, "TOKENIZERS_PARALLELISM": "false"},
            capture_output=True,
            text=True,
            timeout=400,
        )
        output = completed.stdout + completed.stderr
        assert completed.returncode == 0, output[-4000:]
        assert "global batch 8 = 4 per device x 1 accumulation x 2 process(es)" in output, output[-4000:]
        # the pre-pass ran on the main process only; the others took its result
        assert output.count("pre-pass (process") == 1 and "pre-pass (process 0): checking 32 records" in output
        torch.testing.assert_close(losses(directory / folder), losses(one), **TOLERANCE)
        weights, expected = loaded_weights(directory / folder), loaded_weights(one)
        assert weights.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(weights[key], value, **TOLERANCE, msg=key)
        check_checkpoint_files(directory / folder)
        return output, directory / folder

    return launch


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


def test_ddp_two_processes_match_one_with_the_same_global_batch(baseline):
    """configs/accelerate/ddp.yaml, gloo: both draw the same seeded permutation (data_seed) and accelerate shards each
    global batch of 8 between the ranks; DDP averages the gradients of per-rank losses that Trainer normalises by the
    global token count (measured: identical)."""
    baseline("ddp.yaml", "ddp", ["-m", "ms_llava.training"])


@pytest.mark.parametrize("checkpointing", ["--gradient-checkpointing", "fsdp_activation_checkpointing"])
def test_fsdp_with_activation_checkpointing_and_the_frozen_vision_tower(baseline, tiny_dir, checkpointing):
    """configs/accelerate/fsdp.yaml (FSDP2, transformer-based wrap of the LLM's and the tower's layers and the
    MS-Resampler, FULL_STATE_DICT), mixed precision off (the config's bf16 is for GPUs), with transformers' per-layer
    activation checkpointing (`--gradient-checkpointing`) or FSDP's own (torch's checkpoint_wrapper on the wrap units):
    the recomputation changes no loss or weight, and the frozen tower comes back unchanged. (FSDP's failed before the
    model stopped filling a KV cache in training: recomputed layers appended their keys to it a second time.)"""
    transformers_checkpointing = checkpointing == "--gradient-checkpointing"
    launcher = ["--mixed_precision", "no"] + ["--fsdp_activation_checkpointing", "true"] * (
        not transformers_checkpointing
    )
    output, folder = baseline(
        "fsdp.yaml",
        f"fsdp_{checkpointing.strip('-')}",
        [*launcher, FSDP_CPU_LAUNCH],
        *[checkpointing] * transformers_checkpointing,
        FSDP_CPU_LAUNCH_COUNT_CHECKPOINTS="1",
    )
    assert "fsdp_cpu_launch: FSDP kept" in output and "DDP constructor" not in output, output[-4000:]
    if transformers_checkpointing:
        # transformers' per-layer checkpointing ran: the LLM's and the tower's layers, 4 steps, on both processes
        counts = [int(count) for count in re.findall(r"fsdp_cpu_launch: (\d+) checkpointed layer calls", output)]
        assert len(counts) == 2 and min(counts) > 0, output[-4000:]
    initial = loaded_weights(tiny_dir)
    trained = loaded_weights(folder)
    tower = [key for key in initial if ".vision_tower." in key]
    assert tower and all(torch.equal(trained[key], initial[key]) for key in tower)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_two_processes_match_one_with_the_same_global_batch(baseline, stage):
    """configs/accelerate/deepspeed_zero{2,3}.yaml (ZeRO-3 with zero3_init_flag: the weights are partitioned while
    from_pretrained builds the model, and gathered, here in fp32, on save) with 2 CPU processes."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed; not a dependency)")
    baseline(f"deepspeed_zero{stage}.yaml", f"zero{stage}", ["-m", "ms_llava.training"])
