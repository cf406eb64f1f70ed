"""What the command line does with the mistakes users make: a clear error naming the file or value (no traceback,
exit status 1), a checkpoint argument decided as local path or Hub id at once, and nothing a user made destroyed.

Nothing here reaches the network: Hub ids are tried against a closed port on 127.0.0.1 (and the session-wide guard
of conftest.py refuses anything else).
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from isolation import local_hub_clients
from llava_checkpoints import save_llava
from ms_llava.cli import main
from ms_llava.testing_utils import write_shapes_dataset, write_tiny_checkpoint


@pytest.fixture(scope="module", autouse=True)
def _imported():
    """What `main` imports to build its parser (every command's module), imported before the timed tests: the
    timings are of the command."""
    with pytest.raises(SystemExit):
        main(["--help"])


@pytest.fixture
def hub_calls(monkeypatch):
    """The repo ids `snapshot_download` is asked for (it fails as an unreachable Hub would)."""
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append(repo_id)
        raise OSError("the Hub is unreachable in this test")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def run_cli(args, capsys):
    """`(exit status, stdout, stderr)` of `ms-llava ARGS` run in this process."""
    try:
        code = main(args)
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def unreachable_hub(tmp_path):
    """huggingface_hub pointed at a closed port of 127.0.0.1, with an empty cache: every Hub request fails."""
    endpoint = f"http://127.0.0.1:{closed_port()}"
    with local_hub_clients(endpoint, tmp_path / "hf_cache"):
        yield endpoint


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("cli_errors") / "tiny")


def truncated_copy(checkpoint: Path, target: Path) -> Path:
    """A copy of `checkpoint` whose model.safetensors lost its second half (an interrupted download)."""
    target.mkdir()
    for path in checkpoint.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    weights = target / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    return target


def assert_clear_error(code, err, *needles):
    assert code == 1, err
    assert "Traceback" not in err
    assert err.startswith("ms-llava ") and ": error: " in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"


# ------------------------------------------------------------------------------------------- local path or Hub id


@pytest.mark.parametrize("value", ["./my-checkpint", "~/no-such-ms-llava-checkpoint", "{tmp}/runs/stage2"])
@pytest.mark.parametrize("command", ["demo", "visualize"])
def test_a_path_that_does_not_exist_fails_at_once(command, value, tmp_path, capsys, hub_calls, monkeypatch):
    """A value that can only be a path (`./`, `~`, or a folder inside an existing one) is never tried on the Hub."""
    (tmp_path / "runs").mkdir()
    value = value.format(tmp=tmp_path)
    monkeypatch.chdir(tmp_path)
    started = time.perf_counter()
    code, _, err = run_cli([command, "--checkpoint", value], capsys)
    assert time.perf_counter() - started < 3
    assert_clear_error(code, err, f"--checkpoint {value}: no such folder", "check the path")
    assert "Hub" not in err and hub_calls == []


def test_a_bare_name_tries_the_folder_and_the_hub_quickly(tmp_path, capsys, unreachable_hub, monkeypatch):
    monkeypatch.chdir(tmp_path)
    started = time.perf_counter()
    code, _, err = run_cli(["demo", "--checkpoint", "someone/no-such-model"], capsys)
    assert time.perf_counter() - started < 10
    assert_clear_error(
        code,
        err,
        "--checkpoint someone/no-such-model: not a local folder",
        f"{tmp_path / 'someone' / 'no-such-model'} does not exist",
        "downloading it from the Hub failed",
        unreachable_hub,
    )


def test_hf_hub_offline_is_respected(tmp_path, capsys, unreachable_hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["visualize", "--checkpoint", "gpt2"], capsys)
    assert_clear_error(code, err, "--checkpoint gpt2: not a local folder", "HF_HUB_OFFLINE is set")


@pytest.mark.slow
def test_the_command_fails_within_seconds_when_the_hub_is_unreachable(tmp_path):
    """`ms-llava demo --checkpoint NAME` in a fresh process (HF_ENDPOINT at a closed port): today's transformers
    retries for most of a minute; ours makes one attempt."""
    environment = {
        **os.environ,
        "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "0",
    }
    # The command is timed inside the process, after the imports (which take seconds on a busy machine).
    script = (
        "import sys, time\n"
        "from ms_llava import hub, training\n"
        "from ms_llava.cli import main\n"
        "started = time.perf_counter()\n"
        "code = main(['demo', '--checkpoint', 'someone/no-such-model'])\n"
        "print(f'elapsed {time.perf_counter() - started:.3f}')\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "someone/no-such-model: not a local folder" in result.stderr
    assert "downloading it from the Hub failed" in result.stderr
    elapsed = float(result.stdout.split("elapsed ")[-1])
    assert elapsed < 10, f"the command took {elapsed:.1f} s"


def test_train_model_argument_is_resolved_before_training(tmp_path, capsys, unreachable_hub, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write_shapes_dataset(tmp_path / "data", "qa", 2)
    args = ["train", "--stage", "finetune", "--data", str(data), "--output-dir", str(tmp_path / "out")]
    code, _, err = run_cli([*args, "--model", "./my-checkpint"], capsys)
    assert_clear_error(code, err, "--model ./my-checkpint: no such folder")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------- checkpoints that lack files


def test_a_folder_that_is_no_checkpoint_is_named(tmp_path, capsys, tiny_checkpoint):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["demo", "--checkpoint", str(tmp_path / "empty")], capsys)
    assert_clear_error(code, err, f"--checkpoint {tmp_path / 'empty'}: no config.json")

    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    code, _, err = run_cli(["visualize", "--checkpoint", str(tmp_path / "no-weights")], capsys)
    assert_clear_error(code, err, f"--checkpoint {tmp_path / 'no-weights'}: no weights (model.safetensors")

    code, _, err = run_cli(["demo", "--checkpoint", str(tiny_checkpoint / "config.json")], capsys)
    assert_clear_error(code, err, "config.json: is a file; give the checkpoint's folder")

    no_tokenizer = truncated_copy(tiny_checkpoint, tmp_path / "no-tokenizer")
    (no_tokenizer / "model.safetensors").write_bytes((tiny_checkpoint / "model.safetensors").read_bytes())
    (no_tokenizer / "tokenizer.json").unlink()
    code, _, err = run_cli(["demo", "--checkpoint", str(no_tokenizer)], capsys)
    assert_clear_error(code, err, f"--checkpoint {no_tokenizer}: the processor's files are missing: tokenizer.json")

    (no_tokenizer / "config.json").write_text("{")
    code, _, err = run_cli(["visualize", "--checkpoint", str(no_tokenizer)], capsys)
    assert_clear_error(code, err, f"--checkpoint {no_tokenizer}: config.json is not valid JSON")


def test_a_shard_listed_in_the_index_but_missing_is_named(tmp_path, capsys, tiny_checkpoint):
    folder = truncated_copy(tiny_checkpoint, tmp_path / "sharded")
    (folder / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, err = run_cli(["demo", "--checkpoint", str(folder)], capsys)
    assert_clear_error(code, err, "model.safetensors.index.json lists shards that are missing: model-00001-of-00002")


# ------------------------------------------------------------------------------------------ truncated weights


@pytest.mark.parametrize("command", ["demo", "visualize", "push", "train"])
def test_a_truncated_safetensors_file_is_named(command, tmp_path, capsys, tiny_checkpoint, unreachable_hub):
    broken = truncated_copy(tiny_checkpoint, tmp_path / "broken")
    args = {
        "demo": ["demo", "--checkpoint", str(broken)],
        "visualize": ["visualize", "--checkpoint", str(broken)],
        "push": ["push", str(broken), "me/model"],
        "train": [
            "train",
            "--stage",
            "finetune",
            "--model",
            str(broken),
            "--data",
            str(write_shapes_dataset(tmp_path / "data", "qa", 2)),
            "--output-dir",
            str(tmp_path / "out"),
        ],
    }[command]
    code, _, err = run_cli(args, capsys)
    assert_clear_error(
        code, err, f"{broken / 'model.safetensors'} is not a readable safetensors file (truncated or corrupt"
    )


def test_convert_names_a_truncated_source(tmp_path, capsys):
    source = save_llava(tmp_path / "llava")
    weights = source / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    args = ["convert", "llava-to-ms-llava", "--source", str(source), "--output", str(tmp_path / "out")]
    code, _, err = run_cli([*args, "--num-queries", "16"], capsys)
    assert code == 1 and "Traceback" not in err
    assert f"{weights} is not a readable safetensors file (truncated or corrupt" in err


def test_a_safetensors_error_from_inside_transformers_names_the_checkpoint(
    tmp_path, capsys, monkeypatch, tiny_checkpoint
):
    """Should a corrupt file get past the header check, the error that transformers raises still names the
    checkpoint argument, without a traceback."""
    from safetensors import SafetensorError

    from ms_llava import demo

    def load_checkpoint(checkpoint):
        raise SafetensorError("Error while deserializing header: invalid JSON in header")

    monkeypatch.setattr(demo, "load_checkpoint", load_checkpoint)
    code, _, err = run_cli(["demo", "--checkpoint", "some/where"], capsys)
    assert_clear_error(code, err, "a .safetensors file in some/where is truncated or corrupt: ", "invalid JSON")

    broken = truncated_copy(tiny_checkpoint, tmp_path / "broken")  # the file is found and named when it can be
    code, _, err = run_cli(["demo", "--checkpoint", str(broken)], capsys)
    assert_clear_error(code, err, f"in {broken} is truncated or corrupt ({broken / 'model.safetensors'})")


# ---------------------------------------------------------------------------------------- tracebacks on demand


def test_debug_flag_and_environment_variable_show_the_traceback(tmp_path, capsys, monkeypatch):
    from ms_llava.checkpoints import CheckpointError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="no such folder"):
        main(["--debug", "demo", "--checkpoint", "./missing"])
    train = ["train", "--stage", "finetune", "--model", "./missing", "--data", "d.json", "--output-dir", "out"]
    with pytest.raises(CheckpointError, match="no such folder"):  # train's parser has a --debug of its own
        main(["--debug", *train])
    monkeypatch.setenv("MS_LLAVA_DEBUG", "1")
    with pytest.raises(CheckpointError, match="no such folder"):
        main(["demo", "--checkpoint", "./missing"])
    monkeypatch.setenv("MS_LLAVA_DEBUG", "0")
    code, _, err = run_cli(["demo", "--checkpoint", "./missing"], capsys)
    assert_clear_error(code, err, "ms-llava --debug demo", "MS_LLAVA_DEBUG=1")


def test_a_programming_error_keeps_its_traceback(monkeypatch):
    from ms_llava import demo

    def run_demo(*args, **kwargs):
        raise TypeError("a bug, not a user's mistake")

    monkeypatch.setattr(demo, "run_demo", run_demo)
    with pytest.raises(TypeError, match="a bug"):
        main(["demo"])


def test_an_unreadable_image_is_named(tmp_path, capsys, tiny_checkpoint):
    (tmp_path / "photo.jpg").write_text("not an image")
    code, _, err = run_cli(
        ["demo", "--checkpoint", str(tiny_checkpoint), "--image", str(tmp_path / "photo.jpg")], capsys
    )
    assert code not in (0, None) and "Traceback" not in err
    assert "photo.jpg" in err


# ------------------------------------------------------------------------------------- nothing a user made lost


def test_tiny_refuses_a_folder_holding_a_checkpoint(tmp_path, capsys):
    folder = tmp_path / "trained"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "ms_llava"}')
    (folder / "model.safetensors").write_bytes(b"the user's trained weights")
    code, _, err = run_cli(["tiny", str(folder)], capsys)
    assert_clear_error(code, err, f"{folder} already holds a checkpoint", "--overwrite")
    assert (folder / "model.safetensors").read_bytes() == b"the user's trained weights"


def test_tiny_writes_next_to_other_files_without_overwrite(tmp_path, capsys):
    folder = tmp_path / "notes-only"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    code, out, _ = run_cli(["tiny", str(folder)], capsys)
    assert code == 0 and f"wrote {folder}" in out
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "model.safetensors").is_file()


def test_tiny_refuses_to_overwrite_a_users_file_of_a_checkpoint_name_without_overwrite(tmp_path, capsys):
    folder = tmp_path / "tokenizer-only"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("the user's tokenizer")
    code, _, err = run_cli(["tiny", str(folder)], capsys)
    assert_clear_error(code, err, f"{folder} already has tokenizer.json, which this would overwrite", "--overwrite")
    assert (folder / "tokenizer.json").read_text() == "the user's tokenizer"
    assert sorted(path.name for path in folder.iterdir()) == ["tokenizer.json"]
    assert not list(tmp_path.glob(".tokenizer-only.*"))


def test_tiny_overwrite_replaces_only_checkpoint_files_and_lists_what_it_removes(tmp_path, capsys):
    folder = tmp_path / "trained"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "ms_llava"}')
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (folder / shard).write_bytes(b"old shard")
    (folder / "model.safetensors.index.json").write_text("{}")
    (folder / "notes.txt").write_text("what I tried")
    (folder / "logs").mkdir()
    (folder / "logs" / "run.txt").write_text("log")
    code, out, _ = run_cli(["tiny", str(folder), "--overwrite"], capsys)
    assert code == 0
    removed = "model-00001-of-00002.safetensors, model-00002-of-00002.safetensors, model.safetensors.index.json"
    assert (
        f"replacing the checkpoint in {folder}: " in out
        and f"removed (not part of the new checkpoint): {removed}" in out
    )
    assert "kept: logs, notes.txt" in out
    assert (folder / "notes.txt").read_text() == "what I tried" and (folder / "logs" / "run.txt").read_text() == "log"
    assert not (folder / "model.safetensors.index.json").exists()
    assert json.loads((folder / "config.json").read_text())["resampler_config"]["num_queries"] == 16
    assert not list(tmp_path.glob(".trained.*"))  # no staging or previous folder left behind


def test_convert_overwrite_keeps_the_users_notes_and_lists_what_it_removes(tmp_path, capsys):
    source = save_llava(tmp_path / "llava")
    output = tmp_path / "ms-llava"
    args = ["convert", "llava-to-ms-llava", "--source", str(source), "--output", str(output), "--num-queries", "16"]
    assert run_cli(args, capsys)[0] == 0
    (output / "notes.txt").write_text("lr 2e-5 worked best")
    (output / "model-00009-of-00009.safetensors").write_bytes(b"stale shard of an earlier conversion")
    code, out, err = run_cli([*args, "--overwrite"], capsys)
    assert code == 0, err
    assert f"replacing the checkpoint in {output}: " in out
    assert "removed (not part of the new checkpoint): model-00009-of-00009.safetensors" in out
    assert "kept: notes.txt" in out
    assert (output / "notes.txt").read_text() == "lr 2e-5 worked best"
    assert not (output / "model-00009-of-00009.safetensors").exists() and (output / "model.safetensors").is_file()


def test_a_hub_id_is_downloaded_once_and_used(tmp_path, capsys, hub, tiny_dir, image, monkeypatch):
    """A bare name that is on the Hub (the loopback one): the resolver downloads its snapshot and the command runs on
    it; a local folder of the same name would have been taken first."""
    from ms_llava.hub import push_to_hub

    push_to_hub(tiny_dir, "me/tiny-cli")
    monkeypatch.chdir(tmp_path)
    image.save(tmp_path / "photo.png")
    args = ["visualize", "--checkpoint", "me/tiny-cli", "--image", "photo.png", "--output", str(tmp_path / "v.png")]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert "checkpoint: " in out and "me--tiny-cli" in out and (tmp_path / "v.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    "module, arguments",
    [
        ("ms_llava.training", ["--stage", "finetune", "--data", "data.json", "--output-dir", "out"]),
        ("ms_llava.evaluation", ["--tasks", "pope", "--output", "results.json"]),
    ],
)
def test_the_launcher_forms_name_a_mistyped_model_in_one_line(module, arguments, tmp_path):
    """`python -m ms_llava.training` / `ms_llava.evaluation` (what `accelerate launch -m` and `torchrun -m` run) handle
    input errors as `ms-llava` does; a leading `--debug` shows the traceback (train's own `--debug` is
    TrainingArguments', so `ms-llava --debug train` failed to show it until the flag had a dest of its own)."""
    command = [sys.executable, "-m", module, "--model", "./my-checkpint", *arguments]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"--model ./my-checkpint: no such folder ({tmp_path / 'my-checkpint'})" in result.stderr
    debug_command = [sys.executable, "-m", module, "--debug", *command[3:]]
    debug = subprocess.run(debug_command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
