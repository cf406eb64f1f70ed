"""Property-based tests (Hypothesis) of the training-data loader and its pre-pass (issue 18): random malformed
records are each either kept or named (index and reason) as a bad record, never a crash; random bytes as a data file
load or give a ValueError naming the file. With `skip_bad_records` the bad ones are counted (`DataCheck.summary`,
the `skipping N bad record(s)` log line and the train command's `(N skipped)`); without it `BadRecordsError` names
them. A small example budget in the fast lane, a larger one under `-m slow`. No example database is written
(`database=None`): the repository stays clean.
"""

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ms_llava.training.data import BadRecordsError, check_records, load_training_records

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# Any JSON value, small; strings include image markers and lone surrogates (valid JSON escapes, invalid Unicode).
TEXT = st.one_of(st.text(max_size=12), st.sampled_from(["<image>", "<image>\nHi", "\ud800", "a \udfff b", "", " "]))
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(TEXT, children, max_size=3),
    max_leaves=8,
)
ROLES = st.sampled_from(["human", "gpt", "system", "user", "assistant", "bot"]) | JSON


@pytest.fixture(scope="module")
def fuzz(shapes, tmp_path_factory):
    """Four valid records in each format, their image folder, and a folder for the files the tests write."""
    llava = json.loads(shapes["qa8"].read_text())[:4]
    messages = [
        {
            "id": f"m{index}",
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
                {"role": "assistant", "content": "red"},
            ],
            "images": [record["image"]],
        }
        for index, record in enumerate(llava)
    ]
    return {
        "llava": llava,
        "messages": messages,
        "images": shapes["images"],
        "folder": tmp_path_factory.mktemp("fuzz"),
    }


@st.composite
def mutated(draw, record: dict) -> dict:
    """`record` with one random change: a field deleted or replaced by any JSON value, a turn / message or one of its
    fields replaced, or a random turn appended."""
    record = json.loads(json.dumps(record))
    turns_key = "conversations" if "conversations" in record else "messages"
    text_key, role_key = ("value", "from") if turns_key == "conversations" else ("content", "role")
    kind = draw(st.sampled_from(["delete field", "replace field", "replace turn", "turn field", "append turn"]))
    if kind in ("delete field", "replace field"):
        key = draw(st.sampled_from(sorted(record)))
        if kind == "delete field":
            del record[key]
        else:
            record[key] = draw(JSON)
        return record
    turns = record[turns_key]
    number = draw(st.integers(0, len(turns) - 1))
    if kind == "replace turn":
        turns[number] = draw(JSON)
    elif kind == "turn field":
        key = draw(st.sampled_from([text_key, role_key]))
        turns[number][key] = draw(ROLES if key == role_key else JSON | TEXT)
    else:
        turns.append({role_key: draw(ROLES), text_key: draw(TEXT)})
    return record


@st.composite
def data_sets(draw, base: list[dict]) -> tuple[list, set[int]]:
    """1-8 records: the first a valid one (it decides the format), each other valid, mutated or any JSON value.
    Returns the records and the indices of those left valid."""
    records, valid = [base[0]], {0}
    for index in range(1, draw(st.integers(1, 8))):
        choice = draw(st.sampled_from(["valid", "mutated", "mutated", "any"]))
        original = base[index % len(base)]
        if choice == "valid":
            records.append(original)
            valid.add(index)
        else:
            records.append(draw(mutated(original)) if choice == "mutated" else draw(JSON))
    return records, valid


def check_partition(fuzz, tiny, records: list, valid: set[int], suffix: str) -> None:
    """Every record is kept or named as a bad record (never both, never neither, never a crash); the valid ones are
    kept; BadRecordsError names the bad ones and counts them."""
    _, processor = tiny
    with tempfile.TemporaryDirectory(dir=fuzz["folder"]) as directory:
        path = Path(directory) / f"data{suffix}"
        if suffix == ".jsonl":
            path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
        else:
            path.write_text(json.dumps(records), encoding="utf-8")
        check = check_records(load_training_records(path, fuzz["images"]), processor, max_length=2048)
    bad = [problem.index for problem in check.problems]
    assert sorted(check.kept + bad) == list(range(len(records))), (check.kept, bad)
    assert valid <= set(check.kept)
    for problem in check.problems:
        assert str(problem).startswith(f"record {problem.index} (") and problem.reason
    if check.problems:
        assert f"{len(check.problems)} bad (" in check.summary()
        message = str(BadRecordsError(check.problems, check.num_records))
        assert message.startswith(f"{len(check.problems)} of {len(records)} training records are bad")
        for problem in check.problems[:10]:
            assert f"record {problem.index} (" in message
        assert "--skip-bad-records" in message


@FAST
@given(data=st.data(), suffix=st.sampled_from([".json", ".jsonl"]))
def test_random_malformed_llava_records_are_kept_or_named(fuzz, tiny, data, suffix):
    records, valid = data.draw(data_sets(fuzz["llava"]))
    check_partition(fuzz, tiny, records, valid, suffix)


@FAST
@given(data=st.data())
def test_random_malformed_messages_records_are_kept_or_named(fuzz, tiny, data):
    records, valid = data.draw(data_sets(fuzz["messages"]))
    check_partition(fuzz, tiny, records, valid, ".json")


@pytest.mark.slow
@SLOW
@given(data=st.data(), llava=st.booleans(), suffix=st.sampled_from([".json", ".jsonl"]))
def test_random_malformed_records_larger_budget(fuzz, tiny, data, llava, suffix):
    records, valid = data.draw(data_sets(fuzz["llava" if llava else "messages"]))
    check_partition(fuzz, tiny, records, valid, suffix)


def check_random_file(folder: Path, content: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory(dir=folder) as directory:
        path = Path(directory) / f"data{suffix}"
        path.write_bytes(content)
        try:
            records = load_training_records(path)
        except ValueError as error:
            assert str(path) in str(error), error
        else:
            assert len(records) >= 1


# Bytes that are often nearly JSON: JSON texts with bytes spliced in, and plain random bytes.
FILE_BYTES = st.one_of(
    st.binary(max_size=64),
    st.builds(
        lambda value, position, noise: (lambda text: text[:position] + noise + text[position:])(
            json.dumps(value).encode()
        ),
        JSON,
        st.integers(0, 40),
        st.binary(max_size=3),
    ),
)


@FAST
@given(content=FILE_BYTES, suffix=st.sampled_from([".json", ".jsonl"]))
def test_random_bytes_as_a_data_file_load_or_name_the_file(tmp_path_factory, content, suffix):
    check_random_file(tmp_path_factory.getbasetemp(), content, suffix)


@pytest.mark.slow
@SLOW
@given(content=FILE_BYTES, suffix=st.sampled_from([".json", ".jsonl"]))
def test_random_bytes_as_a_data_file_larger_budget(tmp_path_factory, content, suffix):
    check_random_file(tmp_path_factory.getbasetemp(), content, suffix)


@pytest.mark.slow
def test_skip_bad_records_counts_and_prints_what_it_skips(tiny_dir, fuzz, tmp_path, run_train, caplog):
    """The train command with --skip-bad-records: every skipped record counted in its summary line and named in the
    log; nothing dropped without a word."""
    records = [*fuzz["llava"], {"id": "x", "conversations": [{"from": ["human"], "value": "x"}]}, [], "text"]
    (tmp_path / "data.json").write_text(json.dumps(records))
    arguments = ["--stage", "finetune", "--model", tiny_dir, "--data", tmp_path / "data.json", "--image-folder"]
    arguments += [fuzz["images"], "--output-dir", tmp_path / "out", "--max-steps", "1", "--global-batch-size", "4"]
    arguments += ["--num-workers", "0", "--skip-bad-records"]
    with caplog.at_level("WARNING", logger="ms_llava.training.trainer"):
        status, out, _ = run_train(arguments)
    assert status == 0 and "1 steps, 4 examples (3 skipped)" in out
    assert "skipping 3 bad record(s) (record 4 (id 'x'): malformed record: turn 0 is from ['human']" in caplog.text
    listed = [json.loads(line)["index"] for line in (tmp_path / "out" / "skipped_records.jsonl").open()]
    assert listed == [4, 5, 6]
