"""The `ms_llava` lmms-eval model on local tasks built from generated images, run by the real lmms-eval.

Each task test checks the numbers lmms-eval reports against the same metric computed here by hand from the model's
own `generate` (one sample at a time, no padding), and the responses lmms-eval scored against those answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.tasks import TaskManager
from lmms_helpers import (
    POST_PROMPT,
    load,
    logged_responses,
    metric,
    reference_answer,
    scopebench_split,
    write_local_task,
)
from PIL import Image

from ms_llava.evaluation import card_results, evaluate
from ms_llava.evaluation.lmms_model import MSLlavaLMMS
from ms_llava.testing_utils import COLOURS, SHAPES, draw_shape, write_tiny_checkpoint


def run(checkpoint, task: str, include_path, batch_size: int = 4, **model_args):
    lm = MSLlavaLMMS(pretrained=str(checkpoint), batch_size=batch_size, **model_args)
    results = simple_evaluate(
        model=lm,
        tasks=[task],
        batch_size=batch_size,
        log_samples=True,
        task_manager=TaskManager(include_path=str(include_path)),
    )
    return results, lm


def write_question_task(root: Path, name: str, columns: dict[str, list], generation_kwargs: str) -> Path:
    """A local `generate_until` task `name` over `columns` ("question", "answer", "image": a file path): the image at
    the path, the question alone as the prompt, exact match with the answer; its two functions in
    `root/tasks/<name>_utils.py`. Returns the tasks folder."""
    utils = f"{name}_utils"
    (root / "tasks").mkdir(parents=True, exist_ok=True)
    (root / "tasks" / f"{utils}.py").write_text(
        "def doc_to_visual(doc):\n    return [doc['image']]\n\n\ndef doc_to_text(doc, lmms_eval_specific_kwargs=None):\n"
        "    return doc['question']\n",
        encoding="utf-8",
    )
    return write_local_task(
        root,
        name,
        {"test": columns},
        test_split="test",
        output_type="generate_until",
        doc_to_visual=f"!function {utils}.doc_to_visual",
        doc_to_text=f"!function {utils}.doc_to_text",
        doc_to_target="answer",
        generation_kwargs=generation_kwargs,
        metric_list="[{metric: exact_match, aggregation: mean, higher_is_better: true}]",
    )


def test_entry_point_registers_the_model():
    from lmms_eval.models import get_model

    assert get_model("ms_llava") is MSLlavaLMMS


def test_card_results_use_the_papers_columns():
    lmms_results = {
        "results": {
            "pope_local": {"alias": "pope_local", "pope_f1_score,none": 0.8512, "pope_accuracy,none": 0.9},
            "gqa": {"exact_match,none": 0.62, "exact_match_stderr,none": 0.01},
            "mme": {"mme_perception_score,none": 1510.7, "mme_cognition_score,none": 300.0},
            "my_task": {"exact_match,none": 0.5, "note,none": "text"},
        }
    }
    assert card_results(lmms_results) == {"POPE": 85.12, "GQA": 62.0, "MME^P": 1510.7, "my_task exact_match": 0.5}
    with pytest.raises(ValueError, match="no numeric metric"):
        card_results({"results": {"t": {"alias": "t"}}})
    # VQAv2 test-dev is scored by its server: lmms-eval's vqav2_test aggregates `submission` to None (no row)
    submission_only = {"vqav2_test_local": {"alias": "vqav2_test_local", "submission,none": None}}
    assert card_results({"results": {**submission_only, **lmms_results["results"]}})["GQA"] == 62.0
    assert "VQA^v2" not in card_results({"results": {**submission_only, **lmms_results["results"]}})
    with pytest.raises(ValueError, match="submission-only tasks .vqav2_test, mmbench_en_test. are scored by"):
        card_results({"results": submission_only})


@pytest.mark.slow
def test_pope_style_task(tmp_path, yes_no_checkpoint):
    """lmms-eval's own POPE task (its YAML and metric code) on a local copy: accuracy, precision, recall and F1 as
    computed from the model's own answers. Batch 4 with left padding answers as batch 1 without padding does."""
    rng = __import__("random").Random(1)
    columns = {"question_id": [], "question": [], "answer": [], "image": [], "category": []}
    for index in range(12):
        colour, shape = list(COLOURS)[index % 4], SHAPES[index % 2]
        asked = colour if index % 3 else list(COLOURS)[(index + 1) % 4]
        columns["question_id"].append(str(index))
        columns["question"].append(f"Is there a {asked} object in the image?")
        columns["answer"].append("yes" if asked == colour else "no")
        columns["image"].append(draw_shape(colour, shape, rng))
        columns["category"].append("random")
    tasks = write_local_task(tmp_path, "pope_local", {"test": columns}, builtin="pope/pope.yaml")
    results, _ = run(yes_no_checkpoint, "pope_local", tasks, batch_size=4, max_new_tokens=4)

    model, processor = load(yes_no_checkpoint)
    answers = [
        reference_answer(model, processor, question + POST_PROMPT, [image], 4)
        for question, image in zip(columns["question"], columns["image"], strict=True)
    ]
    assert logged_responses(results, "pope_local") == dict(enumerate(answers))
    predictions = [answer.lower().strip() for answer in answers]
    assert set(predictions) <= {"yes", "no"} and "yes" in predictions, predictions  # the model answers the task
    truth = columns["answer"]
    tp = sum(p == "yes" and t == "yes" for p, t in zip(predictions, truth, strict=True))
    fp = sum(p == "yes" and t == "no" for p, t in zip(predictions, truth, strict=True))
    fn = sum(p == "no" and t == "yes" for p, t in zip(predictions, truth, strict=True))
    accuracy = sum(p == t for p, t in zip(predictions, truth, strict=True)) / len(truth)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    assert metric(results, "pope_local", "pope_accuracy") == pytest.approx(accuracy)
    assert metric(results, "pope_local", "pope_precision") == pytest.approx(precision)
    assert metric(results, "pope_local", "pope_recall") == pytest.approx(recall)
    assert metric(results, "pope_local", "pope_f1_score") == pytest.approx(f1)
    assert card_results(results) == {"POPE": round(f1 * 100, 4)}


@pytest.mark.slow
def test_gqa_style_short_answers(tmp_path, default_checkpoint):
    """lmms-eval's GQA task (exact match, case and punctuation ignored) on ScopeBench's questions, with the images
    joined into the rows (GQA's `process_docs` fetches them from the Hub: switched off for local data)."""
    qa_path, records = scopebench_split(tmp_path / "scopebench", 4)
    images = {r["image"]: Image.open(qa_path.parent / "images" / r["image"]).convert("RGB") for r in records}
    columns = {
        "id": [r["id"] for r in records],
        "question": [r["conversations"][0]["value"].replace("<image>\n", "") for r in records],
        "answer": [r["conversations"][1]["value"] for r in records],
        "image": [images[r["image"]] for r in records],
    }
    tasks = write_local_task(
        tmp_path, "gqa_local", {"testdev": columns}, builtin="gqa/gqa.yaml", dataset_name="null", process_docs="null"
    )
    results, _ = run(default_checkpoint, "gqa_local", tasks, batch_size=8)

    model, processor = load(default_checkpoint)
    answers = [
        reference_answer(model, processor, question + POST_PROMPT, [image], 16)
        for question, image in zip(columns["question"], columns["image"], strict=True)
    ]
    assert logged_responses(results, "gqa_local") == dict(enumerate(answers))
    hits = [a.lower().strip(".") == t.lower() for a, t in zip(answers, columns["answer"], strict=True)]
    assert 0 < sum(hits) < len(hits), answers  # the number can move both ways
    assert metric(results, "gqa_local", "exact_match") == pytest.approx(sum(hits) / len(hits))
    assert card_results(results) == {"GQA": round(sum(hits) / len(hits) * 100, 4)}


@pytest.mark.slow
def test_multiple_choice_with_two_images_per_sample(tmp_path, default_checkpoint):
    """lmms-eval's SEED-Bench task (the response's first letter against the option letter) with two images per
    sample. The default checkpoint answers with words, so its first letters score as they happen to."""
    rng = __import__("random").Random(2)
    letters = "ABCD"
    columns = {k: [] for k in ("question_id", "question", "choice_a", "choice_b", "choice_c", "choice_d")}
    columns.update(answer=[], data_type=[], image=[])
    for index in range(10):
        colour, other = list(COLOURS)[index % 4], list(COLOURS)[(index + 1) % 4]
        columns["question_id"].append(str(index))
        columns["question"].append("What colour is the object with the digit?" if index % 2 else "What shape is it?")
        choices = rng.sample(["blue", "circle", "red", "square", "green", "yellow"], 4)
        for letter, choice in zip("abcd", choices, strict=True):
            columns[f"choice_{letter}"].append(choice)
        columns["answer"].append(letters[index % 4])
        columns["data_type"].append("image")
        columns["image"].append([draw_shape(colour, SHAPES[index % 2], rng), draw_shape(other, SHAPES[0], rng)])
    tasks = write_local_task(tmp_path, "seedbench_local", {"test": columns}, builtin="seedbench/seedbench.yaml")
    results, _ = run(default_checkpoint, "seedbench_local", tasks, batch_size=4)

    model, processor = load(default_checkpoint)
    answers = []
    for index in range(10):
        text = columns["question"][index] + "\n"
        text += "\n".join(f"{L}. {columns[f'choice_{L.lower()}'][index]}" for L in letters)
        text += "\nAnswer with the option's letter from the given choices directly."
        answers.append(reference_answer(model, processor, text, columns["image"][index], 16))
    assert logged_responses(results, "seedbench_local") == dict(enumerate(answers))
    hits = [a[:1].lower() == t.lower() for a, t in zip(answers, columns["answer"], strict=True)]
    assert metric(results, "seedbench_local", "seed_image") == pytest.approx(sum(hits) / len(hits))
    assert card_results(results)["Seed^I"] == round(sum(hits) / len(hits) * 100, 4)


@pytest.mark.slow
def test_default_checkpoint_on_scopebench_matches_its_scorer(tmp_path, default_checkpoint):
    """ScopeBench through lmms-eval (a task YAML of our own: the question alone, at most 3 new tokens, exact match)
    gives the accuracy ScopeBench's own scorer (`question_type_accuracy`) gives on the same questions."""
    from experiments.scopebench.generator import question_type_accuracy

    qa_path, records = scopebench_split(tmp_path / "scopebench", 12)
    folder = qa_path.parent / "images"
    columns = {
        "question": [r["conversations"][0]["value"].replace("<image>\n", "") for r in records],
        "answer": [r["conversations"][1]["value"] for r in records],
        "image": [str(folder / r["image"]) for r in records],
    }
    tasks = write_question_task(tmp_path, "scopebench", columns, "{max_new_tokens: 3, do_sample: false}")
    results, lm = run(default_checkpoint, "scopebench", tasks, batch_size=8)
    model, processor = load(default_checkpoint)
    expected = question_type_accuracy(model, processor, qa_path, folder)["overall"]
    assert metric(results, "scopebench", "exact_match") == pytest.approx(expected)
    assert 0 < expected < 1
    assert not lm.unreadable


@pytest.mark.slow
def test_unreadable_images_are_counted_and_the_run_goes_on(tmp_path, default_checkpoint):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = __import__("random").Random(3)
    paths = []
    for index in range(5):
        path = folder / f"{index}.png"
        draw_shape("red", "circle", rng).save(path)
        paths.append(str(path))
    (folder / "1.png").unlink()  # missing
    (folder / "3.png").write_bytes(b"not a png")  # unreadable
    columns = {"question": ["What colour is the object with the digit?"] * 5, "answer": ["red"] * 5, "image": paths}
    tasks = write_question_task(tmp_path, "paths_task", columns, "{max_new_tokens: 3}")
    results, lm = run(default_checkpoint, "paths_task", tasks, batch_size=2)
    assert sorted(lm.unreadable["paths_task"]) == [1, 3]
    responses = logged_responses(results, "paths_task")
    assert responses[1] == responses[3] == ""
    assert all(responses[i] for i in (0, 2, 4))  # the others were answered
    hits = [responses[i] == "red" for i in range(5)]
    assert metric(results, "paths_task", "exact_match") == pytest.approx(sum(hits) / 5)


@pytest.mark.slow  # lmms-eval indexes its ~1000 task YAMLs
def test_unknown_task_lists_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown lmms-eval task\(s\) \['no_such_task'\].*pope.*gqa"):
        evaluate(tmp_path, ["no_such_task"])


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
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        MSLlavaLMMS(pretrained=str(tmp_path / "nothing"))
