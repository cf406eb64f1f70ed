"""`lmms-eval --model ms_llava` as a user runs it (a subprocess of lmms-eval's own command line): a remote-code
checkpoint (`trust_remote_code=True`, the checkpoint's modules), and lmms-eval's multi-process mode (`torchrun
--nproc_per_node 2 -m lmms_eval`, two CPU processes sharing the requests). Both answer every sample as the model's
own `generate` does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lmms_helpers import POST_PROMPT, load, reference_answer, write_local_task

from ms_llava.testing_utils import COLOURS, SHAPES, draw_shape

BIN = Path(sys.executable).parent


def pope_task(root: Path):
    import random

    rng = random.Random(7)
    columns = {"question_id": [], "question": [], "answer": [], "image": [], "category": []}
    for index in range(10):
        colour = list(COLOURS)[index % 4]
        asked = colour if index % 3 else list(COLOURS)[(index + 1) % 4]
        columns["question_id"].append(str(index))
        columns["question"].append(f"Is there a {asked} object in the image?")
        columns["answer"].append("yes" if asked == colour else "no")
        columns["image"].append(draw_shape(colour, SHAPES[index % 2], rng))
        columns["category"].append("random")
    return write_local_task(root, "pope_local", {"test": columns}, builtin="pope/pope.yaml"), columns


def lmms_eval(command: list[str], checkpoint, tasks, output: Path, model_args: str = "", cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = [*command, "--model", "ms_llava", "--model_args", f"pretrained={checkpoint},max_new_tokens=4{model_args}"]
    args += ["--tasks", "pope_local", "--include_path", str(tasks), "--batch_size", "3"]
    args += ["--output_path", str(output), "--log_samples"]
    run = subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-4000:]
    (samples,) = output.rglob("*_samples_pope_local.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    return {row["doc_id"]: row["filtered_resps"] for row in rows}, run.stderr + run.stdout  # the CLI logs one string


@pytest.mark.slow
def test_lmms_eval_command_line_remote_code_and_two_processes(tmp_path, yes_no_checkpoint):
    tasks, columns = pope_task(tmp_path)
    model, processor = load(yes_no_checkpoint)
    expected = {
        index: reference_answer(model, processor, question + POST_PROMPT, [image], 4)
        for index, (question, image) in enumerate(zip(columns["question"], columns["image"], strict=True))
    }

    remote, log = lmms_eval(
        [str(BIN / "lmms-eval")], yes_no_checkpoint, tasks, tmp_path / "remote", ",trust_remote_code=True", tmp_path
    )
    assert "transformers_modules" in log  # the checkpoint's own modules ran, not the package's
    assert remote == expected

    command = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29533", "-m", "lmms_eval"]
    two, log = lmms_eval(command, yes_no_checkpoint, tasks, tmp_path / "two", cwd=tmp_path)
    assert "rank 0 of 2" in log and "rank 1 of 2" in log  # two processes, each its share
    assert two == expected

    # ms-llava eval's module form under the same launcher: the first process writes the card's results file
    results = tmp_path / "results.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [*command[:-2], "-m", "ms_llava.evaluation", "--model", str(yes_no_checkpoint), "--tasks", "pope_local"]
    command += ["--include-path", str(tasks), "--output", str(results), "--batch-size", "3"]
    run = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    truth = columns["answer"]
    tp = sum(expected[i] == "yes" and truth[i] == "yes" for i in expected)
    fp = sum(expected[i] == "yes" and truth[i] == "no" for i in expected)
    fn = sum(expected[i] == "no" and truth[i] == "yes" for i in expected)
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    assert tp > 0, expected
    assert json.loads(results.read_text()) == {"POPE": pytest.approx(round(100 * f1, 4))}
