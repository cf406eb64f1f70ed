"""`ms-llava eval`: run lmms-eval on a checkpoint and write the card's results file.

`evaluate(model, tasks)` runs `lmms_eval.evaluator.simple_evaluate` with the `ms_llava` model and returns lmms-eval's
own results; `card_results(results)` turns them into the `{benchmark: score}` dict that `ms-llava push --results` reads
(`ms_llava.hub`): the paper's Table 1 column names for the tasks that are its benchmarks, `"<task> <metric>"` for any
other task. Scores are the paper's units: percentages, MME's perception score as it is (out of 2000).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PaperBenchmark:
    column: str  # the column of the paper's Table 1 (the card's row)
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
# its own tasks first, so a local task cannot reuse the built-in name.
LOCAL_SUFFIX = "_local"


def paper_benchmark(task: str) -> PaperBenchmark | None:
    """The paper benchmark an lmms-eval task name stands for (`pope`, `pope_local`), or None."""
    return PAPER_BENCHMARKS.get(task.removesuffix(LOCAL_SUFFIX))


def card_results(results: dict) -> dict[str, float]:
    """`{benchmark: score}` for `ms-llava push --results` from lmms-eval's results (`simple_evaluate`'s dict, or its
    `results` part): one row per paper benchmark, in its Table 1 column and units; one row per metric of any other
    task (`"<task> <metric>"`, as lmms-eval reports it). Standard errors and non-numeric entries are left out."""
    per_task = results.get("results", results)
    rows: dict[str, float] = {}
    for task, metrics in per_task.items():
        values = {
            key.split(",")[0]: value
            for key, value in metrics.items()
            if "," in key and "_stderr" not in key and _is_number(value)
        }
        benchmark = paper_benchmark(task)
        if benchmark is not None and benchmark.metric in values:
            rows[benchmark.column] = round(float(values[benchmark.metric]) * benchmark.scale, 4)
            continue
        for metric, value in values.items():
            rows[f"{task} {metric}"] = float(value)
    if not rows:
        raise ValueError(
            f"lmms-eval reported no numeric metric for tasks {sorted(per_task)}: submission-only tasks (vqav2_test, "
            "mmbench_en_test) are scored by their servers from the file lmms-eval writes; --lmms-eval-output FILE "
            "keeps lmms-eval's whole results"
        )
    return rows


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def known_tasks(include_path: str | list[str] | None = None) -> list[str]:
    """Every task and group name lmms-eval knows (its own and those under `include_path`)."""
    from lmms_eval.tasks import TaskManager

    return sorted(TaskManager(include_path=include_path).all_tasks)


def check_tasks(tasks: list[str], include_path=None, manager=None):
    """Refuses (`ValueError`) task names lmms-eval does not know, listing the known ones (the paper's first).
    Returns the `TaskManager` (indexing lmms-eval's tasks takes seconds: reuse it)."""
    from lmms_eval.tasks import TaskManager

    manager = manager or TaskManager(include_path=include_path)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        local = TaskManager(include_path=include_path, include_defaults=False).all_tasks if include_path else []
        paper = [task for task in PAPER_BENCHMARKS if task in manager.all_tasks]
        others = [task for task in manager.all_tasks if task not in paper and task not in local]
        raise ValueError(
            f"unknown lmms-eval task(s) {unknown}. The paper's benchmarks: {', '.join(paper)}. "
            f"Local tasks (--include-path): {', '.join(local) or 'none'}. "
            f"All {len(manager.all_tasks)} known tasks: {', '.join(others)}"
        )
    return manager


def evaluate(
    model: str | Path,
    tasks: list[str],
    *,
    include_path: str | list[str] | None = None,
    batch_size: int = 8,
    limit: int | float | None = None,
    trust_remote_code: bool = False,
    dtype: str = "float32",
    device: str | None = None,
    log_samples: bool = False,
) -> tuple[dict, dict[str, list]]:
    """Runs lmms-eval's `simple_evaluate` on the checkpoint directory `model` and returns `(results, unreadable)`:
    lmms-eval's results dict (with `samples` when `log_samples`) and the doc ids, per task, of samples whose image
    could not be read (answered empty, scored wrong)."""
    from lmms_eval.evaluator import simple_evaluate

    from .lmms_model import MSLlavaLMMS

    if not tasks:
        raise ValueError("no task given (--tasks pope,gqa,...)")
    manager = check_tasks(tasks, include_path)
    lm = MSLlavaLMMS(
        pretrained=str(model),
        trust_remote_code=trust_remote_code,
        dtype=dtype,
        device=device,
        batch_size=batch_size,
    )
    import torch.distributed as dist

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
    if results is None:  # a non-zero rank of a multi-process run
        return {}, dict(lm.unreadable)
    return results, dict(lm.unreadable)


def write_results(path: str | Path, rows: dict[str, float]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return path


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Registers `eval` on an argparse subparsers object (`ms-llava eval --model DIR --tasks ... --output FILE`)."""
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint with lmms-eval and write the results file `ms-llava push --results` reads",
        description=(
            "Run lmms-eval (the `ms_llava` model) on a checkpoint and write {benchmark: score} as JSON, with the "
            "paper's Table 1 column names for its benchmarks. Needs the `eval` extra and lmms-eval (docs/evaluation.md)."
        ),
    )
    parser.add_argument("--model", required=True, help="a checkpoint directory")
    parser.add_argument("--tasks", required=True, help="comma-separated lmms-eval tasks, e.g. pope,gqa,textvqa_val")
    parser.add_argument("--output", required=True, help="the results JSON to write ({benchmark: score})")
    parser.add_argument("--include-path", action="append", help="a folder of task YAMLs (local data; repeatable)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=float, help="evaluate only the first N samples of each task (a smoke test)")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the checkpoint's own modules")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", help="e.g. cpu, cuda:0 (default: the accelerator's device)")
    parser.add_argument("--lmms-eval-output", help="also write lmms-eval's whole results dict (JSON) here")
    parser.set_defaults(handler=_eval_command)
    return parser


def _eval_command(args: argparse.Namespace) -> int:
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    results, unreadable = evaluate(
        args.model,
        tasks,
        include_path=args.include_path,
        batch_size=args.batch_size,
        limit=limit,
        trust_remote_code=args.trust_remote_code,
        dtype=args.dtype,
        device=args.device,
    )
    if not results:  # not the main process
        return 0
    if args.lmms_eval_output:  # first: a run without a card row (submission-only tasks) still keeps what it computed
        Path(args.lmms_eval_output).write_text(json.dumps(results["results"], indent=2, default=str), encoding="utf-8")
    rows = card_results(results)
    write_results(args.output, rows)
    for benchmark, score in rows.items():
        print(f"{benchmark}: {score:g}")
    for task, doc_ids in unreadable.items():
        print(f"WARNING: {task}: {len(doc_ids)} sample(s) had no readable image (scored wrong): {doc_ids}")
    print(f"wrote {args.output} (ms-llava push DIR REPO_ID --results {args.output})")
    return 0
