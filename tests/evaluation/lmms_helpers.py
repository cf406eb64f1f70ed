"""Shared pieces of the lmms-eval tests (fixtures re-exported by conftest.py): local tasks from generated images
(datasets' save_to_disk + a task YAML that includes lmms-eval's own YAML and points it at the local copy, as
docs/evaluation.md says), the reference (the model's own `generate`, one sample at a time, no padding), and the
checkpoints evaluated: the embedded default, and one made by the paper's workflow on tiny parts.

lmms-eval is imported at the top on purpose: where it is not importable these tests error at collection (loudly),
instead of skipping."""

from __future__ import annotations

import copy
import json
import os
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
CLIP_PREPROCESSING = {
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
}


def write_local_task(root: Path, name: str, splits: dict[str, dict], builtin: str | None = None, **fields) -> Path:
    """Saves `splits` ({split: columns}) with `save_to_disk` under `root/data/name` and writes `root/tasks/name.yaml`:
    `include:` lmms-eval's built-in YAML `builtin` (relative to lmms_eval/tasks) when given, then `task`,
    `dataset_path`, `dataset_kwargs: {load_from_disk: true}` and `fields` (YAML values, as text). Returns the tasks
    folder (`--include-path`)."""
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


def write_question_task(root: Path, name: str, columns: dict[str, list], generation_kwargs: str) -> Path:
    """A local `generate_until` task `name` over `columns` ("question", "answer", "image": a file path): the image at
    the path, the question alone as the prompt, exact match with the answer; its two functions in
    `root/tasks/<name>_utils.py`. Returns the tasks folder."""
    utils = f"{name}_utils"
    (root / "tasks").mkdir(parents=True, exist_ok=True)
    (root / "tasks" / f"{utils}.py").write_text(
        "def doc_to_visual(doc):\n    return [doc['image']]\n\n\ndef doc_to_text(doc, lmms_eval_specific_kwargs=None):\n"
        "    return doc['question']\n",
        encoding="utf-8",
    )
    return write_local_task(
        root,
        name,
        {"test": columns},
        test_split="test",
        output_type="generate_until",
        doc_to_visual=f"!function {utils}.doc_to_visual",
        doc_to_text=f"!function {utils}.doc_to_text",
        doc_to_target="answer",
        generation_kwargs=generation_kwargs,
        metric_list="[{metric: exact_match, aggregation: mean, higher_is_better: true}]",
    )


@torch.no_grad()
def reference_answer(model, processor, text: str, images: list, max_new_tokens: int) -> str:
    """The model's own greedy `generate` on one sample, no batching, no padding: the images first, then the text,
    through the checkpoint's chat template."""
    messages = [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=images, return_tensors="pt")
    output = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    return processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def read_samples(path: Path) -> dict[str, dict]:
    """`--log-samples` lines as {task: {doc_id: line}}."""
    samples = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        samples.setdefault(record["task"], {})[record["doc_id"]] = record
    return samples


def load(directory):
    model = MSLlavaForConditionalGeneration.from_pretrained(directory).eval()
    return model, MSLlavaProcessor.from_pretrained(directory)


def pope_columns(count: int, seed: int) -> dict[str, list]:
    """POPE's columns ("Is there a <colour> object in the image?", yes or no) over coloured shapes."""
    from ms_llava.testing_utils import COLOURS, SHAPES, draw_shape

    rng = random.Random(seed)
    columns = {"question_id": [], "question": [], "answer": [], "image": [], "category": []}
    for index in range(count):
        colour = list(COLOURS)[index % 4]
        asked = colour if index % 3 else list(COLOURS)[(index + 1) % 4]
        columns["question_id"].append(str(index))
        columns["question"].append(f"Is there a {asked} object in the image?")
        columns["answer"].append("yes" if asked == colour else "no")
        columns["image"].append(draw_shape(colour, SHAPES[index % 2], rng))
        columns["category"].append("random")
    return columns


@pytest.fixture(scope="session", autouse=True)
def _lmms_eval_tasks_indexed_once():
    """Every `TaskManager` indexes lmms-eval's ~2000 own task YAMLs (seconds on 2 cores); their index does not change
    during the session, so it is made once (the tasks under an include path are indexed anew each time)."""
    from lmms_eval.tasks import TaskManager

    own, index, made = str(LMMS_TASKS) + os.sep, TaskManager._get_task_and_group, {}

    def once(self, task_dir):
        if task_dir != own:
            return index(self, task_dir)
        if own not in made:
            made[own] = index(self, task_dir)
        return copy.deepcopy(made[own])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TaskManager, "_get_task_and_group", once)
        yield


@pytest.fixture(scope="session")
def default_checkpoint():
    """The embedded default checkpoint (trained on ScopeBench: answers colours, shapes, counts, digits, sides)."""
    return ms_llava.default_checkpoint_path()


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory):
    """The paper's workflow on tiny parts: a CLIP vision tower and a Llama LLM (with its tokenizer, no pad token) as
    transformers saves them -> `compose` -> stage 1 (captions, projector only) -> stage 2 on yes/no questions about
    coloured shapes, so that it answers "yes" or "no" (a POPE-style task needs those words to score anything)."""
    from transformers import CLIPVisionModel, LlamaForCausalLM

    from ms_llava.compose import compose
    from ms_llava.testing_utils import (
        build_tiny_tokenizer,
        tiny_text_config,
        tiny_vision_config,
        write_records,
        write_shapes_dataset,
    )
    from ms_llava.training import train

    root = tmp_path_factory.mktemp("paper_workflow")
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, and steady on a shared machine
    tower, llm = root / "clip", root / "llama"
    CLIPVisionModel(tiny_vision_config()).save_pretrained(tower)
    (tower / "preprocessor_config.json").write_text(json.dumps(CLIP_PREPROCESSING), encoding="utf-8")
    tokenizer = build_tiny_tokenizer(with_image_token=False)
    LlamaForCausalLM(tiny_text_config(tokenizer, pad_token_id=None)).save_pretrained(llm)
    tokenizer.save_pretrained(llm)
    resampler = {"hidden_size": 20, "num_attention_heads": 2, "fusion_hidden_size": 5}
    compose(
        tower,
        llm,
        root / "composed",
        num_queries=16,
        scope_windows=[2, 4, 8],
        resampler_kwargs=resampler,
        log=lambda line: None,
    )
    columns = pope_columns(64, seed=0)
    # two "yes" to one "no" (pope_columns asks about another colour every third question): a model this small first
    # learns the majority answer, and POPE's precision, recall and F1 count the "yes" answers
    records = [
        (
            {
                "id": f"yn-{index}",
                "image": f"yn-{index}.png",
                "conversations": [
                    {"from": "human", "value": f"<image>\n{question}{POST_PROMPT}"},
                    {"from": "gpt", "value": answer},
                ],
            },
            image,
        )
        for index, (question, answer, image) in enumerate(
            zip(columns["question"], columns["answer"], columns["image"], strict=True)
        )
    ]
    data = root / "data"
    captions, questions = write_shapes_dataset(data, "caption", 16), write_records(data, "yes-no", records)
    run = {"global_batch_size": 8, "dataloader_num_workers": 0, "save_steps": 1000, "warmup_ratio": 0.1}
    # the paper's learning rates (1e-3, 2e-5) would not move a random tiny model in a few steps
    train(
        root / "composed",
        "pretrain",
        captions,
        data / "images",
        root / "stage1",
        learning_rate=1e-2,
        max_steps=2,
        **run,
    )
    train(
        root / "stage1",
        "finetune",
        questions,
        data / "images",
        root / "stage2",
        learning_rate=1e-2,
        max_steps=8,
        **run,
    )
    torch.set_num_threads(threads)
    return root / "stage2"


def scopebench_split(directory: Path, count: int) -> tuple[Path, list[dict]]:
    """ScopeBench's test split, first `count` images, written as the experiment writes it; (qa file, records)."""
    from experiments.scopebench.generator import write_split

    qa_path = write_split(directory, "test", count)["qa"]
    return qa_path, json.loads(qa_path.read_text(encoding="utf-8"))
