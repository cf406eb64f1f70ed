"""The ScAle spatial-relation experiment (experiments/spatial_scale): its answers are right for its images, the data
writer's splits are balanced and disjoint, and the summary table's figures are the results' mean and spread."""

import json
import random
import statistics

import numpy as np
import pytest

from experiments.spatial_scale import spatial

pytestmark = pytest.mark.usefixtures("one_thread")


def centre(image, colour) -> np.ndarray:
    """The centroid (x, y) of the pixels within 40 of `colour` on every channel."""
    pixels = np.asarray(image, dtype=np.int16)
    mask = (np.abs(pixels - np.array(colour)) <= 40).all(-1)
    assert mask.sum() > 10, f"no shape of colour {colour} drawn"
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


@pytest.mark.parametrize("seed", [0, 7])
def test_every_answer_is_the_relation_the_pixels_show(seed):
    circle_colour, square_colour = (spatial.COLOURS[name] for name in spatial.FIXED_COLOURS)
    pairs = spatial.spatial_records(40, seed)
    answers = [record["conversations"][1]["value"] for record, _ in pairs]
    assert {answer: answers.count(answer) for answer in spatial.RELATIONS} == dict.fromkeys(spatial.RELATIONS, 10)
    for record, image in pairs:
        dx, dy = centre(image, circle_colour) - centre(image, square_colour)
        shown = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("above" if dy < 0 else "below")
        assert record["conversations"][1]["value"] == shown, (record["id"], dx, dy)
        assert record["conversations"][0]["value"] == f"<image>\n{spatial.QUESTION}"


def test_text_records_name_the_relation_in_words_and_bad_tasks_are_refused():
    record, _ = spatial.spatial_records(1, 3, task="text")[0]
    words = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
    relation = record["conversations"][1]["value"]
    assert record["conversations"][0]["value"].startswith(f"red circle {words[relation]} blue square\n")
    assert "image" not in record
    with pytest.raises(ValueError, match="task must be 'qa' or 'text', got 'caption'"):
        spatial.spatial_records(1, 0, task="caption")


def test_the_write_command_writes_disjoint_splits(tmp_path, capsys):
    assert spatial.main(["write", str(tmp_path), "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    train = json.loads((tmp_path / "spatial-train.json").read_text())
    test = json.loads((tmp_path / "spatial-test.json").read_text())
    assert (len(train), len(test)) == (128, 256) and "train: " in printed
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    assert all((tmp_path / "images" / r["image"]).is_file() for r in train + test)
    general = json.loads((tmp_path / "general.json").read_text())
    assert sum(r["id"].startswith("spatial-") for r in general) == 96 and len(general) == 96 + 96


def test_the_summary_gives_mean_and_sample_spread():
    rng = random.Random(0)
    results = [
        {
            "seed": seed,
            **{
                label: {"accuracy": rng.random(), "parameters": 100 + i}
                for i, label in enumerate(("frozen", *spatial.ADAPTER_RUNS))
            },
        }
        for seed in (0, 1, 2)
    ]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in spatial.summarise(results).splitlines()[2:]}
    for label in ("frozen", *spatial.ADAPTER_RUNS):
        values = [r[label]["accuracy"] for r in results]
        cells = rows[label].strip("| ").split(" | ")
        assert cells[-2:] == [f"{statistics.mean(values):.3f}", f"{statistics.stdev(values):.3f}"]
        assert cells[2:5] == [f"{v:.3f}" for v in values]
