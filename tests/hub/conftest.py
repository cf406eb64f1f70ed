import json

import pytest

# A training record in the format `ms-llava train` writes (the brief's `ms_llava_training.json`): a tiny run, not the
# paper's recipe.
TRAINING_RECORD = {
    "stages": [
        {
            "stage": "pretrain",
            "base_model": "runs/composed",
            "data": "shapes/caption-0.json",
            "num_examples": 40,
            "skipped_records": 2,
            "trained": ["model.multi_modal_projector"],
            "frozen": ["model.vision_tower", "model.language_model", "lm_head"],
            "adapter": None,
            "learning_rate": 3e-3,
            "lr_scheduler_type": "cosine",
            "warmup_ratio": 0.1,
            "weight_decay": 0.0,
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 2,
            "world_size": 1,
            "global_batch_size": 8,
            "num_train_epochs": 2.0,
            "max_steps": 10,
            "steps_run": 10,
            "bf16": False,
            "seed": 42,
            "completed": True,
        }
    ]
}
# An `ms-llava eval --output` results record: the official POPE run in full, a --limit run, a local copy.
RESULTS_RECORD = {
    "format": "ms-llava-eval-results/1",
    "model": "runs/stage2",
    "lmms_eval_version": "0.7.3",
    "date": "2026-12-01",
    "rows": [
        {
            "task": "pope",
            "metric": "pope_accuracy",
            "score": 85.2,
            "benchmark": "POPE",
            "source": {"dataset": "lmms-lab/POPE", "revision": "abc123"},
            "num_samples": 9000,
            "unreadable_samples": 0,
            "limit": None,
        },
        {
            "task": "gqa",
            "metric": "exact_match",
            "score": 50.0,
            "benchmark": None,
            "source": {"dataset": "lmms-lab/GQA", "revision": None},
            "num_samples": 4,
            "unreadable_samples": 0,
            "limit": 4,
        },
        {
            "task": "pope_local",
            "metric": "pope_accuracy",
            "score": 62.5,
            "benchmark": None,
            "source": {"local": "/data/pope-24"},
            "num_samples": 24,
            "unreadable_samples": 1,
            "limit": None,
        },
    ],
}


@pytest.fixture
def training_record():
    return json.loads(json.dumps(TRAINING_RECORD))


@pytest.fixture
def recorded_run(tiny_dir, tmp_path):
    """A copy of the tiny checkpoint with a training record, and an evaluation results file next to it."""
    import shutil

    folder = shutil.copytree(tiny_dir, tmp_path / "run")
    (folder / "ms_llava_training.json").write_text(json.dumps(TRAINING_RECORD), encoding="utf-8")
    (tmp_path / "results.json").write_text(json.dumps(RESULTS_RECORD), encoding="utf-8")
    return folder, tmp_path / "results.json"
