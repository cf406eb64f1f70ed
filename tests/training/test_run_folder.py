"""What a run does with its output folder and what it leaves there: one run owns the folder (a second refuses naming
the holder; a killed holder's lock is taken over), the folder is checked before the model loads, a full disk names
it, and the training record states what ran, stage by stage. Also the data-loader worker default and no library
warning on a LoRA run."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from unittest import mock

import pytest
import transformers.modeling_utils

from ms_llava.outputs import LOCK_FILE
from ms_llava.training import adapters
from ms_llava.training.arguments import MSLlavaTrainingArguments, default_num_workers

pytestmark = pytest.mark.usefixtures("one_thread")
STAGE_KEYS = {
    "stage",
    "base_model",
    "data",
    "num_examples",
    "skipped_records",
    "trained",
    "frozen",
    "adapter",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_ratio",
    "weight_decay",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "world_size",
    "global_batch_size",
    "num_train_epochs",
    "max_steps",
    "steps_run",
    "bf16",
    "seed",
    "completed",
}


def arguments(tiny_dir, shapes, output_dir, *extra) -> list:
    common = ["--stage", "finetune", "--model", tiny_dir, "--data", shapes["qa8"], "--image-folder", shapes["images"]]
    return [*common, "--output-dir", output_dir, "--global-batch-size", "4", "--num-workers", "0", *extra]


@pytest.mark.slow  # one training subprocess
def test_one_run_owns_its_output_folder_and_a_killed_runs_lock_is_taken_over(
    tiny_dir, shapes, tmp_path, run_train, caplog
):
    output_dir = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "ms_llava.training",
        *arguments(tiny_dir, shapes, output_dir, "--max-steps", "100000"),
    ]
    holder = subprocess.Popen(list(map(str, command)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (output_dir / LOCK_FILE).is_file() or not (output_dir / LOCK_FILE).read_text():
            assert holder.poll() is None and time.monotonic() < deadline, "the first run did not take its folder"
            time.sleep(0.2)
        with mock.patch("ms_llava.training.trainer.load_model", side_effect=AssertionError("the model was loaded")):
            status, _, err = run_train(arguments(tiny_dir, shapes, output_dir, "--max-steps", "1"))
        first_line = err.splitlines()[0]
        assert status != 0 and first_line.startswith(f"ms-llava train: error: {output_dir} is in use by "), err
        assert f"(process {holder.pid} on " in first_line and "--max-steps 100000" in first_line
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert holder.returncode == -signal.SIGKILL
    status, out, err = run_train(arguments(tiny_dir, shapes, output_dir, "--max-steps", "1"))
    assert status == 0 and "trained finetune: 1 steps" in out, err
    assert f"{output_dir}: taking over the lock left by a run that ended" in caplog.text


def test_the_output_folder_is_checked_before_the_model_loads(tiny_dir, shapes, tmp_path, run_train, monkeypatch):
    """An existing folder that cannot be written, a path under a file, too little free space: one error line naming
    the folder, before the model (or the data) load, and the folder as it was."""
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("the user's")
    (tmp_path / "a-file").write_text("")
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: path != existing and access(path, mode))  # as chmod 555
    real_usage = shutil.disk_usage
    with mock.patch("ms_llava.training.trainer.load_model", side_effect=AssertionError("the model was loaded")):
        status, _, err = run_train(arguments(tiny_dir, shapes, existing, "--max-steps", "1"))
        assert status != 0 and f"cannot write into {existing}: permission denied" in err
        assert sorted(path.name for path in existing.iterdir()) == ["notes.txt"]
        status, _, err = run_train(arguments(tiny_dir, shapes, tmp_path / "a-file" / "out", "--max-steps", "1"))
        assert status != 0 and f"{tmp_path / 'a-file'} is a file, so {tmp_path / 'a-file' / 'out'} cannot be" in err
        monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=1000))
        status, _, err = run_train(arguments(tiny_dir, shapes, tmp_path / "new", "--max-steps", "1"))
        assert status != 0 and f"{tmp_path} has 0.00 GiB free, " in err and " GiB are needed" in err
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_a_full_disk_during_a_save_names_the_output_folder(tiny_dir, shapes, tmp_path, run_train, monkeypatch):
    """The weights' write fails with ENOSPC (as a full disk makes it): the one error line says so and names the
    output folder being written, not the --model folder that was only read."""

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    output_dir = tmp_path / "out"
    status, _, err = run_train(arguments(tiny_dir, shapes, output_dir, "--max-steps", "1"))
    prefix = "ms-llava train: error: "  # a progress bar may end on the same line
    (line,) = [line[line.index(prefix) :] for line in err.splitlines() if prefix in line]
    assert status != 0 and f"cannot write {output_dir}: no space left on the device" in line
    assert str(tiny_dir) not in err


@pytest.mark.slow
def test_the_training_record_states_what_ran_stage_by_stage(tiny_dir, shapes, tmp_path, run_train):
    """`ms_llava_training.json`: a `stages` list, oldest first; stage 2's record carries stage 1's from its --model
    folder, and each stage says what trained and how."""
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    pretrain = arguments(tiny_dir, shapes, stage1, "--max-steps", "1", "--learning-rate", "1e-2")
    assert run_train([*pretrain[:1], "pretrain", *pretrain[2:]])[0] == 0
    assert run_train(arguments(stage1, shapes, stage2, "--max-steps", "2", "--lora", "--lora-r", "4"))[0] == 0
    first = json.loads((stage1 / "ms_llava_training.json").read_text())["stages"]
    stages = json.loads((stage2 / "ms_llava_training.json").read_text())["stages"]
    assert len(first) == 1 and stages[0] == first[0] and len(stages) == 2
    assert all(STAGE_KEYS <= set(stage) for stage in stages)
    assert (stages[0]["stage"], stages[0]["base_model"], stages[0]["learning_rate"]) == (
        "pretrain",
        str(tiny_dir),
        1e-2,
    )
    assert stages[0]["trained"] == ["model.multi_modal_projector"] and stages[0]["adapter"] is None
    assert stages[0]["frozen"] == ["lm_head", "model.language_model", "model.vision_tower"]
    assert (stages[1]["stage"], stages[1]["base_model"], stages[1]["data"]) == (
        "finetune",
        str(stage1),
        str(shapes["qa8"]),
    )
    assert stages[1]["trained"] == ["model.language_model", "model.multi_modal_projector"]
    assert stages[1]["adapter"]["type"] == "lora" and stages[1]["adapter"]["r"] == 4
    assert (stages[1]["num_examples"], stages[1]["skipped_records"], stages[1]["learning_rate"]) == (8, 0, 2e-4)
    assert (stages[1]["global_batch_size"], stages[1]["world_size"], stages[1]["per_device_train_batch_size"]) == (
        4,
        1,
        4,
    )
    assert (stages[1]["max_steps"], stages[1]["steps_run"], stages[1]["completed"]) == (2, 2, True)


def test_data_loader_workers_follow_the_data_size_and_the_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    assert default_num_workers(40, 8) == 0  # 5 steps an epoch: starting the workers each epoch costs more
    assert default_num_workers(96, 8) == 1  # two cores: one loads while the other trains
    assert default_num_workers(1_000_000, 8, processes_here=2) == 0  # one core per process
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert default_num_workers(1_000_000, 8) == 4 and default_num_workers(1_000_000, 8, processes_here=8) == 4
    assert default_num_workers(1_000_000, 8, processes_here=32) == 1
    assert MSLlavaTrainingArguments.for_stage("finetune").auto_num_workers
    given = MSLlavaTrainingArguments.for_stage("finetune", dataloader_num_workers=0)
    assert not given.auto_num_workers and given.dataloader_num_workers == 0


def test_a_lora_run_warns_of_nothing_the_user_cannot_act_on(tiny_dir):
    """peft 0.21 reads `is_gradient_checkpointing`, which transformers >= 5.23 deprecates with a FutureWarning."""
    config = MSLlavaTrainingArguments.for_stage("finetune", lora=True, lora_r=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model = adapters.configure_trainable(adapters.load_model(str(tiny_dir), config), config)
    assert model.peft_config["default"].r == 4
