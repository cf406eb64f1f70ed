"""Evaluation through lmms-eval (docs/evaluation.md): the lmms-eval model `ms_llava` (`lmms_model.MSLlavaLMMS`, found
through lmms-eval's entry point group `lmms_eval.models`, which pyproject.toml points at `lmms_eval_models`), and
`ms-llava eval`: `evaluate` runs lmms-eval's `simple_evaluate` with it, `results_record` writes its results as the
record `ms-llava push --results` reads (`RESULTS_FORMAT`: per task and metric, the data's source, the samples scored,
`--limit`). Importing this package does not import lmms-eval (an optional install).
"""

from __future__ import annotations

import argparse
import json
import math
from datetime import datetime, timezone
from pathlib import Path

RESULTS_FORMAT = "ms-llava-eval-results/1"
LOCAL_DATA_HINT = "without network, evaluate a local copy of the data (docs/evaluation.md, 'Local data')"
# The paper's ten benchmarks (Table 1) as lmms-eval 0.7.3 names them: task -> (Table 1 column, lmms-eval's metric,
# scale to the paper's units). VQAv2's test-dev and MMBench's test are scored by their submission servers (lmms-eval's
# vqav2_test / mmbench_en_test report only a `submission` metric), so the val / dev splits stand here, named so. MM-Vet
# is scored by a GPT judge (lmms-eval's llm_judge; an API key).
PAPER_BENCHMARKS = {
    "textvqa_val": ("VQA^T", "exact_match", 100),
    "pope": ("POPE", "pope_f1_score", 100),
    "vqav2_val": ("VQA^v2 (val)", "exact_match", 100),
    "scienceqa_img": ("SQA", "exact_match", 100),
    "mmvet": ("MM-Vet", "gpt_eval_score", 1),
    "gqa": ("GQA", "exact_match", 100),
    "mme": ("MME^P", "mme_perception_score", 1),
    "mmbench_en_dev": ("MMB (dev)", "gpt_eval_score", 1),
    "seedbench": ("Seed^I", "seed_image", 100),
    "mmstar": ("MMStar", "average", 100),
}
# A local copy of a benchmark is a task YAML `<task>_local` (lmms-eval's own tasks shadow a reused name): scored as the
# benchmark, never named so.
LOCAL_SUFFIX = "_local"


def lmms_eval_models():
    """The `lmms_eval.models` entry point's payload: lmms-eval's manifest of `ms_llava` (its "simple" API)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="ms_llava", simple_class_path="ms_llava.evaluation.lmms_model.MSLlavaLMMS")


def check_tasks(tasks: list[str], manager) -> None:
    """Refuses (`ValueError`) task names the `TaskManager` does not know, with the closest known names."""
    import difflib

    if not tasks:
        raise ValueError("no task given (--tasks pope,gqa,...)")
    hints = []
    for task in (task for task in tasks if task not in manager.all_tasks):
        close = difflib.get_close_matches(task, manager.all_tasks, n=4, cutoff=0.6)
        hints.append(f"{task!r}: did you mean {', '.join(close)}?" if close else repr(task))
    if hints:
        raise ValueError(
            f"unknown lmms-eval task(s): {'; '.join(hints)} (`lmms-eval tasks` lists all {len(manager.all_tasks)}; "
            "local task YAMLs need --include-path)"
        )


def task_sources(tasks: list[str], manager) -> dict[str, dict]:
    """`{task: {"local": path} or {"dataset": hub id, "revision": sha}}` of what `tasks` names. A Hub dataset is asked
    for once now: an unreachable Hub fails in seconds, not after lmms-eval's retries (no revision when offline)."""
    from huggingface_hub import HfApi, constants
    from lmms_eval.utils import load_yaml_config

    from ms_llava_cli import kind_of

    sources, pending = {}, list(tasks)
    while pending:
        name = pending.pop(0)
        entry = manager.task_index[name]
        config = load_yaml_config(entry["yaml_path"], mode="full") if entry["yaml_path"] != -1 else {}
        if entry["type"] != "task":  # a group or a tag: its tasks
            members = entry["task"] if isinstance(entry.get("task"), list) else config.get("task", [])
            pending += [member for member in members if isinstance(member, str)]
            continue
        path, options = str(config.get("dataset_path")), config.get("dataset_kwargs") or {}
        if options.get("load_from_disk") or Path(path).exists():
            sources[name] = {"local": path}
            continue
        sources[name] = {"dataset": path, "revision": options.get("revision")}
        if not constants.HF_HUB_OFFLINE:
            try:
                info = HfApi().dataset_info(path, revision=options.get("revision"), timeout=10)
            except Exception as error:
                if kind_of(error) != "network":
                    raise
                message = f"task {name}: the Hub dataset {path} cannot be reached ({error}); {LOCAL_DATA_HINT}"
                raise ConnectionError(message) from error
            sources[name]["revision"] = info.sha
    return sources


def evaluate(model, tasks: list[str], include_path=None, limit=None, log_samples=False, **model_args) -> tuple:
    """lmms-eval's `simple_evaluate` with `MSLlavaLMMS(model, **model_args)`: its results (`{}` on a process but the
    first), the doc ids per task of samples without a readable image (from every process), and `task_sources`."""
    import torch.distributed as dist
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from .lmms_model import MSLlavaLMMS

    manager = TaskManager(include_path=include_path)
    check_tasks(tasks, manager)
    sources = task_sources(tasks, manager)
    lm = MSLlavaLMMS(str(model), **model_args)
    print(lm.summary, flush=True)  # which classes run where (lmms-eval's INFO log is off outside its command line)
    # as lmms-eval's command line decides it: a process group already up (torchrun) -> its collectives
    backend = "torchrun" if dist.is_available() and dist.is_initialized() else "accelerate"
    options = {"limit": limit, "log_samples": log_samples, "task_manager": manager, "batch_size": lm.batch_size}
    results = simple_evaluate(model=lm, distributed_executor_backend=backend, tasks=list(tasks), **options)
    parts = [dict(lm.unreadable)]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:  # each process read its share
        parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(dict(lm.unreadable), parts, dst=0)
    unreadable = {}
    for task, doc_ids in ((task, ids) for part in parts or [] for task, ids in part.items()):
        unreadable[task] = sorted(unreadable.get(task, []) + doc_ids)
    return results or {}, unreadable, sources


def results_record(results: dict, unreadable: dict, sources: dict, limit: int | None, model: str) -> dict:
    """The results record of lmms-eval's `results`: a row per paper benchmark task (its metric, in the paper's units)
    and per metric of any other task; `benchmark` names the paper's column only for the official task run in full on
    Hub data. Refuses (`ValueError`) a run in which a task scored no sample, or no number was reported."""
    from importlib.metadata import version

    samples = {task: n["effective"] for task, n in results.get("n-samples", {}).items()}
    counts = {task: n - len(unreadable.get(task, [])) for task, n in samples.items()}
    empty = [
        f"{task} (none of its {samples[task]} samples had a readable image)" for task in samples if counts[task] <= 0
    ]
    if empty:
        raise ValueError(f"nothing was scored for task(s) {', '.join(empty)}; no results file written")
    rows = []
    for task, metrics in results["results"].items():
        values = {key.split(",")[0]: value for key, value in metrics.items() if "," in key and "_stderr" not in key}
        values = {
            key: value
            for key, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        }
        column, metric, scale = PAPER_BENCHMARKS.get(task.removesuffix(LOCAL_SUFFIX), (None, None, 1))
        if column is not None:
            values = {metric: values[metric]} if metric in values else {}
        official = task in PAPER_BENCHMARKS and limit is None and "dataset" in sources.get(task, {})
        about = {
            "benchmark": column if official else None,
            "source": sources.get(task, {}),
            "num_samples": counts.get(task, 0),
            "unreadable_samples": len(unreadable.get(task, [])),
            "limit": limit,
        }
        for name, value in values.items():
            rows.append({"task": task, "metric": name, "score": round(float(value) * scale, 4), **about})
    if not rows:
        raise ValueError(
            f"lmms-eval reported no numeric metric for tasks {sorted(results['results'])}: submission-only tasks "
            "(vqav2_test, mmbench_en_test) are scored by their servers from the file lmms-eval writes; "
            "--lmms-eval-output FILE keeps lmms-eval's whole results"
        )
    record = {"format": RESULTS_FORMAT, "model": model, "lmms_eval_version": version("lmms_eval")}
    return {**record, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rows": rows}


def logged_samples(results: dict, unreadable: dict) -> list[dict]:
    """Each sample lmms-eval logged, as `--log-samples` writes it: task, doc id, prompt, answer, target, its scores
    (the task's metrics for this sample) and whether its image was unreadable."""
    lines = []
    for task, samples in results.get("samples", {}).items():
        metrics = [item["metric"] for item in results["configs"].get(task, {}).get("metric_list", [])]
        lines += [
            {
                "task": task,
                "doc_id": sample["doc_id"],
                "prompt": (sample["arguments"] or [None])[0],
                "answer": sample["filtered_resps"][0],
                "target": sample["target"],
                "scores": {metric: sample[metric] for metric in metrics if metric in sample},
                "unreadable": sample["doc_id"] in unreadable.get(task, []),
            }
            for sample in samples
        ]
    return lines


def run(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from ..checkpoints import resolve_checkpoint
    from ..outputs import check_writable, writing

    names = ("output", "log_samples", "lmms_eval_output")
    outputs = {name: Path(getattr(args, name)) for name in names if getattr(args, name)}
    for path in outputs.values():
        check_writable(path.parent)  # before the model loads
    results, unreadable, sources = evaluate(
        resolve_checkpoint(args.model, "--model", processor=True),
        [task.strip() for task in args.tasks.split(",") if task.strip()],
        include_path=args.include_path,
        limit=args.limit,
        log_samples=bool(args.log_samples),
        **{name: getattr(args, name) for name in ("trust_remote_code", "dtype", "device", "batch_size")},
    )
    if dist.is_available() and dist.is_initialized():  # under torchrun: no collective comes after evaluate's gather
        dist.destroy_process_group()  # a process that exits with its gloo group alive can abort ("terminate called")
    if not results:  # not the first process
        return 0

    def write(name: str, text: str) -> None:
        with writing(outputs[name].parent):
            outputs[name].parent.mkdir(parents=True, exist_ok=True)
            outputs[name].write_text(text, encoding="utf-8")

    if args.log_samples:  # written even when nothing was scored: what was tried, to see why
        lines = logged_samples(results, unreadable)
        write("log_samples", "".join(json.dumps(line, default=str) + "\n" for line in lines))
    if args.lmms_eval_output:  # written even when no row can be made (submission-only tasks)
        write("lmms_eval_output", json.dumps(results["results"], indent=2, default=str))
    record = results_record(results, unreadable, sources, args.limit, str(args.model))
    write("output", json.dumps(record, indent=2) + "\n")
    for row in record["rows"]:
        unread = f", {row['unreadable_samples']} unreadable (answered empty)" if row["unreadable_samples"] else ""
        where = ", ".join(f"{key} {value}" for key, value in row["source"].items())
        label = f"{row['benchmark'] or row['task']} {row['metric']}"
        print(f"{label}: {row['score']:g} ({row['num_samples']} samples{unread}; {where})")
    print(f"wrote {args.output} (ms-llava push DIR REPO_ID --results {args.output})")
    return 0
