"""Shared pieces of the lmms-eval tests (fixtures re-exported by conftest.py): local tasks from generated images (datasets' save_to_disk + a task YAML that
includes lmms-eval's own YAML and points it at the local copy, as docs/evaluation.md says), and the reference: the
model's own `generate`, one sample at a time, no padding.

lmms-eval is imported at the top on purpose: where it is not importable these tests error at collection (loudly),
instead of skipping."""

from __future__ import annotations

import json
import random
from pathlib import Path

import datasets
import lmms_eval  # noqa: F401 - not importable -> every test here errors (install: docs/evaluation.md)
import pytest
import torch

import ms_llava
from ms_llava.modeling_ms_llava import MSLlavaForConditionalGeneration
from ms_llava.processing_ms_llava import MSLlavaProcessor

LMMS_TASKS = Path(lmms_eval.__file__).parent / "tasks"
POST_PROMPT = "\nAnswer the question using a single word or phrase."


def write_local_task(root: Path, name: str, splits: dict[str, dict], builtin: str | None = None, **fields) -> Path:
    """Saves `splits` ({split: columns}) with `save_to_disk` under `root/data/name` and writes `root/tasks/name.yaml`:
    `include:` lmms-eval's built-in YAML `builtin` (relative to lmms_eval/tasks) when given, then `task`,
    `dataset_path`, `dataset_kwargs: {load_from_disk: true}` and `fields` (YAML values, as text). Returns the tasks
    folder (`--include_path`)."""
    data = root / "data" / name
    datasets.DatasetDict(
        {split: datasets.Dataset.from_dict(columns) for split, columns in splits.items()}
    ).save_to_disk(data)
    lines = [f"include: {LMMS_TASKS / builtin}"] if builtin else []
    lines += [f"task: {name}", f"dataset_path: {data}", "dataset_kwargs:", "  load_from_disk: true"]
    lines += [f"{key}: {value}" for key, value in fields.items()]
    tasks = root / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    (tasks / f"{name}.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tasks


@torch.no_grad()
def reference_answer(model, processor, text: str, images: list, max_new_tokens: int) -> str:
    """The model's own greedy `generate` on one sample, no batching, no padding: the images first, then the text,
    through the checkpoint's chat template."""
    messages = [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=images, return_tensors="pt")
    output = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    return processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def logged_responses(results: dict, task: str) -> dict:
    """{doc_id: the response lmms-eval scored} from `simple_evaluate(..., log_samples=True)`."""
    return {sample["doc_id"]: sample["filtered_resps"][0] for sample in results["samples"][task]}


def metric(results: dict, task: str, name: str) -> float:
    return results["results"][task][f"{name},none"]


def load(directory):
    model = MSLlavaForConditionalGeneration.from_pretrained(directory).eval()
    return model, MSLlavaProcessor.from_pretrained(directory)


@pytest.fixture(scope="session")
def default_checkpoint():
    """The embedded default checkpoint (trained on ScopeBench: answers colours, shapes, counts, digits, sides)."""
    return ms_llava.default_checkpoint_path()


@pytest.fixture(scope="session")
def yes_no_checkpoint(tmp_path_factory):
    """A tiny checkpoint fine-tuned for a few steps on yes/no questions about coloured shapes, so that it answers
    "yes" or "no" (a POPE-style task needs those words to score anything; the random tiny model says neither)."""
    from ms_llava.testing_utils import COLOURS, SHAPES, draw_shape, write_records, write_tiny_checkpoint
    from ms_llava.training import train

    root = tmp_path_factory.mktemp("yes_no")
    rng = random.Random(0)
    pairs = []
    for index in range(64):
        colour, shape = list(COLOURS)[index % len(COLOURS)], SHAPES[(index // len(COLOURS)) % len(SHAPES)]
        # three "yes" to one "no": a model this small first learns the majority answer, and POPE's precision, recall
        # and F1 count the "yes" answers
        asked = colour if index % 4 else rng.choice([other for other in COLOURS if other != colour])
        record = {
            "id": f"yn-{index}",
            "image": f"yn-{index}.png",
            "conversations": [
                {"from": "human", "value": f"<image>\nIs there a {asked} object in the image?{POST_PROMPT}"},
                {"from": "gpt", "value": "yes" if asked == colour else "no"},
            ],
        }
        pairs.append((record, draw_shape(colour, shape, rng)))
    data = write_records(root, "yes-no", pairs)
    write_tiny_checkpoint(root / "tiny")
    train(
        root / "tiny",
        "finetune",
        data,
        root / "images",
        root / "trained",
        global_batch_size=8,
        learning_rate=1e-2,
        max_steps=16,
        dataloader_num_workers=0,
        save_steps=1000,
        warmup_ratio=0.1,
    )
    return root / "trained"


def scopebench_split(directory: Path, count: int) -> tuple[Path, list[dict]]:
    """ScopeBench's test split, first `count` images, written as the experiment writes it; (qa file, records)."""
    from experiments.scopebench.generator import write_split

    qa_path = write_split(directory, "test", count)["qa"]
    return qa_path, json.loads(qa_path.read_text(encoding="utf-8"))
