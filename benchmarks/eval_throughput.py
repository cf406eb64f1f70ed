"""Evaluation throughput of the lmms-eval model `ms_llava`: samples per second at batch 8 against batch 1.

    python benchmarks/eval_throughput.py            # writes its section of BENCHMARKS.md

The tiny checkpoint (`ms_llava.testing_utils`: CLIP tower 32 px / 8 x 8 grid, Llama width 32, M = 16), random
weights, on a local copy of lmms-eval's POPE task (its own YAML, `load_from_disk`) of generated 64 x 64 images;
greedy, at most 8 new tokens (`max_new_tokens=8`; the random model rarely stops earlier), one thread. The time is
that of lmms-eval's `generate_until` call on the model (prompt building, image processing, left-padded batched
`generate`, decoding), batch sizes interleaved over the rounds, the median kept. Both batch sizes must give the same
answers: left padding changes the speed only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from markdown_section import cpu_model, write_section  # noqa: E402

START, END = "<!-- eval_throughput:start -->", "<!-- eval_throughput:end -->"


def pope_task(root: Path, samples: int) -> Path:
    import datasets
    import lmms_eval

    from ms_llava.testing_utils import sample_image

    columns = {"question_id": [], "question": [], "answer": [], "image": [], "category": []}
    for index in range(samples):
        columns["question_id"].append(str(index))
        columns["question"].append(f"Is there a {'red' if index % 2 else 'blue'} square in the image?")
        columns["answer"].append("yes" if index % 3 else "no")
        columns["image"].append(sample_image(size=64, seed=index))
        columns["category"].append("random")
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(columns)}).save_to_disk(root / "pope")
    builtin = Path(lmms_eval.__file__).parent / "tasks" / "pope" / "pope.yaml"
    (root / "tasks").mkdir()
    (root / "tasks" / "pope_local.yaml").write_text(
        f"include: {builtin}\ntask: pope_local\ndataset_path: {root / 'pope'}\ndataset_kwargs:\n  load_from_disk: true\n"
    )
    return root / "tasks"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from ms_llava.evaluation.lmms_model import MSLlavaLMMS
    from ms_llava.testing_utils import write_tiny_checkpoint

    class Timed(MSLlavaLMMS):
        def generate_until(self, requests):
            start = time.perf_counter()
            answers = super().generate_until(requests)
            self.seconds = time.perf_counter() - start
            self.answers = answers
            return answers

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = write_tiny_checkpoint(tmp / "tiny")
        manager = TaskManager(include_path=str(pope_task(tmp, args.samples)))
        rates: dict[int, list[float]] = {1: [], 8: []}
        answers: dict[int, list[str]] = {}
        for _ in range(args.rounds):
            for batch_size in (1, 8):
                lm = Timed(pretrained=str(checkpoint), batch_size=batch_size, max_new_tokens=8, device="cpu")
                simple_evaluate(model=lm, tasks=["pope_local"], batch_size=batch_size, task_manager=manager)
                rates[batch_size].append(args.samples / lm.seconds)
                answers[batch_size] = lm.answers
    same = answers[1] == answers[8]
    one, eight = statistics.median(rates[1]), statistics.median(rates[8])
    section = "\n".join(
        [
            "## Evaluation throughput through lmms-eval (tiny model, CPU)",
            "",
            f"`python benchmarks/eval_throughput.py` (lmms-eval's POPE task on a local copy of {args.samples} "
            f"generated images; the tiny random checkpoint, greedy, at most 8 new tokens, one thread; "
            f"{cpu_model()}, {os.cpu_count()} cores, 1-min load average {os.getloadavg()[0]:.1f} at the start; "
            f"torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). Median of {args.rounds} "
            "interleaved rounds of lmms-eval's `generate_until` on the `ms_llava` model.",
            "",
            "| batch size | samples/s | speed-up |",
            "|---|---|---|",
            f"| 1 | {one:.1f} | 1.00 |",
            f"| 8 (left-padded) | {eight:.1f} | {eight / one:.2f} |",
            "",
            f"Same answers at both batch sizes: {'yes' if same else 'NO'}. At the paper's size the language model "
            "dominates and batching pays on a GPU; this measures the plugin's batching on CPU only.",
        ]
    )
    print(section)
    if not same:
        raise SystemExit("batch 1 and batch 8 gave different answers")
    if not args.no_write:
        write_section(args.write, section, START, END)
        print(f"\nwrote {args.write}")


if __name__ == "__main__":
    main()
