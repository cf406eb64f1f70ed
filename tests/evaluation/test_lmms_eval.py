"""The `ms_llava` lmms-eval model and `ms-llava eval`, run by the real lmms-eval on local tasks built from generated
images.

One `ms-llava eval` of the embedded default checkpoint over four local tasks (the module fixture `evaluated`) is
checked task by task: the numbers lmms-eval reports against the same metric computed here by hand from the model's own
`generate` (one sample at a time, no padding), the answers it scored (`--log-samples`) against those answers, and the
results record against both."""

from __future__ import annotations

import contextlib
import io
import json
import random
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from lmms_helpers import (
    POST_PROMPT,
    load,
    read_samples,
    reference_answer,
    scopebench_split,
    write_local_task,
    write_question_task,
)
from PIL import Image

from ms_llava.evaluation import RESULTS_FORMAT, results_record
from ms_llava.evaluation.lmms_model import MSLlavaLMMS
from ms_llava.testing_utils import COLOURS, SHAPES, draw_shape, write_tiny_checkpoint
from ms_llava_cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster, and steady on a shared machine


SEED_LETTERS, SEED_SAMPLES = "ABCD", 4


def seedbench_columns() -> dict[str, list]:
    """SEED-Bench's columns, two images per sample; the answer letters cycle A-D."""
    rng = random.Random(2)
    columns = {k: [] for k in ("question_id", "question", "choice_a", "choice_b", "choice_c", "choice_d")}
    columns.update(answer=[], data_type=[], image=[])
    for index in range(SEED_SAMPLES):
        colour, other = list(COLOURS)[index % 4], list(COLOURS)[(index + 1) % 4]
        columns["question_id"].append(str(index))
        columns["question"].append("What colour is the object with the digit?" if index % 2 else "What shape is it?")
        choices = rng.sample(["blue", "circle", "red", "square", "green", "yellow"], 4)
        for letter, choice in zip("abcd", choices, strict=True):
            columns[f"choice_{letter}"].append(choice)
        columns["answer"].append(SEED_LETTERS[index % 4])
        columns["data_type"].append("image")
        columns["image"].append([draw_shape(colour, SHAPES[index % 2], rng), draw_shape(other, SHAPES[0], rng)])
    return columns


def image_paths(folder: Path, count: int, broken: dict[int, str]) -> list[str]:
    """`count` images of a red circle in `folder`; index -> "missing" or "unreadable" in `broken`."""
    folder.mkdir(parents=True)
    rng, paths = random.Random(3), []
    for index in range(count):
        path = folder / f"{index}.png"
        if broken.get(index) == "unreadable":
            path.write_bytes(b"not a png")
        elif broken.get(index) != "missing":
            draw_shape("red", "circle", rng).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, default_checkpoint):
    """`ms-llava eval` of the default checkpoint on four local tasks, with `--log-samples` and `--lmms-eval-output`:
    gqa_local (lmms-eval's GQA YAML on ScopeBench's questions about 2 images), seedbench_local (lmms-eval's SEED-Bench YAML, two
    images per sample), scopebench (a YAML of our own, images by path), paths_task (5 images by path, 2 of them
    missing or unreadable)."""
    root = tmp_path_factory.mktemp("evaluated")
    gqa_path, records = scopebench_split(root / "gqa", 2)
    gqa = {
        "id": [record["id"] for record in records],
        "question": [record["conversations"][0]["value"].replace("<image>\n", "") for record in records],
        "answer": [record["conversations"][1]["value"] for record in records],
        "image": [Image.open(gqa_path.parent / "images" / record["image"]).convert("RGB") for record in records],
    }
    # GQA's `process_docs` fetches the images from the Hub: switched off for local data
    write_local_task(
        root, "gqa_local", {"testdev": gqa}, builtin="gqa/gqa.yaml", dataset_name="null", process_docs="null"
    )
    seed = seedbench_columns()
    write_local_task(root, "seedbench_local", {"test": seed}, builtin="seedbench/seedbench.yaml")
    qa_path = gqa_path  # the same questions, the images read from their files
    scopebench = {
        "question": [record["conversations"][0]["value"].replace("<image>\n", "") for record in records],
        "answer": [record["conversations"][1]["value"] for record in records],
        "image": [str(qa_path.parent / "images" / record["image"]) for record in records],
    }
    write_question_task(root, "scopebench", scopebench, "{max_new_tokens: 3, do_sample: false}")
    paths = {
        "question": ["What colour is the object with the digit?"] * 5,
        "answer": ["red"] * 5,
        "image": image_paths(root / "paths", 5, {1: "missing", 3: "unreadable"}),
    }
    tasks = write_question_task(root, "paths_task", paths, "{max_new_tokens: 3}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(
            [
                "eval",
                "--model",
                str(default_checkpoint),
                "--tasks",
                "gqa_local,seedbench_local,scopebench,paths_task",
                "--include-path",
                str(tasks),
                "--batch-size",
                "4",
                "--log-samples",
                str(root / "samples.jsonl"),
                "--lmms-eval-output",
                str(root / "lmms.json"),
                "--output",
                str(root / "results.json"),
            ]
        )
    assert code == 0, out.getvalue()
    record = json.loads((root / "results.json").read_text())
    return SimpleNamespace(
        out=out.getvalue(),
        record=record,
        rows={row["task"]: row for row in record["rows"]},
        metrics=json.loads((root / "lmms.json").read_text()),
        samples=read_samples(root / "samples.jsonl"),
        columns={"gqa_local": gqa, "seedbench_local": seed, "paths_task": paths},
        qa_path=qa_path,
        tasks=tasks,
    )


@pytest.fixture(scope="module")
def default_model(default_checkpoint):
    return load(default_checkpoint)


def answers_scored(evaluated, task: str) -> dict:
    return {doc_id: line["answer"] for doc_id, line in evaluated.samples[task].items()}


def test_entry_point_registers_the_model():
    from lmms_eval.models import get_model

    assert get_model("ms_llava") is MSLlavaLMMS


def lmms_results(results: dict, samples: dict[str, int]) -> dict:
    return {"results": results, "n-samples": {task: {"original": n, "effective": n} for task, n in samples.items()}}


def test_results_record_rows_in_the_papers_units_and_only_official_runs_named_as_its_benchmarks():
    pope = {"alias": "pope_local", "pope_f1_score,none": 0.8512, "pope_accuracy,none": 0.9}
    results = lmms_results(
        {
            "pope_local": pope,
            "gqa": {"exact_match,none": 0.62, "exact_match_stderr,none": 0.01},
            "mme": {"mme_perception_score,none": 1510.7, "mme_cognition_score,none": 300.0},
            "my_task": {"exact_match,none": 0.5, "note,none": "text"},
        },
        {"pope_local": 12, "gqa": 100, "mme": 50, "my_task": 4},
    )
    hub = {"dataset": "lmms-lab-encoder/GQA", "revision": "abc123"}
    sources = {
        "pope_local": {"local": "/data/pope"},
        "gqa": hub,
        "mme": {"dataset": "lmms-lab-encoder/MME", "revision": None},
        "my_task": {"local": "/data/mine"},
    }
    record = results_record(results, {"gqa": [3, 7]}, sources, None, "runs/stage2")
    assert record["format"] == RESULTS_FORMAT and record["model"] == "runs/stage2" and record["lmms_eval_version"]
    rows = {row["task"]: row for row in record["rows"]}
    assert [(row["task"], row["metric"], row["score"], row["benchmark"]) for row in record["rows"]] == [
        ("pope_local", "pope_f1_score", 85.12, None),  # a local copy: scored as POPE, never named so
        ("gqa", "exact_match", 62.0, "GQA"),
        ("mme", "mme_perception_score", 1510.7, "MME^P"),
        ("my_task", "exact_match", 0.5, None),
    ]
    assert rows["gqa"] | {"score": None} == {
        "task": "gqa",
        "metric": "exact_match",
        "score": None,
        "benchmark": "GQA",
        "source": hub,
        "num_samples": 98,
        "unreadable_samples": 2,
        "limit": None,
    }
    limited = results_record(results, {}, sources, 4, "m")["rows"]
    assert [row["benchmark"] for row in limited] == [None] * 4 and {row["limit"] for row in limited} == {4}
    with pytest.raises(ValueError, match="no numeric metric"):
        results_record(lmms_results({"t": {"alias": "t"}}, {"t": 3}), {}, {}, None, "m")
    # VQAv2 test-dev is scored by its server: lmms-eval's vqav2_test aggregates `submission` to None (no row)
    submission_only = {"vqav2_test_local": {"alias": "vqav2_test_local", "submission,none": None}}
    both = results_record(
        lmms_results({**submission_only, "gqa": results["results"]["gqa"]}, {"gqa": 3}), {}, sources, None, "m"
    )
    assert [row["task"] for row in both["rows"]] == ["gqa"]
    with pytest.raises(ValueError, match="submission-only tasks .vqav2_test, mmbench_en_test. are scored by"):
        results_record(lmms_results(submission_only, {"vqav2_test_local": 3}), {}, {}, None, "m")
    with pytest.raises(ValueError, match=r"nothing was scored for task\(s\) gqa \(none of its 100 samples"):
        results_record(results, {"gqa": list(range(100))}, sources, None, "m")


@pytest.mark.slow
def test_gqa_style_short_answers(evaluated, default_model):
    """lmms-eval's GQA task (exact match, case and punctuation ignored); batch 4 with left padding answers as batch 1
    without padding does."""
    columns = evaluated.columns["gqa_local"]
    model, processor = default_model
    answers = [
        reference_answer(model, processor, question + POST_PROMPT, [image], 16)
        for question, image in zip(columns["question"], columns["image"], strict=True)
    ]
    assert answers_scored(evaluated, "gqa_local") == dict(enumerate(answers))
    hits = [a.lower().strip(".") == t.lower() for a, t in zip(answers, columns["answer"], strict=True)]
    assert 0 < sum(hits) < len(hits), answers  # the number can move both ways
    assert evaluated.metrics["gqa_local"]["exact_match,none"] == pytest.approx(sum(hits) / len(hits))
    row = evaluated.rows["gqa_local"]
    assert (row["metric"], row["score"], row["num_samples"]) == ("exact_match", round(100 * sum(hits) / 10, 4), 10)
    assert row["benchmark"] is None and row["source"] == {"local": str(evaluated.tasks.parent / "data" / "gqa_local")}
    assert f"gqa_local exact_match: {row['score']:g} (10 samples; " in evaluated.out


@pytest.mark.slow
def test_multiple_choice_with_two_images_per_sample(evaluated, default_model):
    """lmms-eval's SEED-Bench task (the response's first letter against the option letter) with two images per
    sample. The default checkpoint answers with words, so its first letters score as they happen to."""
    columns = evaluated.columns["seedbench_local"]
    model, processor = default_model
    answers = []
    for index in range(SEED_SAMPLES):
        text = columns["question"][index] + "\n"
        text += "\n".join(f"{L}. {columns[f'choice_{L.lower()}'][index]}" for L in SEED_LETTERS)
        text += "\nAnswer with the option's letter from the given choices directly."
        answers.append(reference_answer(model, processor, text, columns["image"][index], 16))
    assert answers_scored(evaluated, "seedbench_local") == dict(enumerate(answers))
    hits = [a[:1].lower() == t.lower() for a, t in zip(answers, columns["answer"], strict=True)]
    assert evaluated.metrics["seedbench_local"]["seed_image,none"] == pytest.approx(sum(hits) / len(hits))
    assert evaluated.rows["seedbench_local"]["score"] == round(sum(hits) / len(hits) * 100, 4)


@pytest.mark.slow
def test_default_checkpoint_on_scopebench_matches_its_scorer(evaluated, default_model):
    """ScopeBench through lmms-eval (a task YAML of our own: the question alone, at most 3 new tokens, exact match)
    gives the accuracy ScopeBench's own scorer (`question_type_accuracy`) gives on the same questions."""
    from experiments.scopebench.generator import question_type_accuracy

    model, processor = default_model
    expected = question_type_accuracy(model, processor, evaluated.qa_path, evaluated.qa_path.parent / "images")
    assert evaluated.metrics["scopebench"]["exact_match,none"] == pytest.approx(expected["overall"])
    assert 0 < expected["overall"] < 1
    row = evaluated.rows["scopebench"]
    assert (row["num_samples"], row["unreadable_samples"]) == (10, 0)


@pytest.mark.slow
def test_unreadable_images_are_counted_and_the_run_goes_on(evaluated):
    """Samples whose image is missing or unreadable are answered empty (scored as wrong answers by exact match), the
    others as usual; the record and the screen say how many samples were answered and how many were not."""
    responses = answers_scored(evaluated, "paths_task")
    assert responses[1] == responses[3] == ""
    assert all(responses[i] for i in (0, 2, 4))  # the others were answered
    assert [doc_id for doc_id, line in evaluated.samples["paths_task"].items() if line["unreadable"]] == [1, 3]
    hits = [responses[i] == "red" for i in range(5)]
    assert evaluated.metrics["paths_task"]["exact_match,none"] == pytest.approx(sum(hits) / 5)
    row = evaluated.rows["paths_task"]
    assert (row["num_samples"], row["unreadable_samples"], row["score"]) == (3, 2, round(100 * sum(hits) / 5, 4))
    assert "paths_task exact_match: " in evaluated.out and "(3 samples, 2 unreadable" in evaluated.out


@pytest.mark.slow
def test_log_samples_holds_each_samples_prompt_answer_and_score(evaluated):
    line = evaluated.samples["gqa_local"][0]
    assert line["prompt"] == evaluated.columns["gqa_local"]["question"][0] + POST_PROMPT
    assert line["target"] == evaluated.columns["gqa_local"]["answer"][0]
    assert line["scores"] == {"exact_match": float(line["answer"].lower().strip(".") == line["target"].lower())}
    assert sorted(evaluated.samples) == ["gqa_local", "paths_task", "scopebench", "seedbench_local"]
    assert [len(evaluated.samples[task]) for task in sorted(evaluated.samples)] == [10, 5, 10, SEED_SAMPLES]


# --------------------------------------------------------------------------------------- refused before the work


@pytest.mark.slow  # lmms-eval indexes its ~2000 task YAMLs (once per session)
def test_an_unknown_task_gets_the_closest_names(run_cli, default_checkpoint, tmp_path):
    code, _, err = run_cli(
        ["eval", "--model", default_checkpoint, "--tasks", "gqa,popee", "--output", tmp_path / "results.json"]
    )
    assert code == 1 and "Traceback" not in err
    assert "unknown lmms-eval task(s): 'popee': did you mean pope" in err
    assert len(err) < 600 and not (tmp_path / "results.json").exists()  # not all ~2000 names


@pytest.mark.slow  # lmms-eval indexes its ~2000 task YAMLs (once per session)
def test_hub_tasks_without_network_fail_within_seconds_pointing_to_local_data(
    run_cli, default_checkpoint, tmp_path, free_port
):
    """lmms-eval would retry the download for 30-50 s and end in a `tenacity.RetryError`: the task's Hub dataset is
    asked for once, before the model loads."""
    from isolation import local_hub_clients

    host = f"127.0.0.1:{free_port()}"
    with local_hub_clients(f"http://{host}", tmp_path / "hf_cache"):
        started = time.perf_counter()
        code, _, err = run_cli(
            ["eval", "--model", default_checkpoint, "--tasks", "gqa", "--output", tmp_path / "results.json"]
        )
        elapsed = time.perf_counter() - started
    assert code == 1 and "Traceback" not in err and elapsed < 20, (elapsed, err)
    assert "error: task gqa: the Hub dataset lmms-lab-encoder/GQA cannot be reached" in err and f"host {host}" in err
    assert "evaluate a local copy of the data (docs/evaluation.md, 'Local data')" in err
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_an_evaluation_that_scored_nothing_is_not_a_score(run_cli, default_checkpoint, tmp_path):
    """No sample had a readable image: no results file (which `push --results` would publish), exit status 1."""
    paths = {
        "question": ["What colour?"] * 3,
        "answer": ["red"] * 3,
        "image": image_paths(tmp_path / "images", 3, dict.fromkeys(range(3), "missing")),
    }
    tasks = write_question_task(tmp_path, "no_images", paths, "{max_new_tokens: 3}")
    code, out, err = run_cli(
        [
            "eval",
            "--model",
            default_checkpoint,
            "--tasks",
            "no_images",
            "--include-path",
            tasks,
            "--output",
            tmp_path / "results.json",
            "--log-samples",
            tmp_path / "s.jsonl",
        ]
    )
    assert code == 1 and "Traceback" not in err, err
    assert "error: nothing was scored for task(s) no_images (none of its 3 samples had a readable image)" in err
    assert not (tmp_path / "results.json").exists() and "wrote" not in out
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 3  # what was tried is kept, to see why


def test_checkpoint_whose_processor_and_config_disagree_on_m_is_refused(tmp_path):
    write_tiny_checkpoint(tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / "processor_config.json"
    processor_config = json.loads(config_path.read_text())
    processor_config["num_image_tokens"] += 1
    config_path.write_text(json.dumps(processor_config))
    for trust_remote_code in (False, True):
        with pytest.raises(ValueError, match=r"num_image_tokens=17.*num_queries=16"):
            MSLlavaLMMS(pretrained=str(tmp_path / "ckpt"), trust_remote_code=trust_remote_code)


def test_bad_model_args_are_named(tmp_path):
    write_tiny_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="unknown model_args \\['temprature'\\]"):
        MSLlavaLMMS(pretrained=str(tmp_path / "ckpt"), temprature=0)
    with pytest.raises(ValueError, match=f"pretrained {tmp_path / 'nothing'}: no config.json, so not a checkpoint"):
        MSLlavaLMMS(pretrained=str(tmp_path / "nothing"))
