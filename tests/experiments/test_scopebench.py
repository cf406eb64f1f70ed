"""ScopeBench's generator (determinism, splits, balance, answers checked from the pixels) and the shipped default
checkpoint (loads with the Auto classes, is MS-LLaVA with E = 3, answers its demo samples)."""

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ms_llava
from experiments.scopebench import generator as sb

DEFAULT = Path(ms_llava.__file__).parent / "default_checkpoint"
MAX_DEFAULT_MB = 10.0
pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: a second thread costs more than it gives


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_same_seed_same_bytes_other_seed_other_bytes():
    for index in range(3):
        first = _png(sb.render(sb.make_scene(1000, index)))
        assert first == _png(sb.render(sb.make_scene(1000, index)))
        assert first != _png(sb.render(sb.make_scene(1001, index)))
        assert sb.make_scene(1000, index) == sb.make_scene(1000, index)
    assert sb.make_scene(1000, 0) != sb.make_scene(1000, 1)
    image = sb.render(sb.make_scene(1000, 0))
    assert image.size == (336, 336) and sb.GRID == 24


def test_splits_are_disjoint():
    assert len(set(sb.SPLIT_SEEDS.values())) == len(sb.SPLIT_SEEDS)
    seen = {}
    for split, seed in sb.SPLIT_SEEDS.items():
        for index in range(40):
            key = sb.make_scene(seed, index).objects
            assert key not in seen, f"{split} {index} repeats {seen.get(key)}"
            seen[key] = (split, index)


def test_answers_balanced_and_every_type_present():
    counts = Counter()
    for index in range(36):  # a common multiple of the block sizes 9, 6, 4, 3, 2
        scene = sb.make_scene(sb.SPLIT_SEEDS["train"], index)
        assert sorted(q.type for q in scene.questions) == sorted(sb.QUESTION_TYPES)
        counts.update((q.type, q.answer) for q in scene.questions)
    assert {counts[("fine_digit", d)] for d in sb.DIGITS} == {4}
    assert {counts[("global_count", w)] for w in sb.COUNT_WORDS.values()} == {9}
    assert {counts[("attribute_colour", c)] for c in sb.COLOURS} == {6}
    assert {counts[("attribute_shape", s)] for s in sb.SHAPES} == {12}
    assert counts[("global_layout", "left")] == counts[("global_layout", "right")] == 18


def _objects_from_pixels(image: Image.Image) -> dict[str, dict]:
    """An independent reading of the picture: per colour present, its pixels' centroid, the fill ratio of its
    bounding box, and the ink (near-black pixels) inside that box, cropped to the ink."""
    pixels = np.asarray(image).astype(int)
    found = {}
    for name, rgb in sb.COLOURS.items():
        mask = np.abs(pixels - np.array(rgb)).sum(-1) == 0
        if not mask.any():
            continue
        ys, xs = np.nonzero(mask)
        top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
        ink = pixels[top : bottom + 1, left : right + 1].sum(-1) < 100
        fill = (mask[top : bottom + 1, left : right + 1].sum() + ink.sum()) / ink.size
        glyph = None
        if ink.any():
            iy, ix = np.nonzero(ink)
            glyph = ink[iy.min() : iy.max() + 1, ix.min() : ix.max() + 1]
        found[name] = {"centre": (ys.mean(), xs.mean()), "fill": fill, "glyph": glyph}
    return found


def _read_digit(glyph: np.ndarray) -> str:
    for digit, rows in sb.FONT.items():
        bitmap = np.array([[c == "#" for c in row] for row in rows])
        ys, xs = np.nonzero(bitmap)
        bitmap = bitmap[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        if bitmap.shape == glyph.shape and (bitmap == glyph).all():
            return digit
    raise AssertionError("no digit matches the ink")


def _shape(fill: float) -> str:
    return "square" if fill > 0.9 else ("circle" if fill > 0.65 else "triangle")


@pytest.mark.slow
@pytest.mark.parametrize("split", ["train", "test"])
def test_every_answer_is_right_for_its_image(split):
    words = {v: k for k, v in sb.COUNT_WORDS.items()}
    for index in range(24):
        scene = sb.make_scene(sb.SPLIT_SEEDS[split], index)
        seen = _objects_from_pixels(sb.render(scene))
        marked = [name for name, o in seen.items() if o["glyph"] is not None]
        assert len(marked) == 1  # exactly one object carries a digit
        marked = seen[marked[0]]
        for q in scene.questions:
            if q.type == "global_count":
                assert len(seen) == words[q.answer]
            elif q.type == "fine_digit":
                assert _read_digit(marked["glyph"]) == q.answer
            elif q.type == "attribute_shape":
                assert _shape(marked["fill"]) == q.answer, (q, marked["fill"])
            elif q.type == "attribute_colour":
                assert seen[q.answer] is marked
            else:  # layout, from pixel centroids
                left = sum(o["centre"][1] < sb.IMAGE_SIZE / 2 for o in seen.values())
                assert (left > len(seen) - left) == (q.answer == "left") and left != len(seen) - left


def test_written_split_is_llava_json(tmp_path):
    paths = sb.write_split(tmp_path, "val", 3)
    qa = json.loads(paths["qa"].read_text())
    assert len(qa) == 15 and [r["image"] for r in qa[::5]] == ["val-00000.png", "val-00001.png", "val-00002.png"]
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in qa)
    assert all(len(r["conversations"]) == 2 and len(r["types"]) == 1 for r in qa)
    assert sorted(r["types"][0] for r in qa[:5]) == sorted(sb.QUESTION_TYPES)
    caption = json.loads(paths["caption"].read_text())
    assert caption[0]["conversations"][1]["value"] == sb.make_scene(sb.SPLIT_SEEDS["val"], 0).caption()
    text = json.loads(paths["text"].read_text())
    assert len(text) == 18 and not any("image" in r or "<image>" in json.dumps(r) for r in text)
    caption_text = caption[0]["conversations"][1]["value"]
    assert len(text[0]["conversations"]) == 12  # the caption, then the five questions in one conversation
    for record, question in zip(text[1:6], qa[:5], strict=True):  # then each question alone after the caption
        assert record["conversations"][0]["value"] == caption_text + question["conversations"][0]["value"][7:]
        assert record["conversations"][1] == question["conversations"][1]
    assert Image.open(tmp_path / "images" / "val-00000.png").size == (336, 336)


def test_grid_cells_place_each_object_where_it_lies():
    from experiments.scopebench.models import grid_cells

    scene = sb.make_scene(sb.SPLIT_SEEDS["val"], 4).to_dict()
    full = grid_cells(scene, sb.GRID)  # one cell per patch: an object in its 3 x 3 block, its digit at the centre
    for obj in scene["objects"]:
        block = {(obj["row"] + r) * sb.GRID + obj["col"] + c for r in range(3) for c in range(3)}
        assert {i for i, words in enumerate(full) if obj["colour"] in words} == block
        if obj["digit"]:
            centre = (obj["row"] + 1) * sb.GRID + obj["col"] + 1
            assert [i for i, words in enumerate(full) if obj["digit"] in words] == [centre]
    marked = next(o for o in scene["objects"] if o["digit"])
    for side in (6, 8, 12):
        cells = grid_cells(scene, side)
        with_digit = [words for words in cells if marked["digit"] in words]
        assert len(with_digit) == 1 and {marked["colour"], marked["shape"]} <= set(with_digit[0])
        touched = sum(obj["colour"] in words for words in cells for obj in scene["objects"])
        assert len(scene["objects"]) <= touched <= 4 * len(scene["objects"])  # a 3 x 3 block spans 1 to 4 cells
    with pytest.raises(ValueError, match="got 5"):
        grid_cells(scene, 5)


@pytest.mark.slow
def test_grid_warm_up_trains_the_language_model_and_saves_a_warm_up_folder(tmp_path):
    from transformers import AutoModelForImageTextToText

    from experiments.scopebench.models import build_ms_llava, build_tokenizer, grid_warm_up

    sb.write_split(tmp_path / "data", "train", 4, images=False)
    sb.write_split(tmp_path / "data", "val", 2, images=False)
    model, processor = build_ms_llava(None, None, build_tokenizer(), {"num_queries": 36, "scope_windows": [2]})
    model.save_pretrained(tmp_path / "source")
    processor.save_pretrained(tmp_path / "source")
    report = grid_warm_up(tmp_path / "source", tmp_path / "out", tmp_path / "data", steps=3, batch_size=4,
                          eval_questions=5, log=lambda _: None)  # fmt: skip
    assert set(report["after"]) == {6, 8, 12} and set(report["after"][8]) == set(sb.QUESTION_TYPES)
    saved = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    before, after = model.state_dict(), saved.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("model.language_model.", "lm_head.")) for k in changed)
    assert json.loads((tmp_path / "out" / "grid_warmup.json").read_text())["wall_s"] >= 0


# --------------------------------------------------------------------------------------------- the default


@pytest.fixture(scope="module")
def default_model():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(DEFAULT)
    processor = AutoProcessor.from_pretrained(DEFAULT)
    return model.eval(), processor


def test_default_checkpoint_files():
    files = [f for f in DEFAULT.rglob("*") if f.is_file()]
    names = {f.name for f in files}
    assert {"config.json", "model.safetensors", "README.md", "demo_samples.json", "processor_config.json"} <= names
    modules = [f for f in files if f.suffix == ".py"]  # what its auto_map names: links to the package's, no copies
    assert sorted(f.name for f in modules) == sorted(
        f"{n}_ms_llava.py" for n in ("configuration", "modeling", "processing", "image_processing")
    )
    assert all(f.is_symlink() and f.resolve() == (DEFAULT.parent / f.name).resolve() for f in modules)
    size_mb = sum(f.stat().st_size for f in files) / 1e6
    assert size_mb < MAX_DEFAULT_MB, size_mb
    card = (DEFAULT / "README.md").read_text()
    assert card.startswith("---\n") and "toy" in card.lower()


def test_default_checkpoint_is_ms_llava_with_three_scopes(default_model):
    model, processor = default_model
    assert type(model).__name__ == "MSLlavaForConditionalGeneration"
    assert len(model.config.resampler_config.scope_windows) == 3
    assert processor.num_image_tokens == model.config.resampler_config.num_queries
    assert model.config.vision_config.image_size == 336 and model.config.vision_config.patch_size == 14


def test_default_checkpoint_answers_its_demo_samples(default_model):
    model, processor = default_model
    samples = json.loads((DEFAULT / "demo_samples.json").read_text())
    assert len(samples) >= 4
    assert "global_count" in {s["type"] for s in samples}
    assert len({s["image"] for s in samples}) == len(samples)
    for sample in samples:
        image = Image.open(DEFAULT / sample["image"]).convert("RGB")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample["question"]}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        answer = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        assert answer == sample["answer"], sample


@pytest.mark.slow
def test_scorer_on_default_checkpoint_equals_one_generate_per_question(default_model, tmp_path):
    """The batched scorer (shared tower pass, left padding) gives the accuracies that plain `generate`, one question
    at a time, gives."""
    model, processor = default_model
    paths = sb.write_split(tmp_path, "test", 4)
    accuracy = sb.question_type_accuracy(model, processor, paths["qa"])
    assert set(accuracy) == {"overall", "fine", "attribute", "global", *sb.QUESTION_TYPES}
    records = json.loads(Path(paths["qa"]).read_text(encoding="utf-8"))
    hits = {key: [] for key in accuracy}
    for prompt, index, reference, qtype in sb.qa_prompts(processor, records):
        image = Image.open(Path(paths["qa"]).parent / "images" / records[index]["image"]).convert("RGB")
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        answer = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        for key in ("overall", qtype, sb.SCOPES[qtype]):
            hits[key].append(answer == reference)
    assert accuracy == {key: sum(values) / len(values) for key, values in hits.items()}
    assert 0.0 < accuracy["overall"] < 1.0  # both right and wrong answers occur, so the comparison has teeth


@pytest.mark.slow
def test_linear_probe_reads_a_linear_label_and_not_noise():
    from experiments.scopebench.probe import linear_probe

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 9, (600,), generator=generator)
    noise = torch.randn(600, 32, generator=generator)
    coded = noise + 5 * torch.nn.functional.one_hot(labels, 32).float()  # the label is a direction
    readable = linear_probe(coded[:400], labels[:400], coded[400:], labels[400:], 9, steps=100)
    unreadable = linear_probe(noise[:400], labels[:400], noise[400:], labels[400:], 9, steps=100)
    assert readable["test"] > 0.9 and unreadable["test"] < 0.3


def test_probe_targets_use_the_digit_cell_of_the_grid(tmp_path):
    from experiments.scopebench.models import grid_cells
    from experiments.scopebench.probe import targets

    scenes = [(f"{i}.png", sb.make_scene(sb.SPLIT_SEEDS["val"], i).to_dict()) for i in range(9)]
    for side in (6, 8, 12):
        found = targets(scenes, side)
        for index, (_, scene) in enumerate(scenes):
            marked = next(o for o in scene["objects"] if o["digit"])
            cells = grid_cells(scene, side)
            assert marked["digit"] in cells[found["cell"][index]]
            assert found["digit"][index] + 1 == int(marked["digit"])
            assert tuple(sb.COLOURS)[found["colour"][index]] == marked["colour"]


@pytest.mark.slow
def test_probe_model_on_the_default_checkpoint(default_model, tmp_path):
    from experiments.scopebench.probe import probe_model

    sb.write_split(tmp_path, "train", 12)
    sb.write_split(tmp_path, "test", 6)
    model, processor = default_model
    result = probe_model(model, processor, tmp_path, train_images=12, test_images=6, steps=50)
    assert result["M"] == model.config.resampler_config.num_queries and result["test_images"] == 6
    for key in ("digit@anchor", "colour@anchor", "digit@all", "colour@all"):
        assert 0.0 <= result[key]["test"] <= 1.0 and result[key]["train"] > 0.5  # 12 rows: a linear probe fits them


def test_report_command_writes_the_tables(tmp_path):
    import random

    from experiments.scopebench.cli import main
    from experiments.scopebench.runs import variants

    rng = random.Random(0)
    (tmp_path / "results").mkdir()
    rows = [(v, "") for v in variants()] + [(v, "-long1500") for v in variants() if v["name"] == "vanilla-m64"]
    for variant, suffix in rows:
        test = {kind: rng.random() for kind in sb.QUESTION_TYPES}
        test["overall"], test["fine"] = sum(test.values()) / 5, test["fine_digit"]
        test["attribute"] = (test["attribute_colour"] + test["attribute_shape"]) / 2
        test["global"] = (test["global_count"] + test["global_layout"]) / 2
        name = variant["name"] + suffix
        result = {"run": f"{name}-s0", "variant": name, "group": "long" if suffix else variant["group"],
                  "M": variant["M"], "kind": variant["kind"], "seed": 0, "test": test, "wall_s": 1.0}  # fmt: skip
        (tmp_path / "results" / f"{name}-s0.json").write_text(json.dumps(result))
    assert main(["--runs", str(tmp_path), "report", "--output", str(tmp_path / "out")]) == 0
    table = (tmp_path / "out" / "table.md").read_text()
    assert (
        "Main table" in table
        and "Other schedules and settings" in table
        and "| vanilla-m64-long1500 | 64 | 1 |" in table
    )
    assert len(json.loads((tmp_path / "out" / "results.json").read_text())["runs"]) == len(rows)


def test_probe_command_refuses_unknown_runs_and_non_resampler_variants(tmp_path):
    from experiments.scopebench.cli import main
    from experiments.scopebench.probe import probe_runs

    with pytest.raises(ValueError, match="no finished run 'e3-2-6-14-m64-s9'"):
        next(probe_runs(tmp_path, tmp_path / "data", ["e3-2-6-14-m64-s9"], []))
    with pytest.raises(ValueError, match="--init takes MS-Resampler variant names, got 'mlp'"):
        main(["--runs", str(tmp_path), "probe", "--init", "mlp"])


# --------------------------------------------------------------------------------------------- the readout


def test_readout_labels_follow_the_answers(tmp_path):
    from experiments.scopebench.readout import ANSWERS, labels

    paths = sb.write_split(tmp_path, "val", 9, images=False)
    images, answers = labels(paths["qa"])
    assert answers.shape == (9, len(ANSWERS)) and len(set(images)) == 9
    records = json.loads(paths["qa"].read_text())
    for record in records:
        (qtype,) = record["types"]
        row, column = images.index(record["image"]), list(ANSWERS).index(qtype)
        assert ANSWERS[qtype][answers[row, column]] == record["conversations"][1]["value"]
    records[0]["conversations"][1]["value"] = "magenta"
    paths["qa"].write_text(json.dumps(records))
    with pytest.raises(ValueError, match="'magenta'"):
        labels(paths["qa"])


@pytest.mark.slow
def test_readout_finds_the_one_token_that_holds_the_answer_and_refuses_other_shapes():
    """What the readout is for: an answer held by one token among M, at a position that changes per image."""
    from experiments.scopebench.readout import ANSWERS, Readout

    generator = torch.Generator().manual_seed(0)
    num, m, width = 1200, 36, 32
    tokens = torch.randn(num, m, width, generator=generator)
    where = torch.randint(0, m, (num,), generator=generator)
    digit = torch.randint(0, 9, (num,), generator=generator)
    tokens[torch.arange(num), where, :9] += 6 * torch.nn.functional.one_hot(digit, 9).float()  # the digit's token
    tokens[torch.arange(num), where, 31] += 6  # and a marker saying which token it is
    torch.manual_seed(0)
    readout = Readout(width, m)
    optimizer = torch.optim.Adam(readout.parameters(), lr=3e-3)
    column = list(ANSWERS).index("fine_digit")
    for step in range(150):
        batch = torch.arange(step * 32, step * 32 + 32) % 1000
        loss = torch.nn.functional.cross_entropy(readout(tokens[batch])[column], digit[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        held_out = (readout(tokens[1000:])[column].argmax(-1) == digit[1000:]).float().mean().item()
    assert held_out > 0.9, held_out  # chance is 1 / 9
    with pytest.raises(ValueError, match=r"\(batch, \(36, 32\)\), got \(2, 35, 32\)"):
        readout(torch.zeros(2, 35, 32))


@pytest.mark.slow
def test_readout_run_trains_only_the_projector_and_reports_the_table_format(tmp_path):
    from experiments.scopebench.models import build_ms_llava, build_tokenizer
    from experiments.scopebench.readout import train_readout

    for split, count in (("train", 6), ("val", 3), ("test", 3)):
        sb.write_split(tmp_path, split, count)
    model, _ = build_ms_llava(None, None, build_tokenizer(), {"num_queries": 36, "scope_windows": [2, 6]})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_readout(model, tmp_path, seed=0, steps=3, log=lambda _: None)
    assert set(result["test"]) == {"overall", "fine", "attribute", "global", *sb.QUESTION_TYPES}
    assert all(0.0 <= value <= 1.0 for value in [*result["test"].values(), *result["val"].values()])
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith("model.multi_modal_projector.") for k in changed)
    with pytest.raises(ValueError, match="steps must be at least 1, got 0"):
        train_readout(model, tmp_path, seed=0, steps=0)


def test_readout_command_refuses_unknown_variants_and_an_empty_report(tmp_path):
    from experiments.scopebench.cli import main

    with pytest.raises(ValueError, match=r"unknown variant\(s\) \['e3-9-m64'\]"):
        main(["--runs", str(tmp_path), "readout", "--only", "e3-9-m64"])
    with pytest.raises(ValueError, match="no readout results in"):
        main(["--runs", str(tmp_path), "readout", "--report", "--output", str(tmp_path / "out")])
