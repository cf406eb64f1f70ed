"""What the command line does with the mistakes users make and the failures they meet: one line `ms-llava COMMAND:
error: ...` naming the culprit and the cause (no traceback, exit status 1), found by the error's kind (network, file
system, content) along its chain; a checkpoint argument decided as local path or Hub id at once; nothing a user made
destroyed.

Nothing here reaches the network: Hub ids are tried against a closed port on 127.0.0.1 (and the session-wide guard
of conftest.py refuses anything else).
"""

import errno
import json
import os
import runpy
import sys
import time
from pathlib import Path

import pytest

import ms_llava.demo  # noqa: F401 - imported before the timed tests: the timings are of the commands
from isolation import local_hub_clients
from llava_checkpoints import save_llava
from ms_llava.testing_utils import write_shapes_dataset, write_tiny_checkpoint
from ms_llava_cli import describe, main

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster, and steady on a shared machine


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


@pytest.fixture
def unreachable_hub(tmp_path, free_port):
    """huggingface_hub pointed at a closed port of 127.0.0.1, with an empty cache: every Hub request fails."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    with local_hub_clients(endpoint, tmp_path / "hf_cache"):
        yield endpoint


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("cli_errors") / "tiny")


def copy_of(checkpoint: Path, target: Path) -> Path:
    target.mkdir()
    for path in checkpoint.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def truncated_copy(checkpoint: Path, target: Path) -> Path:
    """A copy of `checkpoint` whose model.safetensors lost its second half (an interrupted download)."""
    weights = copy_of(checkpoint, target) / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    return target


def assert_clear_error(code, err, *needles):
    """Exit status 1, one error line (and the --debug hint), no traceback, every needle in it."""
    assert code == 1, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert err.startswith("ms-llava ") and ": error: " in lines[0] and len(lines) == 2, err
    assert "--debug" in lines[1] and "MS_LLAVA_DEBUG=1" in lines[1], err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


# ------------------------------------------------------------------------------------------- local path or Hub id


@pytest.mark.parametrize("value", ["./my-checkpint", "~/no-such-ms-llava-checkpoint", "{tmp}/runs/stage2"])
@pytest.mark.parametrize("command", ["demo", "visualize", "chat"])
def test_a_path_that_does_not_exist_fails_at_once(command, value, tmp_path, run_cli, hub_calls, monkeypatch):
    """A value that can only be a path (`./`, `~`, or a folder inside an existing one) is never tried on the Hub."""
    (tmp_path / "runs").mkdir()
    value = value.format(tmp=tmp_path)
    monkeypatch.chdir(tmp_path)
    started = time.perf_counter()
    code, _, err = run_cli([command, "--checkpoint", value])
    assert time.perf_counter() - started < 3
    assert_clear_error(code, err, f"--checkpoint {value}: no such folder", "check the path")
    assert "Hub" not in err and hub_calls == []


def test_a_bare_name_tries_the_folder_and_the_hub_quickly(tmp_path, run_cli, unreachable_hub, monkeypatch):
    """Today's transformers retries for most of a minute; one attempt is made, and the error names both tries."""
    monkeypatch.chdir(tmp_path)
    started = time.perf_counter()
    code, _, err = run_cli(["demo", "--checkpoint", "someone/no-such-model"])
    elapsed = time.perf_counter() - started
    assert elapsed < 10, f"the command took {elapsed:.1f} s"
    assert_clear_error(
        code,
        err,
        "--checkpoint someone/no-such-model: not a local folder",
        f"{tmp_path / 'someone' / 'no-such-model'} does not exist",
        "downloading it from the Hub failed",
        unreachable_hub,
    )


def test_hf_hub_offline_is_respected(tmp_path, run_cli, unreachable_hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["visualize", "--checkpoint", "gpt2"])
    assert_clear_error(code, err, "--checkpoint gpt2: not a local folder", "HF_HUB_OFFLINE is set")


@pytest.mark.slow  # imports the trainer
def test_train_model_argument_is_resolved_before_training(tmp_path, run_cli, unreachable_hub, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write_shapes_dataset(tmp_path / "data", "qa", 2)
    args = ["train", "--stage", "finetune", "--data", str(data), "--output-dir", str(tmp_path / "out")]
    code, _, err = run_cli([*args, "--model", "./my-checkpint"])
    assert_clear_error(code, err, "--model ./my-checkpint: no such folder")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------- checkpoints that lack files


def test_a_folder_that_is_no_checkpoint_is_named(tmp_path, run_cli, tiny_checkpoint):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["demo", "--checkpoint", str(tmp_path / "empty")])
    assert_clear_error(code, err, f"--checkpoint {tmp_path / 'empty'}: no config.json")

    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    code, _, err = run_cli(["visualize", "--checkpoint", str(tmp_path / "no-weights")])
    assert_clear_error(code, err, f"--checkpoint {tmp_path / 'no-weights'}: no weights (model.safetensors")

    code, _, err = run_cli(["demo", "--checkpoint", str(tiny_checkpoint / "config.json")])
    assert_clear_error(code, err, "config.json: is a file; give the checkpoint's folder")

    no_tokenizer = copy_of(tiny_checkpoint, tmp_path / "no-tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    code, _, err = run_cli(["demo", "--checkpoint", str(no_tokenizer)])
    assert_clear_error(code, err, f"--checkpoint {no_tokenizer}: the processor's files are missing: tokenizer.json")

    (no_tokenizer / "config.json").write_text("{")
    code, _, err = run_cli(["visualize", "--checkpoint", str(no_tokenizer)])
    assert_clear_error(code, err, f"--checkpoint {no_tokenizer}: config.json is not valid JSON")


def test_a_shard_listed_in_the_index_but_missing_is_named(tmp_path, run_cli, tiny_checkpoint):
    folder = copy_of(tiny_checkpoint, tmp_path / "sharded")
    (folder / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, err = run_cli(["demo", "--checkpoint", str(folder)])
    assert_clear_error(code, err, "model.safetensors.index.json lists shards that are missing: model-00001-of-00002")


# ------------------------------------------------------------------------------------------ truncated weights


@pytest.mark.parametrize("command", ["demo", "visualize", "push", "train"])
def test_a_truncated_safetensors_file_is_named(command, tmp_path, run_cli, tiny_checkpoint, unreachable_hub):
    broken = truncated_copy(tiny_checkpoint, tmp_path / "broken")
    args = {
        "demo": ["demo", "--checkpoint", broken],
        "visualize": ["visualize", "--checkpoint", broken],
        "push": ["push", broken, "me/model"],
        "train": [
            "train",
            "--stage",
            "finetune",
            "--model",
            broken,
            "--data",
            write_shapes_dataset(tmp_path / "data", "qa", 2),
            "--output-dir",
            tmp_path / "out",
        ],
    }[command]
    code, _, err = run_cli(args)
    assert_clear_error(
        code, err, f"{broken / 'model.safetensors'} is not a readable safetensors file (truncated or corrupt"
    )


def test_convert_names_a_truncated_source(tmp_path, run_cli):
    source = save_llava(tmp_path / "llava")
    weights = source / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    args = ["convert", "llava-to-ms-llava", "--source", str(source), "--output", str(tmp_path / "out")]
    code, _, err = run_cli([*args, "--num-queries", "16"])
    assert code == 1 and "Traceback" not in err
    assert f"{weights} is not a readable safetensors file (truncated or corrupt" in err


def test_a_safetensors_error_from_inside_transformers_names_the_checkpoint(
    tmp_path, run_cli, monkeypatch, tiny_checkpoint
):
    """Should a corrupt file get past the header check, the error that transformers raises still names the
    checkpoint argument, without a traceback."""
    from safetensors import SafetensorError

    from ms_llava import demo

    def load_checkpoint(checkpoint):
        raise SafetensorError("Error while deserializing header: invalid JSON in header")

    monkeypatch.setattr(demo, "load_checkpoint", load_checkpoint)
    code, _, err = run_cli(["demo", "--checkpoint", "some/where"])
    assert_clear_error(code, err, "a .safetensors file in some/where is truncated or corrupt: ", "invalid JSON")

    broken = truncated_copy(tiny_checkpoint, tmp_path / "broken")  # the file is found and named when it can be
    code, _, err = run_cli(["demo", "--checkpoint", str(broken)])
    assert_clear_error(code, err, f"in {broken} is truncated or corrupt ({broken / 'model.safetensors'})")


# -------------------------------------------------------------------------------------- one line for each kind


def bad_checkpoints(tiny: Path, root: Path) -> dict[str, Path]:
    """Checkpoints whose files are all there and readable, but whose content does not load."""
    folders = {name: copy_of(tiny, root / name) for name in ("wrong-type", "wrong-shape", "pickle")}
    for name, edit in (
        ("wrong-type", ("resampler_config", "scope_bias_strength", "high")),
        ("wrong-shape", ("text_config", "intermediate_size", 41)),
    ):
        config = json.loads((folders[name] / "config.json").read_text())
        config[edit[0]][edit[1]] = edit[2]
        (folders[name] / "config.json").write_text(json.dumps(config))
    (folders["pickle"] / "model.safetensors").unlink()
    import torch

    torch.save(
        {"weight": type("Payload", (), {"__reduce__": lambda self: (print, ("ran",))})()},
        folders["pickle"] / "pytorch_model.bin",
    )
    return folders


def test_each_kind_of_failure_is_one_line_naming_the_culprit(
    tmp_path, run_cli, tiny_checkpoint, unreachable_hub, image
):
    """Through the command line, one failure of each kind that reached the user as a traceback (or under another
    name) before the boundary knew errors by kind."""
    bad = bad_checkpoints(tiny_checkpoint, tmp_path)
    image.save(tmp_path / "photo.png")
    full = tmp_path / "disk" / "attention.png"  # writes to /dev/full fail as a full disk does: ENOSPC
    full.parent.mkdir()
    full.symlink_to("/dev/full")
    host = unreachable_hub.removeprefix("http://")
    cases = [
        # network: the Hub refuses the connection (was: a 77-line httpx traceback)
        (
            ["push", tiny_checkpoint, "me/model"],
            [f"cannot reach the Hub at {host} (ConnectError", "--dry-run OUT", "HF_HUB_OFFLINE=1"],
        ),
        # file system: a full disk while writing, named with the folder being written (was: no folder named)
        (
            ["visualize", "--checkpoint", tiny_checkpoint, "--image", tmp_path / "photo.png", "--output", full],
            [f"cannot write {full.parent}: no space left on the device"],
        ),
        # content: a config value of the wrong type, the field named (was: a traceback)
        (
            ["demo", "--checkpoint", bad["wrong-type"]],
            [f"{bad['wrong-type']}/config.json", "field 'scope_bias_strength'", "'high'"],
        ),
        # content: weights whose shapes config.json does not give (was: transformers' traceback, no file named)
        (
            ["visualize", "--checkpoint", bad["wrong-shape"]],
            [f"--checkpoint {bad['wrong-shape']}: model.safetensors holds", "but config.json builds", "disagree"],
        ),
        # content: a pickle that is not plain tensors is refused, and said so (was: a traceback)
        (
            ["demo", "--checkpoint", bad["pickle"]],
            [
                f"{bad['pickle']}/pytorch_model.bin is not a plain state dict",
                "Unsupported global: GLOBAL print",
                "could run code",
            ],
        ),
    ]
    for args, needles in cases:
        code, out, err = run_cli(args)
        assert_clear_error(code, err, *needles)
        assert "ran" not in out.splitlines()  # the pickle's payload never ran


@pytest.mark.parametrize(
    ("error", "kind", "line"),
    [
        # a read-only output folder (check_writable) and a missing file: the OSError's own words and file
        (
            OSError(errno.EROFS, "cannot write into /runs: the file system is read-only", "/runs/out"),
            "file",
            "cannot write into /runs: the file system is read-only: /runs/out",
        ),
        (
            FileNotFoundError(errno.ENOENT, "No such file or directory", "data.json"),
            "file",
            "No such file or directory: data.json",
        ),
        # safetensors words a full disk while saving as Rust does: not a corrupt input file
        ("SafetensorError", "file", "No space left on device (os error 28)"),
        # lmms-eval's and datasets' retries end in tenacity's RetryError: the last attempt's cause is told
        ("RetryError", "network", "Couldn't reach 'lmms-lab/GQA' on the Hub"),
        (ImportError("No module named 'peft'"), "dependency", "No module named 'peft'"),
        # a config value out of range, as transformers' @strict configs refuse it (MSLlavaConfig built from flags)
        ("StrictDataclassError", "content", "num_queries (M) must be a positive perfect square"),
        (TypeError("a bug"), None, ""),
    ],
)
def test_the_kind_is_found_along_the_chain(error, kind, line):
    """Failures that a test cannot cause for real (a full or read-only disk for the superuser, exhausted retries)."""
    if error == "SafetensorError":
        from safetensors import SafetensorError

        try:
            raise SafetensorError("No space left on device (os error 28)")
        except SafetensorError as inner:
            error = RuntimeError("saving failed")
            error.__context__ = inner
    elif error == "StrictDataclassError":
        from ms_llava import MSResamplerConfig

        with pytest.raises(Exception) as caught:
            MSResamplerConfig(num_queries=10)
        error = caught.value
    elif error == "RetryError":
        from tenacity import RetryError, Retrying, stop_after_attempt

        def fail():
            raise ConnectionError("Couldn't reach 'lmms-lab/GQA' on the Hub (LocalEntryNotFoundError)")

        with pytest.raises(RetryError) as caught:
            Retrying(stop=stop_after_attempt(2))(fail)
        error = caught.value
    found, message = describe(error)
    assert found == kind and line in message and "\n" not in message, message


# ---------------------------------------------------------------------------------------- tracebacks on demand


def test_debug_flag_and_environment_variable_show_the_traceback(tmp_path, run_cli, monkeypatch):
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
    code, _, err = run_cli(["demo", "--checkpoint", "./missing"])
    assert_clear_error(code, err, "./missing")
    assert "ms-llava --debug demo" in err


def test_a_programming_error_keeps_its_traceback(monkeypatch):
    from ms_llava import demo

    def run_demo(*args, **kwargs):
        raise TypeError("a bug, not a user's mistake")

    monkeypatch.setattr(demo, "run_demo", run_demo)
    with pytest.raises(TypeError, match="a bug"):
        main(["demo"])


def test_an_unreadable_image_is_named(tmp_path, run_cli, tiny_checkpoint):
    (tmp_path / "photo.jpg").write_text("not an image")
    code, _, err = run_cli(["demo", "--checkpoint", str(tiny_checkpoint), "--image", str(tmp_path / "photo.jpg")])
    assert_clear_error(code, err, f"{tmp_path / 'photo.jpg'} is not an image file that PIL can read")


@pytest.mark.parametrize(
    ("module", "arguments"),
    [
        ("ms_llava.training", ["--stage", "finetune", "--data", "data.json", "--output-dir", "out"]),
        ("ms_llava.evaluation", ["--tasks", "pope", "--output", "results.json"]),
    ],
)
def test_the_launcher_forms_go_through_the_boundary(module, arguments, tmp_path, capsys, monkeypatch):
    """`python -m ms_llava.training` / `ms_llava.evaluation` (what `accelerate launch -m` and `torchrun -m` run, here
    by runpy as `python -m` does) handle errors as `ms-llava` does; a leading `--debug` shows the traceback (train's
    own `--debug` is TrainingArguments')."""
    from ms_llava.checkpoints import CheckpointError

    monkeypatch.chdir(tmp_path)
    for argv, expected in (([], SystemExit), (["--debug"], CheckpointError)):
        monkeypatch.setattr(sys, "argv", [module, *argv, "--model", "./my-checkpint", *arguments])
        with pytest.raises(expected) as caught:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        if expected is SystemExit:
            err = capsys.readouterr().err
            assert caught.value.code == 1 and "Traceback" not in err
            assert_clear_error(1, err, f"--model ./my-checkpint: no such folder ({tmp_path / 'my-checkpint'})")


# ------------------------------------------------------------------------------------- nothing a user made lost


def test_tiny_refuses_a_folder_holding_a_checkpoint(tmp_path, run_cli):
    folder = tmp_path / "trained"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "ms_llava"}')
    (folder / "model.safetensors").write_bytes(b"the user's trained weights")
    code, _, err = run_cli(["tiny", str(folder)])
    assert_clear_error(code, err, f"{folder} already holds a checkpoint", "--overwrite")
    assert (folder / "model.safetensors").read_bytes() == b"the user's trained weights"


def test_tiny_writes_next_to_other_files_without_overwrite(tmp_path, run_cli):
    folder = tmp_path / "notes-only"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    code, out, _ = run_cli(["tiny", str(folder)])
    assert code == 0 and f"wrote {folder}" in out
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "model.safetensors").is_file()


def test_tiny_refuses_to_overwrite_a_users_file_of_a_checkpoint_name_without_overwrite(tmp_path, run_cli):
    folder = tmp_path / "tokenizer-only"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("the user's tokenizer")
    code, _, err = run_cli(["tiny", str(folder)])
    assert_clear_error(code, err, f"{folder} already has tokenizer.json, which this would overwrite", "--overwrite")
    assert (folder / "tokenizer.json").read_text() == "the user's tokenizer"
    assert sorted(path.name for path in folder.iterdir()) == ["tokenizer.json"]
    assert not list(tmp_path.glob(".tokenizer-only.*"))


def test_tiny_overwrite_replaces_only_checkpoint_files_and_lists_what_it_removes(tmp_path, run_cli):
    folder = tmp_path / "trained"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "ms_llava"}')
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (folder / shard).write_bytes(b"old shard")
    (folder / "model.safetensors.index.json").write_text("{}")
    (folder / "notes.txt").write_text("what I tried")
    (folder / "logs").mkdir()
    (folder / "logs" / "run.txt").write_text("log")
    code, out, _ = run_cli(["tiny", str(folder), "--overwrite"])
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


@pytest.mark.slow  # two conversions
def test_convert_overwrite_keeps_the_users_notes_and_lists_what_it_removes(tmp_path, run_cli):
    source = save_llava(tmp_path / "llava")
    output = tmp_path / "ms-llava"
    args = ["convert", "llava-to-ms-llava", "--source", str(source), "--output", str(output), "--num-queries", "16"]
    assert run_cli(args)[0] == 0
    (output / "notes.txt").write_text("lr 2e-5 worked best")
    (output / "model-00009-of-00009.safetensors").write_bytes(b"stale shard of an earlier conversion")
    code, out, err = run_cli([*args, "--overwrite"])
    assert code == 0, err
    assert f"replacing the checkpoint in {output}: " in out
    assert "removed (not part of the new checkpoint): model-00009-of-00009.safetensors" in out
    assert "kept: notes.txt" in out
    assert (output / "notes.txt").read_text() == "lr 2e-5 worked best"
    assert not (output / "model-00009-of-00009.safetensors").exists() and (output / "model.safetensors").is_file()


def test_a_hub_id_is_downloaded_once_and_used(tmp_path, run_cli, hub, tiny_dir, image, monkeypatch):
    """A bare name that is on the Hub (the loopback one): the resolver downloads its snapshot and the command runs on
    it; a local folder of the same name would have been taken first."""
    from ms_llava.hub import push_to_hub

    push_to_hub(tiny_dir, "me/tiny-cli")
    monkeypatch.chdir(tmp_path)
    image.save(tmp_path / "photo.png")
    args = ["visualize", "--checkpoint", "me/tiny-cli", "--image", "photo.png", "--output", str(tmp_path / "v.png")]
    code, out, err = run_cli(args)
    assert code == 0, err
    assert "checkpoint: " in out and "me--tiny-cli" in out and (tmp_path / "v.png").is_file()
