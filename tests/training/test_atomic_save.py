"""The final save of `train` is atomic (issue 18): Ctrl-C (or a kill) at any point of it leaves the output folder with
either the previous complete state or the complete new one, never a truncated file; a kill while the files are moved
in is completed by the next run (`recover_final_save`).

The interrupts are real signals: `Interrupter` counts the points where a save writes (a file opened for writing, the
weights file created, a file renamed into place) under a folder and, at the k-th, sends the process SIGINT (what
Ctrl-C sends; Python raises KeyboardInterrupt unless the handler is deferred) or SIGKILL (in a forked child). Before,
Ctrl-C at the first point left a 0-byte config.json in the output folder.
"""

import builtins
import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers.modeling_utils
from transformers import AutoModelForImageTextToText, TrainerCallback, TrainerState

from ms_llava.testing_utils import build_tiny_checkpoint, build_tiny_processor, build_tiny_tokenizer
from ms_llava.training.trainer import (
    FINAL_SAVE_STAGING,
    STAGED_COMPLETE,
    recover_final_save,
    save_final_model,
    train,
)

RUN = {"dataloader_num_workers": 0, "warmup_ratio": 0.1, "global_batch_size": 4, "save_steps": 1, "max_steps": 2}
pytestmark = pytest.mark.usefixtures("one_thread")
FINAL_FILES = ("config.json", "model.safetensors", "trainer_state.json", "processor_config.json", "tokenizer.json")


class Interrupter:
    """While armed, counts the write points under `folder` and sends `signal_number` to this process at point
    `at` (1-based); `at=None` only counts. A point: a file under `folder` opened for writing (the signal comes once it
    is created, empty), the weights file created (likewise, before safetensors writes it) and a rename whose target
    is under `folder` (the signal comes before it)."""

    def __init__(self, folder: Path, at: int | None, signal_number: int = signal.SIGINT):
        self.folder, self.at, self.signal_number = Path(folder).resolve(), at, signal_number
        self.count, self.armed = 0, False
        self.points: list[str] = []

    def _point(self, what: str, path) -> None:
        if not self.armed:
            return
        try:
            inside = Path(os.fspath(path)).resolve().is_relative_to(self.folder)
        except TypeError:  # a file descriptor, not a path
            inside = False
        if not inside:
            return
        self.count += 1
        self.points.append(f"{what} {Path(os.fspath(path)).relative_to(self.folder)}")
        if self.count == self.at:
            signal.raise_signal(self.signal_number)

    def install(self, monkeypatch) -> "Interrupter":
        real_open, real_replace = builtins.open, os.replace
        real_save_file = transformers.modeling_utils.safe_save_file

        def open_(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            if any(flag in mode for flag in "wax+"):
                try:
                    self._point("write", file)
                except BaseException:
                    handle.close()
                    raise
            return handle

        def replace(source, target, *args, **kwargs):
            self._point("rename to", target)
            return real_replace(source, target, *args, **kwargs)

        def save_file(tensors, filename, *args, **kwargs):
            with real_open(filename, "wb"):
                pass
            self._point("write", filename)
            return real_save_file(tensors, filename, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)
        return self


class ArmAtTrainEnd(TrainerCallback):
    """Arms an `Interrupter` when training ends: the final save comes next."""

    def __init__(self, interrupter: Interrupter):
        self.interrupter = interrupter

    def on_train_end(self, args, state, control, **kwargs):
        self.interrupter.armed = True


@pytest.fixture
def final_state(folder_contents):
    def final_state(folder: Path) -> dict[str, bytes | None]:
        """The folder's contents without the checkpoints (which the final save does not touch)."""
        return {name: data for name, data in folder_contents(folder).items() if not name.startswith("checkpoint-")}

    return final_state


# --------------------------------------------------------------------------------------------- save_final_model


class SavingTrainer:
    """What `save_final_model` uses of a `Trainer`: `save_model(folder)` (model and processor) and `state`."""

    def __init__(self, model, processor, global_step: int):
        self.model, self.processor, self.state = model, processor, TrainerState(global_step=global_step)

    def save_model(self, folder: str) -> None:
        self.model.save_pretrained(folder)
        self.processor.save_pretrained(folder)


ONE_PROCESS = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)


@pytest.fixture(scope="module")
def two_states():
    """Two savers: the old state (step 1) and a new one (step 2, other weights)."""
    old_model, _ = build_tiny_checkpoint(seed=0)
    new_model, _ = build_tiny_checkpoint(seed=1)
    processor = build_tiny_processor(old_model.config, build_tiny_tokenizer())
    return SavingTrainer(old_model, processor, 1), SavingTrainer(new_model, processor, 2)


@pytest.mark.slow
def test_ctrl_c_at_every_point_of_the_final_save_leaves_the_old_or_the_new_state(
    two_states, tmp_path, monkeypatch, folder_contents
):
    old, new = two_states
    references = {}
    for name, trainer in (("old", old), ("new", new)):
        save_final_model(trainer, tmp_path / name, ONE_PROCESS)
        (tmp_path / name / "notes.txt").write_text("the user's own file")
        references[name] = folder_contents(tmp_path / name)
    assert references["old"] != references["new"]
    assert {*FINAL_FILES, "notes.txt"} <= set(references["old"]) and FINAL_SAVE_STAGING not in references["old"]

    counting = Interrupter(tmp_path / "count", at=None).install(monkeypatch)
    save_final_model(old, tmp_path / "count", ONE_PROCESS)
    counting.armed = True
    save_final_model(new, tmp_path / "count", ONE_PROCESS)
    points = counting.points
    assert any(point.startswith("write .ms_llava_final_save/") for point in points)
    assert any(point == "rename to model.safetensors" for point in points), points
    monkeypatch.undo()

    outcomes = []
    for at in range(1, len(points) + 1):
        folder = tmp_path / f"at-{at}"
        save_final_model(old, folder, ONE_PROCESS)
        (folder / "notes.txt").write_text("the user's own file")
        interrupter = Interrupter(folder, at).install(monkeypatch)
        interrupter.armed = True
        try:
            save_final_model(new, folder, ONE_PROCESS)
            interrupted = False
        except KeyboardInterrupt:
            interrupted = True
        finally:
            monkeypatch.undo()
        contents = folder_contents(folder)
        state = "old" if contents == references["old"] else "new" if contents == references["new"] else None
        assert state is not None, f"Ctrl-C at {points[at - 1]!r} left neither state: {sorted(contents)}"
        # Ctrl-C while the files are moved in takes effect once they are all in
        assert interrupted, f"Ctrl-C at {points[at - 1]!r} was lost"
        outcomes.append(state)
        if at in (1, len(points)):
            loaded = AutoModelForImageTextToText.from_pretrained(folder)
            expected = (old if state == "old" else new).model
            torch.testing.assert_close(loaded.state_dict(), expected.state_dict(), rtol=0, atol=0)
    # interrupted while written: the old state; while moved in: the complete new one
    assert outcomes[0] == "old" and outcomes[-1] == "new" and outcomes == sorted(outcomes, key=["old", "new"].index)


def test_a_kill_while_the_files_move_in_is_completed_by_the_next_run(
    two_states, tmp_path, monkeypatch, folder_contents
):
    """A kill (no handler runs) between two renames: the folder holds new and old files, the staged save marked
    complete; `recover_final_save` (which the next `train` runs) moves the rest in. A staged save that is not marked
    complete (killed while written) is removed, leaving the old state."""
    old, new = two_states
    save_final_model(new, tmp_path / "new", ONE_PROCESS)
    save_final_model(old, tmp_path / "out", ONE_PROCESS)
    real_replace, renames = os.replace, []

    def killed_after_two(source, target):
        if len(renames) == 2:
            raise SystemExit("killed")  # stands in for SIGKILL: nothing after it runs
        renames.append(target)
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", killed_after_two)
    with pytest.raises(SystemExit):
        save_final_model(new, tmp_path / "out", ONE_PROCESS)
    monkeypatch.undo()
    assert (tmp_path / "out" / FINAL_SAVE_STAGING / STAGED_COMPLETE).is_file()
    recover_final_save(tmp_path / "out")
    assert folder_contents(tmp_path / "out") == folder_contents(tmp_path / "new")

    staging = tmp_path / "out" / FINAL_SAVE_STAGING
    staging.mkdir()
    (staging / "config.json").write_text("")  # a kill while the staged files were written
    recover_final_save(tmp_path / "out")
    assert folder_contents(tmp_path / "out") == folder_contents(tmp_path / "new")


# --------------------------------------------------------------------------------------------- train


@pytest.fixture(scope="module")
def finished_run(tiny_dir, shapes, tmp_path_factory):
    """A complete two-step run: checkpoint-1, checkpoint-2 and the final model in the output folder."""
    output_dir = tmp_path_factory.mktemp("finished") / "out"
    train(tiny_dir, "finetune", shapes["qa8"], shapes["images"], output_dir, **RUN)
    return output_dir


def rerun_step_2(run: Path, folder: Path) -> None:
    """`folder`: a copy of the finished run whose checkpoint-2 a crash left incomplete, so that `--resume` runs step 2
    again and saves the final model over the old one."""
    import shutil

    shutil.copytree(run, folder)
    (folder / "checkpoint-2" / "trainer_state.json").unlink()


def check_old_or_new(final_state, folder: Path, old: dict[str, bytes | None]) -> str:
    """The final files are the old ones, or a complete new save of the same step-2 weights (only its trainer state and
    training arguments differ: the new run's timings, resume=True): no file truncated, a staging folder left by none,
    the model loads. The training record, saved with the final files, says whether this run completed."""
    now = final_state(folder)
    assert set(now) == set(old), sorted(set(now) ^ set(old))
    differing = sorted(name for name in old if now[name] != old[name] and name != "ms_llava_training.json")
    assert differing in ([], ["trainer_state.json", "training_args.bin"]), differing  # the new run's timings, resume
    state = json.loads(now["trainer_state.json"])
    assert state["global_step"] == 2 and [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2]
    AutoModelForImageTextToText.from_pretrained(folder)
    completed = json.loads(now["ms_llava_training.json"])["stages"][-1]["completed"]
    assert completed == bool(differing), (completed, differing)
    return "old" if not differing else "new"


def final_save_points(tiny_dir: Path, shapes, finished_run: Path, folder: Path, monkeypatch) -> list[str]:
    """The points of `train`'s final save (the writes, then the moves), counted by running step 2 again in `folder`
    (`rerun_step_2`) with an `Interrupter` that interrupts nowhere."""
    counting = Interrupter(folder, None)
    rerun_step_2(finished_run, folder)
    counting.install(monkeypatch)
    resume_step_2(tiny_dir, shapes, folder, counting)
    monkeypatch.undo()
    return counting.points


def resume_step_2(tiny_dir: Path, shapes, folder: Path, interrupter: Interrupter) -> None:
    """`train` resumed in `folder` for its last step, `interrupter` armed when training ends (the final save next)."""
    callbacks = [ArmAtTrainEnd(interrupter)]
    train(tiny_dir, "finetune", shapes["qa8"], shapes["images"], folder, resume=True, callbacks=callbacks, **RUN)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_ctrl_c_during_trains_final_save(tiny_dir, shapes, finished_run, tmp_path, monkeypatch, where, final_state):
    """Ctrl-C during `train`'s final save leaves the previous final model, or the new complete one (before: a 0-byte
    config.json at the first point)."""
    old = final_state(finished_run)
    assert set(FINAL_FILES) <= set(old)
    points = final_save_points(tiny_dir, shapes, finished_run, tmp_path / "count", monkeypatch)
    at = {"first": 1, "middle": len(points) // 2, "last": len(points)}[where]

    folder = tmp_path / "out"
    rerun_step_2(finished_run, folder)
    interrupter = Interrupter(folder, at).install(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        resume_step_2(tiny_dir, shapes, folder, interrupter)
    monkeypatch.undo()
    outcome = check_old_or_new(final_state, folder, old)
    assert outcome == ("new" if points[at - 1].startswith("rename to") else "old"), points[at - 1]


@pytest.mark.slow
def test_sigkill_during_trains_final_save_then_the_next_run(
    tiny_dir, shapes, finished_run, tmp_path, monkeypatch, final_state
):
    """SIGKILL (no handler, no cleanup) at points of the final save, each in a forked child of this process (a sample:
    the first write, one a third in, the last write before the moves, the first, middle and last move): the final
    files are the old ones (killed while the new ones were written into the staging folder) or a mix of complete old
    and new files (killed while they were moved in, the staged save marked complete); never a truncated file. The
    next run's `recover_final_save` then leaves the old state or the complete new one."""
    points = final_save_points(tiny_dir, shapes, finished_run, tmp_path / "count", monkeypatch)
    old = final_state(finished_run)
    moves = [at for at, point in enumerate(points, 1) if point.startswith("rename to")]
    chosen = sorted({1, len(points) // 3, moves[0] - 1, moves[0], moves[len(moves) // 2], moves[-1]})
    rolled_forward = []
    for at in chosen:
        folder = tmp_path / f"kill-{at}"
        rerun_step_2(finished_run, folder)
        child = os.fork()
        if child == 0:  # the resumed run, killed at point `at`; nothing of pytest's runs in the child after it
            try:
                resume_step_2(tiny_dir, shapes, folder, Interrupter(folder, at, signal.SIGKILL).install(monkeypatch))
            finally:
                os._exit(1)  # not killed
        _, status = os.waitpid(child, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"at {points[at - 1]!r}: {status}"
        staging = folder / FINAL_SAVE_STAGING
        for name in old:
            if (folder / name).is_file():
                assert (folder / name).stat().st_size > 0, f"killed at {points[at - 1]!r}: {name} empty"
        if (staging / STAGED_COMPLETE).is_file():
            rolled_forward.append(at)
        recover_final_save(folder)
        assert not staging.exists()
        assert check_old_or_new(final_state, folder, old) == ("new" if at in rolled_forward else "old"), points[at - 1]
    assert rolled_forward == [at for at in chosen if at in moves], (rolled_forward, points)
