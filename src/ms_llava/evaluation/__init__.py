"""Evaluation through lmms-eval (docs/evaluation.md).

- `lmms_model.MSLlavaLMMS`: the lmms-eval model `ms_llava`, found through lmms-eval's entry point group
  `lmms_eval.models` (pyproject.toml points it at `lmms_eval_models`), so `lmms-eval --model ms_llava
  --model_args pretrained=DIR ...` works once the package is installed.
- `ms-llava eval` (`add_arguments`, `run`): `evaluate` runs lmms-eval's `simple_evaluate` with that model;
  `results_record` turns its results into the results record `ms-llava push --results` reads (format
  `RESULTS_FORMAT`: one row per task and metric, with the data's source, the samples scored and `--limit`).

Importing this package does not import lmms-eval (an optional install); the entry point and `ms-llava eval` do.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

RESULTS_FORMAT = "ms-llava-eval-results/1"
LOCAL_DATA_HINT = "without network, evaluate a local copy of the data (docs/evaluation.md, 'Local data')"


@dataclass(frozen=True)
class PaperBenchmark:
    column: str  # the column of the paper's Table 1
    metric: str  # lmms-eval's metric key for the task
    scale: float  # to the paper's units (x100 where lmms-eval reports a fraction)


# The paper's ten benchmarks (Table 1) as lmms-eval 0.7.3 names them. VQAv2's test-dev and MMBench's test are scored by
# their submission servers: lmms-eval's vqav2_test / mmbench_en_test report only a `submission` metric (it writes the
# file to upload), so they have no row here; the val / dev splits score locally and are named so. MM-Vet is scored by a
# GPT judge (lmms-eval's llm_judge; needs an API key).
PAPER_BENCHMARKS = {
    "textvqa_val": PaperBenchmark("VQA^T", "exact_match", 100),
    "pope": PaperBenchmark("POPE", "pope_f1_score", 100),
    "vqav2_val": PaperBenchmark("VQA^v2 (val)", "exact_match", 100),
    "scienceqa_img": PaperBenchmark("SQA", "exact_match", 100),
    "mmvet": PaperBenchmark("MM-Vet", "gpt_eval_score", 1),
    "gqa": PaperBenchmark("GQA", "exact_match", 100),
    "mme": PaperBenchmark("MME^P", "mme_perception_score", 1),
    "mmbench_en_dev": PaperBenchmark("MMB (dev)", "gpt_eval_score", 1),
    "seedbench": PaperBenchmark("Seed^I", "seed_image", 100),
    "mmstar": PaperBenchmark("MMStar", "average", 100),
}
# A local copy of a benchmark (docs/evaluation.md, "Local data") is a task YAML named `<task>_local`: lmms-eval indexes
# its own tasks first, so a local task cannot reuse the built-in name. It is scored as the benchmark, never named so.
LOCAL_SUFFIX = "_local"


def lmms_eval_models():
    """The payload of the `lmms_eval.models` entry point: lmms-eval's manifest of the `ms_llava` model (its
    "simple" API; lmms-eval imports the class only when the model is asked for)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="ms_llava", simple_class_path="ms_llava.evaluation.lmms_model.MSLlavaLMMS")


def check_tasks(tasks: list[str], manager) -> None:
    """Refuses (`ValueError`) task names the `TaskManager` does not know, with the closest known names."""
    import difflib

    if not tasks:
        raise ValueError("no task given (--tasks pope,gqa,...)")
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        close = {task: difflib.get_close_matches(task, manager.all_tasks, n=4, cutoff=0.6) for task in unknown}
        hints = "; ".join(f"{task!r}: did you mean {', '.join(names)}?" if names else repr(task) for task, names
                          in close.items())  # fmt: skip
        raise ValueError(
            f"unknown lmms-eval task(s): {hints} (`lmms-eval tasks` lists all {len(manager.all_tasks)}; local task "
            "YAMLs need --include-path)"
        )


def task_sources(tasks: list[str], manager) -> dict[str, dict]:
    """`{task: source}` of every task that `tasks` names (groups and tags expanded): `{"local": path}` for data read
    from disk, `{"dataset": hub id, "revision": sha}` for a Hub dataset. A Hub dataset is asked for once, so that an
    unreachable Hub fails now, in seconds, instead of after lmms-eval's retries (revision None under HF_HUB_OFFLINE)."""
    from huggingface_hub import HfApi, constants
    from lmms_eval.utils import load_yaml_config

    from ms_llava_cli import kind_of

    sources, pending = {}, list(tasks)
    while pending:
        name = pending.pop(0)
        entry = manager.task_index[name]
        config = load_yaml_config(entry["yaml_path"], mode="full") if entry["yaml_path"] != -1 else {}
        if entry["type"] != "task":  # a group or a tag: its tasks
            members = entry.get("task") if isinstance(entry.get("task"), list) else config.get("task", [])
            pending += [member for member in members if isinstance(member, str)]
            continue
        path, options = str(config.get("dataset_path")), config.get("dataset_kwargs") or {}
        if options.get("load_from_disk") or Path(path).exists():
            sources[name] = {"local": path}
            continue
        revision = options.get("revision")
        if not constants.HF_HUB_OFFLINE:
            try:
                revision = HfApi().dataset_info(path, revision=revision, timeout=10).sha
            except Exception as error:
                if kind_of(error) != "network":
                    raise
                raise ConnectionError(
                    f"task {name}: the Hub dataset {path} cannot be had ({error}); {LOCAL_DATA_HINT}"
                ) from error
        sources[name] = {"dataset": path, "revision": revision}
    return sources


def evaluate(
    model: str | Path,
    tasks: list[str],
    *,
    include_path: str | list[str] | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    trust_remote_code: bool = False,
    dtype: str = "float32",
    device: str | None = None,
    log_samples: bool = False,
) -> tuple[dict, dict[str, list], dict[str, dict]]:
    """Runs lmms-eval's `simple_evaluate` on the checkpoint directory `model`; returns `(results, unreadable,
    sources)`: lmms-eval's results dict (`{}` on a process other than the first; with `samples` when `log_samples`),
    the doc ids, per task, of samples whose image could not be read (answered empty; from every process), and
    `task_sources`. Unknown tasks and unreachable data fail before the model loads."""
    import torch.distributed as dist
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from .lmms_model import MSLlavaLMMS

    manager = TaskManager(include_path=include_path)
    check_tasks(tasks, manager)
    sources = task_sources(tasks, manager)
    lm = MSLlavaLMMS(
        str(model), trust_remote_code=trust_remote_code, dtype=dtype, device=device, batch_size=batch_size
    )
    print(lm.summary, flush=True)  # which classes run where (lmms-eval's INFO log is off outside its command line)
    results = simple_evaluate(
        model=lm,
        # as lmms-eval's command line decides it: a process group already up (torchrun) -> its collectives
        distributed_executor_backend="torchrun" if dist.is_available() and dist.is_initialized() else "accelerate",
        tasks=list(tasks),
        batch_size=batch_size,
        limit=limit,
        log_samples=log_samples,
        task_manager=manager,
    )
    unreadable = [dict(lm.unreadable)]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:  # each process read its share
        unreadable = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(dict(lm.unreadable), unreadable, dst=0)
    merged = {}
    for part in unreadable or []:
        for task, doc_ids in part.items():
            merged[task] = sorted(merged.get(task, []) + doc_ids)
    return results or {}, merged, sources


def results_record(results: dict, unreadable: dict, sources: dict, limit: int | None, model: str) -> dict:
    """The results record (`RESULTS_FORMAT`) of lmms-eval's `results`: one row per paper benchmark task (its Table 1
    metric, in the paper's units) and per metric of any other task (as lmms-eval reports it); `benchmark` names the
    paper's column only for the official task run in full on Hub data. Refuses (`ValueError`) a run in which a task
    scored no sample, or nothing numeric was reported."""
    from importlib.metadata import version

    counts = {task: n["effective"] for task, n in results.get("n-samples", {}).items()}
    empty = [task for task, count in counts.items() if count - len(unreadable.get(task, [])) <= 0]
    if empty:
        raise ValueError(
            "nothing was scored for task(s) "
            + ", ".join(f"{task} (none of its {counts[task]} samples had a readable image)" for task in empty)
            + "; no results file written"
        )
    rows = []
    for task, metrics in results["results"].items():
        values = {key.split(",")[0]: value for key, value in metrics.items() if "," in key and "_stderr" not in key}
        values = {key: value for key, value in values.items() if _is_number(value)}
        paper = PAPER_BENCHMARKS.get(task.removesuffix(LOCAL_SUFFIX))
        if paper is not None:
            values = {paper.metric: values[paper.metric] * paper.scale} if paper.metric in values else {}
        source = sources.get(task, {})
        official = paper is not None and task in PAPER_BENCHMARKS and limit is None and "dataset" in source
        for metric, value in values.items():
            rows.append({
                "task": task, "metric": metric, "score": round(float(value), 4),
                "benchmark": paper.column if official else None, "source": source,
                "num_samples": counts.get(task, 0) - len(unreadable.get(task, [])),
                "unreadable_samples": len(unreadable.get(task, [])), "limit": limit,
            })  # fmt: skip
    if not rows:
        raise ValueError(
            f"lmms-eval reported no numeric metric for tasks {sorted(results['results'])}: submission-only tasks "
            "(vqav2_test, mmbench_en_test) are scored by their servers from the file lmms-eval writes; "
            "--lmms-eval-output FILE keeps lmms-eval's whole results"
        )
    return {
        "format": RESULTS_FORMAT,
        "model": model,
        "lmms_eval_version": version("lmms_eval"),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
    }


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def logged_samples(results: dict, unreadable: dict) -> list[dict]:
    """Each sample lmms-eval logged, as `--log-samples` writes it: task, doc id, prompt, answer, target, its scores
    (the task's metrics for this sample) and whether its image was unreadable."""
    lines = []
    for task, samples in results.get("samples", {}).items():
        metrics = [item["metric"] for item in results["configs"].get(task, {}).get("metric_list", [])]
        for sample in samples:
            lines.append({
                "task": task, "doc_id": sample["doc_id"], "prompt": (sample["arguments"] or [None])[0],
                "answer": sample["filtered_resps"][0], "target": sample["target"],
                "scores": {metric: sample[metric] for metric in metrics if metric in sample},
                "unreadable": sample["doc_id"] in unreadable.get(task, []),
            })  # fmt: skip
    return lines


# --------------------------------------------------------------------------------------------- ms-llava eval


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run lmms-eval (the `ms_llava` model) on a checkpoint and write the results record that `ms-llava push "
        "--results` reads. Needs the `eval` extra and lmms-eval (docs/evaluation.md)."
    )
    parser.add_argument("--model", required=True, help="a checkpoint directory or Hub id")
    parser.add_argument("--tasks", required=True, help="comma-separated lmms-eval tasks, e.g. pope,gqa,textvqa_val")
    parser.add_argument("--output", required=True, help="the results record (JSON) to write")
    parser.add_argument("--include-path", action="append", help="a folder of task YAMLs (local data; repeatable)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, help="evaluate only the first N samples of each task (a smoke test)")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the checkpoint's own modules")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", help="e.g. cpu, cuda:0 (default: the accelerator's device)")
    parser.add_argument("--log-samples", metavar="FILE", help="write each sample's prompt, answer and score (JSONL)")
    parser.add_argument("--lmms-eval-output", metavar="FILE", help="also write lmms-eval's whole results (JSON)")


def run(args: argparse.Namespace) -> int:
    from ..checkpoints import resolve_checkpoint
    from ..outputs import check_writable, writing

    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    if args.limit is not None and args.limit < 1:
        raise argparse.ArgumentError(None, f"--limit must be >= 1, got {args.limit}")
    outputs = [Path(name) for name in (args.output, args.log_samples, args.lmms_eval_output) if name]
    for output in outputs:
        check_writable(output.parent)
    folder = resolve_checkpoint(args.model, "--model", processor=True)
    results, unreadable, sources = evaluate(
        folder,
        tasks,
        include_path=args.include_path,
        batch_size=args.batch_size,
        limit=args.limit,
        trust_remote_code=args.trust_remote_code,
        dtype=args.dtype,
        device=args.device,
        log_samples=bool(args.log_samples),
    )
    if not results:  # not the first process
        return 0
    for output in outputs:
        output.parent.mkdir(parents=True, exist_ok=True)
    if args.log_samples:
        with writing(Path(args.log_samples).parent), open(args.log_samples, "w", encoding="utf-8") as file:
            for line in logged_samples(results, unreadable):
                file.write(json.dumps(line, default=str) + "\n")
    if args.lmms_eval_output:  # kept even when no row can be made (submission-only tasks)
        with writing(Path(args.lmms_eval_output).parent):
            Path(args.lmms_eval_output).write_text(json.dumps(results["results"], indent=2, default=str))
    record = results_record(results, unreadable, sources, args.limit, str(args.model))
    with writing(Path(args.output).parent):
        Path(args.output).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    for row in record["rows"]:
        where = row["source"].get("dataset") or row["source"].get("local")
        counted = f"{row['num_samples']} samples" + (f", {row['unreadable_samples']} unreadable (not scored)"
                                                       if row["unreadable_samples"] else "")  # fmt: skip
        print(f"{row['benchmark'] or row['task']} {row['metric']}: {row['score']:g} ({counted}; {where})")
    print(f"wrote {args.output} (ms-llava push DIR REPO_ID --results {args.output})")
    return 0
