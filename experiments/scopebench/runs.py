"""The ScopeBench runs: the variants of the projector table, the shared warm-up, and one run (a fresh projector
trained through the recipe's two stages, then scored), written to ``RUNS/results/<run>.json``."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from . import generator as sb

# The recipe's settings overridden for a tiny model trained from a random start in minutes (the paper's lrs, 1e-3 /
# 2e-5, and one epoch of 558K / 665K examples move nothing here). Everything else is the training options' default.
WARMUP = {"learning_rate": 3e-3, "global_batch_size": 16, "num_train_epochs": 2, "warmup_ratio": 0.05}
STAGES = {
    "pretrain": {"learning_rate": 3e-3, "global_batch_size": 16, "max_steps": 50, "warmup_ratio": 0.1},
    "finetune": {"learning_rate": 3e-3, "global_batch_size": 16, "max_steps": 500, "warmup_ratio": 0.05},
}
# The vision tower is frozen in both stages: its features are computed once per image of each run
# (ms_llava.training.feature_cache; the losses are the same as without the cache).
COMMON = {
    "dataloader_num_workers": 0,
    "save_steps": 100000,
    "logging_steps": 10,
    "save_total_limit": 1,
    "cache_vision_features": True,
}
BUDGETS = (144, 64, 36)
ABLATION_M = 64


def variants() -> list[dict]:
    """Every row of the table: `{"name", "M", "kind", "resampler"}` (kind "mlp" or "ms")."""
    rows = [{"name": "mlp", "M": 576, "kind": "mlp", "resampler": None, "group": "main"}]
    for m in BUDGETS:
        specs = [("vanilla", {"scope_windows": [24], "scope_bias_strength": 0.0})]
        specs += [(f"e1-k{k}", {"scope_windows": [k]}) for k in (2, 6, 12, 24)]
        specs += [("e3-2-6-14", {"scope_windows": [2, 6, 14]}), ("e3-2-6-24", {"scope_windows": [2, 6, 24]})]
        for name, resampler in specs:
            rows.append({"name": f"{name}-m{m}", "M": m, "kind": "ms", "resampler": resampler, "group": "main"})
    for beta in (0.0, 1.0, 2.5, 10.0):  # beta = 5 is the main row e3-2-6-14
        rows.append(
            {
                "name": f"e3-2-6-14-beta{beta:g}-m{ABLATION_M}",
                "M": ABLATION_M,
                "kind": "ms",
                "resampler": {"scope_windows": [2, 6, 14], "scope_bias_strength": beta},
                "group": "beta",
            }
        )
    for fusion in ("mean", "attention", "concat_mlp"):  # channel_mlp is the main row
        rows.append(
            {
                "name": f"e3-2-6-14-{fusion}-m{ABLATION_M}",
                "M": ABLATION_M,
                "kind": "ms",
                "resampler": {"scope_windows": [2, 6, 14], "fusion": fusion},
                "group": "fusion",
            }
        )
    for row in rows:
        if row["resampler"] is not None:
            row["resampler"] = {"num_queries": row["M"], **row["resampler"]}
    return rows


def run_plan(seeds: list[int], extra_seed_names: list[str] | None = None, extra_seed: int | None = None):
    """(variant, seed) pairs: E = 3 rows first (the default checkpoint comes from them), then the rest."""
    plan = [(v, s) for s in seeds for v in variants()]
    if extra_seed is not None:
        plan += [(v, extra_seed) for v in variants() if v["name"] in (extra_seed_names or [])]
    return sorted(plan, key=lambda p: (p[1] not in seeds[:1], not p[0]["name"].startswith("e3-2-6-14-m"), p[1]))


# --------------------------------------------------------------------------------------------- steps


def _train(*args, **kwargs):
    from ms_llava.training import train

    return train(*args, **{**COMMON, **kwargs})


def warm_up(runs: Path, data: Path, log=print) -> Path:
    """Tokenizer + random LM -> text-only warm-up; returns the warmed-up checkpoint's folder (skipped when done)."""
    from .models import build_ms_llava, build_tokenizer

    out = runs / "warmup"
    if (out / "model.safetensors").exists():
        return out
    tokenizer = build_tokenizer()
    model, processor = build_ms_llava(None, None, tokenizer, {"num_queries": 36, "scope_windows": [2]})
    model.save_pretrained(runs / "random")
    processor.save_pretrained(runs / "random")
    result = _train(runs / "random", "finetune", data / "text-train.json", None, out, seed=0, **WARMUP)
    shutil.rmtree(runs / "random")
    log(f"warm-up: {result.global_step} steps, loss {result.train_loss:.4f}, {result.wall_time_s:.1f} s")
    _strip(out)
    return out


def _strip(directory: Path) -> None:
    """Removes Trainer checkpoints and copied remote-code modules from a finished run folder."""
    for path in directory.glob("checkpoint-*"):
        shutil.rmtree(path)
    for path in directory.glob("*_ms_llava.py"):
        path.unlink()


def claim_run(result_path: Path, name: str, log=print) -> Path | None:
    """Creates the run's lock file next to `result_path` and returns it; None when another process holds it (a
    crash leaves it behind: delete it)."""
    result_path.parent.mkdir(parents=True, exist_ok=True)
    lock = result_path.with_suffix(".lock")
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        log(f"{name}: running elsewhere ({lock} exists), skipped")
        return None
    return lock


def build_variant(variant: dict, seed: int, runs: Path):
    """(model, processor) of `variant` with a fresh projector seeded with `seed`, RUNS/encoder's tower and
    RUNS/warmup's language model."""
    from transformers import AutoProcessor

    from .models import build_llava_mlp, build_ms_llava, language_model_from

    tokenizer = AutoProcessor.from_pretrained(runs / "warmup").tokenizer
    lm = language_model_from(runs / "warmup")
    if variant["kind"] == "mlp":
        return build_llava_mlp(runs / "encoder", lm, tokenizer, seed=seed)
    return build_ms_llava(runs / "encoder", lm, tokenizer, variant["resampler"], seed=seed)


def run_identity(variant: dict, seed: int) -> dict:
    """The keys every result file starts with (`aggregate` reads `variant`, `group`, `M`, `seed`)."""
    return {
        "run": f"{variant['name']}-s{seed}",
        "variant": variant["name"],
        "group": variant["group"],
        "M": variant["M"],
        "kind": variant["kind"],
        "resampler": variant["resampler"],
        "seed": seed,
    }


def run_one(variant: dict, seed: int, runs: Path, data: Path, log=print) -> dict:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    name = f"{variant['name']}-s{seed}"
    result_path = runs / "results" / f"{name}.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    lock = claim_run(result_path, name, log)
    if lock is None:
        return None
    started = time.perf_counter()
    folder = runs / "models" / name
    shutil.rmtree(folder, ignore_errors=True)
    model, processor = build_variant(variant, seed, runs)
    model.save_pretrained(folder / "init")
    processor.save_pretrained(folder / "init")
    stage1 = _train(folder / "init", "pretrain", data / "caption-train.json", data / "images", folder / "stage1", seed=seed,
                    **STAGES["pretrain"])  # fmt: skip
    stage2 = _train(folder / "stage1", "finetune", data / "qa-train.json", data / "images", folder / "stage2", seed=seed,
                    **STAGES["finetune"])  # fmt: skip
    shutil.rmtree(folder / "init")
    shutil.rmtree(folder / "stage1")
    _strip(folder / "stage2")
    trained = time.perf_counter() - started
    model = AutoModelForImageTextToText.from_pretrained(folder / "stage2", dtype=torch.float32)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    processor = AutoProcessor.from_pretrained(folder / "stage2")
    result = {
        **run_identity(variant, seed),
        "steps": {stage: STAGES[stage]["max_steps"] for stage in ("pretrain", "finetune")},
        "stages": {stage: dict(STAGES[stage]) for stage in ("pretrain", "finetune")},
        "stage1_loss": round(stage1.train_loss, 4),
        "stage2_loss": round(stage2.train_loss, 4),
        "stage2_last_loss": round(stage2.losses[-1][1], 4) if stage2.losses else None,  # none logged in < 10 steps
        "test": sb.question_type_accuracy(model, processor, data / "qa-test.json"),
    }
    if variant["kind"] == "ms" and len(variant["resampler"]["scope_windows"]) == 3:
        result["val"] = sb.question_type_accuracy(model, processor, data / "qa-val.json")
    result["train_wall_s"] = round(trained, 1)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=1), encoding="utf-8")
    lock.unlink()
    log(f"{name}: test {result['test']['overall']:.3f} ({result['wall_s']:.0f} s)")
    return result


# --------------------------------------------------------------------------------------------- report
