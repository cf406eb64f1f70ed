"""What `ms-llava train` does with the inputs users really give it (issue 18): data files that are not UTF-8, not
JSON, not a list of records or hold records of the wrong shape get an error naming the file (and the record); a run
that fails before its first step leaves the output folder as it found it; `--resume` says where it resumes from.

Tiny runs as in test_training.py: the tiny random checkpoint, generated shapes data, one intra-op thread, no
data-loader workers.
"""

import io
import json
import shutil

import pytest
import torch
from PIL import Image
from transformers import TrainerCallback

from ms_llava.training.data import check_records, load_training_records
from ms_llava.training.trainer import complete_checkpoints, train

RUN = {"dataloader_num_workers": 0, "save_steps": 1000, "warmup_ratio": 0.1, "global_batch_size": 4}

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------- data files


def test_a_data_file_that_is_not_utf8_is_named_with_the_offending_byte_and_what_to_do(tiny_dir, tmp_path, run_train):
    records = [{"id": "0", "conversations": [{"from": "human", "value": "Qu'est-ce que c'est, café ?"}]}]
    data = tmp_path / "latin1.json"
    data.write_bytes(json.dumps(records, ensure_ascii=False).encode("latin-1"))  # é as the single byte 0xe9
    with pytest.raises(ValueError) as caught:
        load_training_records(data)
    message = str(caught.value)
    offset = data.read_bytes().index(b"\xe9")
    assert f"{data} is not UTF-8 text: byte 0xe9 at offset {offset} (line 1)" in message
    assert "re-encode the file" in message and "iconv -f latin1 -t utf-8 latin1.json" in message

    status, _, err = run_train(
        ["--stage", "pretrain", "--model", tiny_dir, "--data", data, "--output-dir", tmp_path / "out"]
    )
    assert status != 0 and f"ms-llava train: error: {data} is not UTF-8 text" in err
    assert not (tmp_path / "out").exists()

    # a UTF-8 file that starts with a byte-order mark (as Windows editors write it) reads like one without
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(records).encode())
    assert load_training_records(tmp_path / "bom.json")[0].messages[0]["content"][-1]["text"].endswith("café ?")


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("cut.json", '[{"id": "0", "conversations": [', r"{path} is not valid JSON: Expecting value: line 1"),
        (
            "lines.jsonl",
            '{"id": "0", "conversations": []}\n\n{"id": "1", oops}\n',
            r"line 3 of {path} is not valid JSON: .*; a \.jsonl file holds one JSON record per line",
        ),
        (
            "object.json",
            '{"data": []}',
            r"{path} must hold a JSON list of records, got a JSON object with keys \['data'\]",
        ),
        ("number.json", "42", r"{path} must hold a JSON list of records, got int; a \.json file holds one JSON list"),
        ("empty.json", "[]", r"{path} holds no records: nothing to train on"),
        ("lists.json", "[[1, 2], [3]]", r"{path}: no record is a JSON object \(record 0 is list\)"),
        (
            "other.json",
            '[1, {"question": "q", "answer": "a"}]',
            r"{path}: cannot tell the format: record 1, the first JSON object, has neither 'conversations' .* its keys "
            r"are \['answer', 'question'\]",
        ),
        ("deep.json", "[" * 100_000 + "]" * 100_000, r"{path} nests JSON too deeply to read"),
        ("table.parquet", "not a parquet file", r"{path} is not a Parquet file that can be read: ArrowInvalid"),
    ],
)
def test_data_files_that_are_not_a_list_of_records_are_named(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=expected.replace("{path}", str(path).replace("\\", "\\\\"))):
        load_training_records(path)


def test_a_folder_that_is_no_saved_data_set_is_named(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("not a data set")
    with pytest.raises(ValueError, match=f"{tmp_path / 'data'} is a folder but not a data set written by"):
        load_training_records(tmp_path / "data")


def test_records_of_the_wrong_shape_are_named_bad_records_not_crashes(tiny, shapes, tmp_path):
    """Values a converter once passed on unchecked: a list where a role should be (a TypeError: unhashable), a lone
    surrogate escape (valid JSON, no valid Unicode: the tokenizer crashed on the whole batch)."""
    _, processor = tiny
    good = json.loads(shapes["qa8"].read_text())[:2]
    question = good[0]["conversations"][0]
    records = [
        *good,
        {"id": "list-role", "image": good[0]["image"], "conversations": [{"from": ["human"], "value": "x"}]},
        {
            "id": "surrogate",
            "image": good[0]["image"],
            "conversations": [question, {"from": "gpt", "value": "\ud800"}],
        },
        {"id": "messages-surrogate", "messages": [{"role": "user", "content": "a \udfff"}]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))  # json.dumps escapes the surrogates as \ud800
    check = check_records(load_training_records(tmp_path / "data.json", shapes["images"]), processor, 2048)
    assert check.kept == [0, 1]
    reasons = {problem.record_id: str(problem) for problem in check.problems}
    assert (
        reasons["list-role"] == "record 2 (id 'list-role'): malformed record: turn 0 is from ['human']; expected "
        "'human' or 'gpt'"
    )
    assert reasons["surrogate"] == (
        "record 3 (id 'surrogate'): malformed record: turn 1 holds '\\ud800', a lone surrogate that is not valid Unicode"
    )
    assert "record 4 (id 'messages-surrogate'): malformed record: missing or empty 'conversations'" in reasons.values()


# --------------------------------------------------------------------------------------------- failed starts


def corrupt_png() -> bytes:
    """A PNG cut in the middle of its pixel data: its header reads (the default pre-pass passes it), decoding fails."""
    pixels = torch.randint(0, 256, (32, 32, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, "PNG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


@pytest.mark.slow
def test_a_run_that_fails_before_its_first_step_leaves_no_output_folder(tiny_dir, shapes, tmp_path, run_train):
    """Bad data found at the first batch (an image cut after its header, which only --verify-images finds before):
    the error names the record, and the output folder (and the parents this run would have created) do not exist
    afterwards. Before, it held ms_llava_training.json."""
    images = tmp_path / "images"
    shutil.copytree(shapes["images"], images)
    (images / "cut.png").write_bytes(corrupt_png())
    records = json.loads(shapes["qa8"].read_text())[:4]
    records[0] = {**records[0], "id": "cut", "image": "cut.png"}  # the first batch holds every record
    (tmp_path / "data.json").write_text(json.dumps(records))
    output_dir = tmp_path / "runs" / "first"
    arguments = ["--stage", "finetune", "--model", str(tiny_dir), "--data", str(tmp_path / "data.json")]
    arguments += ["--image-folder", str(images), "--output-dir", str(output_dir), "--max-steps", "1"]
    arguments += ["--global-batch-size", "4", "--num-workers", "0"]
    status, _, err = run_train(arguments)
    assert status != 0 and "record 0 (id 'cut'), image(s) " + str(images / "cut.png") + ": OSError" in err
    assert not (tmp_path / "runs").exists()


class InterruptAtFirstStep(TrainerCallback):
    """Ctrl-C while the run's first step computes."""

    def on_step_begin(self, args, state, control, **kwargs):
        raise KeyboardInterrupt


@pytest.mark.slow
def test_ctrl_c_before_the_first_step_leaves_an_existing_run_folder_as_it_was(
    tiny_dir, shapes, tmp_path, folder_contents
):
    """A folder with a user's notes, a complete checkpoint-2, the checkpoint-3 a crash left half-written and a loss
    log of three steps: a resumed run interrupted in its first step changes none of it (before, the loss log was cut
    back to two steps, the run record rewritten and checkpoint-3 removed before a single step ran)."""
    output_dir = tmp_path / "out"
    args = (tiny_dir, "finetune", shapes["qa8"], shapes["images"], output_dir)
    train(*args, max_steps=3, **{**RUN, "save_steps": 1, "save_total_limit": None})
    shutil.rmtree(output_dir / "checkpoint-3" / "rng_state.pth", ignore_errors=True)
    (output_dir / "checkpoint-3" / "trainer_state.json").unlink()  # as a crash mid-save leaves it
    (output_dir / "notes.txt").write_text("the user's own file")
    before = folder_contents(output_dir)
    assert [path.name for path in complete_checkpoints(output_dir)] == ["checkpoint-1", "checkpoint-2"]

    with pytest.raises(KeyboardInterrupt):
        train(*args, max_steps=3, resume=True, callbacks=[InterruptAtFirstStep()], **{**RUN, "save_steps": 1})
    assert folder_contents(output_dir) == before

    # a fresh folder: Ctrl-C in the first step removes what the run created
    with pytest.raises(KeyboardInterrupt):
        train(*args[:4], tmp_path / "fresh", max_steps=1, callbacks=[InterruptAtFirstStep()], **RUN)
    assert not (tmp_path / "fresh").exists()


# --------------------------------------------------------------------------------------------- --resume


@pytest.mark.slow
def test_resume_says_which_checkpoint_and_step_or_why_it_starts_fresh(tiny_dir, shapes, tmp_path, caplog, run_train):
    output_dir = tmp_path / "out"
    common = ["--stage", "finetune", "--model", tiny_dir, "--data", shapes["qa8"], "--image-folder", shapes["images"]]
    common += ["--output-dir", output_dir, "--global-batch-size", "4", "--num-workers", "0", "--save-steps", "1"]
    common += ["--resume"]

    with caplog.at_level("INFO", logger="ms_llava.training.trainer"):
        assert run_train([*common, "--max-steps", "2"])[0] == 0
    assert f"resume: starting from the beginning (step 0): {output_dir} does not exist" in caplog.text
    caplog.clear()

    (output_dir / "checkpoint-2" / "trainer_state.json").unlink()  # as a save that died before its end leaves it
    with caplog.at_level("INFO", logger="ms_llava.training.trainer"):
        assert run_train([*common, "--max-steps", "2"])[0] == 0
    assert (
        f"resume: continuing from {output_dir / 'checkpoint-1'} at step 1 (skipping the incomplete checkpoint-2)"
        in caplog.text
    )

    empty = tmp_path / "empty"
    (empty / "checkpoint-5").mkdir(parents=True)
    with caplog.at_level("INFO", logger="ms_llava.training.trainer"):
        train(tiny_dir, "finetune", shapes["qa8"], shapes["images"], empty, resume=True, max_steps=1, **RUN)
    assert (
        f"resume: starting from the beginning (step 0): {empty} holds only incomplete checkpoints (checkpoint-5: no "
        "trainer_state.json)" in caplog.text
    )


@pytest.mark.slow
def test_the_train_command_prints_where_it_resumed_from(tiny_dir, shapes, tmp_path, run_train):
    output_dir = tmp_path / "out"
    common = ["--stage", "finetune", "--model", tiny_dir, "--data", shapes["qa8"], "--image-folder", shapes["images"]]
    common += ["--output-dir", output_dir, "--global-batch-size", "4", "--num-workers", "0", "--save-steps", "1"]
    status, out, _ = run_train([*common, "--max-steps", "2"])
    assert status == 0 and "resumed from" not in out
    (output_dir / "checkpoint-2" / "trainer_state.json").unlink()  # as a save that died before its end leaves it
    status, out, _ = run_train([*common, "--max-steps", "2", "--resume"])
    assert status == 0 and "trained finetune: 2 steps, 8 examples (0 skipped), final loss " in out
    assert f"resumed from {output_dir / 'checkpoint-1'}; model and processor in {output_dir}" in out


def test_jsonl_records_may_hold_raw_line_and_paragraph_separators(tmp_path):
    """JSON allows U+2028, U+2029 and U+0085 unescaped inside strings (json.dumps(..., ensure_ascii=False) writes
    them so); a JSONL file is split on newlines only."""
    text = "a caption\u2028with a line separator,\u2029a paragraph one and a next-line\u0085control"
    records = [
        {"id": str(index), "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nDescribe."}]}
        for index in range(2)
    ]
    for record in records:
        record["conversations"].append({"from": "gpt", "value": text})
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    assert "\u2028" in path.read_text(encoding="utf-8")
    loaded = load_training_records(path, tmp_path)
    assert len(loaded) == 2
    assert text in json.dumps(loaded[1].messages[-1], ensure_ascii=False)
