"""The paper's workflow on tiny parts, end to end with the field's tools: compose a CLIP tower and a Llama LLM -> train
the two stages (the `trained_checkpoint` fixture) -> `python -m ms_llava.evaluation` under `torchrun` with two
processes, running the checkpoint's own modules (remote code) on a local copy of lmms-eval's POPE task -> `ms-llava
push --results` to the loopback Hub -> the card read back carries the evaluated number, labelled as the local,
counted run it was. Every answer equals the model's own `generate`; every metric equals the one computed by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from lmms_helpers import POST_PROMPT, load, pope_columns, read_samples, reference_answer, write_local_task

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster, and steady on a shared machine


@pytest.mark.slow
def test_compose_train_evaluate_in_two_processes_push_card(tmp_path, trained_checkpoint, free_port, hub, run_cli):
    columns = pope_columns(6, seed=7)
    tasks = write_local_task(tmp_path, "pope_local", {"test": columns}, builtin="pope/pope.yaml")
    model, processor = load(trained_checkpoint)
    expected = {
        index: reference_answer(model, processor, question + POST_PROMPT, [image], 4)
        for index, (question, image) in enumerate(zip(columns["question"], columns["image"], strict=True))
    }

    results, samples, metrics = tmp_path / "results.json", tmp_path / "samples.jsonl", tmp_path / "lmms.json"
    command = [
        BIN / "torchrun",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "ms_llava.evaluation",
        "--model",
        trained_checkpoint,
        "--trust-remote-code",
        "--tasks",
        "pope_local",
        "--include-path",
        tasks,
        "--batch-size",
        "3",
        "--output",
        results,
        "--log-samples",
        samples,
        "--lmms-eval-output",
        metrics,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    log = run.stderr + run.stdout
    assert run.returncode == 0 and "Traceback" not in log, log[-4000:]
    assert "rank 0 of 2" in log and "rank 1 of 2" in log  # two processes, each its share
    assert "transformers_modules" in log  # the checkpoint's own modules ran, not the package's

    # batch 3 with left padding, in two processes, answers as batch 1 without padding does
    answers = {doc_id: line["answer"] for doc_id, line in read_samples(samples)["pope_local"].items()}
    assert answers == expected
    predictions = [expected[index].lower() for index in range(6)]
    assert set(predictions) <= {"yes", "no"} and "yes" in predictions, predictions  # the model answers the task
    truth = columns["answer"]
    tp = sum(p == "yes" and t == "yes" for p, t in zip(predictions, truth, strict=True))
    fp = sum(p == "yes" and t == "no" for p, t in zip(predictions, truth, strict=True))
    fn = sum(p == "no" and t == "yes" for p, t in zip(predictions, truth, strict=True))
    accuracy = sum(p == t for p, t in zip(predictions, truth, strict=True)) / len(truth)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    assert tp > 0
    pope = json.loads(metrics.read_text())["pope_local"]
    assert pope["pope_accuracy,none"] == pytest.approx(accuracy)
    assert pope["pope_precision,none"] == pytest.approx(precision)
    assert pope["pope_recall,none"] == pytest.approx(recall)
    assert pope["pope_f1_score,none"] == pytest.approx(f1)
    (row,) = json.loads(results.read_text())["rows"]
    assert row == {
        "task": "pope_local",
        "metric": "pope_f1_score",
        "score": round(100 * f1, 4),
        "benchmark": None,
        "source": {"local": str(tmp_path / "data" / "pope_local")},
        "num_samples": 6,
        "unreadable_samples": 0,
        "limit": None,
    }

    repo_id = "ms-llava-test/composed-evaluated"
    code, _, err = run_cli(["push", trained_checkpoint, repo_id, "--results", results, "--training", "paper"])
    assert code == 0, err
    card = ModelCard.load(repo_id).text
    header = next(line for line in card.splitlines() if "samples scored" in line)
    (line,) = [line for line in card.splitlines() if "pope_local" in line]
    cells = dict(zip(header.strip("| ").split(" | "), line.strip("| ").split(" | "), strict=True))
    assert cells["score"] == f"{row['score']:g}" and "local" in cells["data"] and cells["samples scored"] == "6"
    assert "| POPE |" not in card and "No evaluation results" not in card
