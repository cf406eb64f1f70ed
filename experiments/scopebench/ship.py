"""Ships a ScopeBench run as the package's embedded default checkpoint (`ms_llava/default_checkpoint/`).

The folder gets the model (safetensors), its processor, a model card (README.md), a few held-out test images in
``samples/`` and ``demo_samples.json``: one question per type about those images, each answered correctly by the
shipped model when asked alone (image + question, greedy), which is how ``ms-llava demo`` asks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from PIL import Image

from . import generator as sb

CARD = """---
license: apache-2.0
library_name: transformers
pipeline_tag: image-text-to-text
tags:
- ms-llava
- ms-resampler
- scopebench
- toy
---

# MS-LLaVA ScopeBench default (a toy)

The embedded default checkpoint of `ms-llava`: the best MS-LLaVA (E = 3) of the ScopeBench experiment
(experiments/scopebench/README.md in the ms-llava repository), chosen by validation accuracy among the finished E = 3 runs. **A toy**: {params:,} parameters,
trained in minutes on a CPU on generated 336 x 336 images of two to five coloured shapes, one of which carries a small
digit. It is meant for ScopeBench's five kinds of question about such images and nothing else, and answers {num_allowed} of
them at 1.5 times chance or better (below).

- Run: `{run}` (projector: MS-Resampler, M = {M}, k = {windows}, beta = {beta}, fusion `{fusion}`).
- Vision tower: CLIP ViT, 336 px, patch 14 (24 x 24 grid), 2 layers of width 64, trained on generated images with a
  dense per-patch objective (colour, shape, digit of every patch), then frozen.
- Language model: Llama, {lm_layers} layers of width {lm_width}, {vocab}-token byte-level BPE vocabulary, warmed up on
  text only.
- Training: `ms_llava.training.train`, stage `pretrain` (projector, captions, {steps1} steps) then `finetune`
  (projector + language model, question answering, {steps2} steps), batch 16, on ScopeBench's train split (2,000
  images, 10,000 questions).

## ScopeBench test accuracy (greedy exact match, {n_test} questions, each asked alone: image + question)

| question type | accuracy |
|---|---|
{rows}

Chance (one answer at random): digit 11.1%, colour 16.7%, shape 33.3%, count 25%, layout 50%. At 1.5 times chance
or better: {allowed}; below that: {not_allowed}. `demo_samples.json` therefore only holds questions of the first
kind.

## Use

```python
from pathlib import Path

import ms_llava  # registers the Auto classes
from transformers import AutoModelForImageTextToText, AutoProcessor

path = Path(ms_llava.__file__).parent / "default_checkpoint"  # this folder
model = AutoModelForImageTextToText.from_pretrained(path)
processor = AutoProcessor.from_pretrained(path)
```

`demo_samples.json` lists held-out test images (`samples/`) with questions the model answers correctly (asked alone,
greedy).
"""


def _steps(folder: Path, stage: str, result: dict) -> str:
    """The number of steps of a run's stage: from its result's `steps` (recorded by `run_one`), else from the trainer
    state that `train` leaves (stage 2 only: stage 1's folder is deleted after the run), else the recipe, `STAGES`."""
    if stage in result.get("steps", {}):
        return str(result["steps"][stage])
    state = folder / "trainer_state.json"
    if stage == "finetune" and state.exists():
        return str(json.loads(state.read_text())["global_step"])
    from .runs import STAGES

    return str(STAGES[stage]["max_steps"])


def best_run(runs: Path) -> str:
    """The E = 3 run with the highest validation accuracy (ties: higher test accuracy)."""
    candidates = []
    for path in (runs / "results").glob("*.json"):
        result = json.loads(path.read_text())
        if "val" in result and (runs / "models" / result["run"] / "stage2").is_dir():
            candidates.append((result["val"]["overall"], result["test"]["overall"], result["run"]))
    if not candidates:
        raise SystemExit(f"no finished E = 3 run with a model in {runs}")
    return max(candidates)[2]


@torch.no_grad()
def single_turn_answers(model, processor, items, images):
    """Greedy answers to (question, image index) pairs asked alone."""
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            add_generation_prompt=True,
        )
        for q, _ in items
    ]
    return sb.generate_answers(model, processor, prompts, [i for _, i in items], images)


def ship_default(runs: Path, output: Path, run: str | None = None, num_samples: int = 6, log=print) -> dict:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    run = run or best_run(runs)
    source = runs / "models" / run / "stage2"
    result = json.loads((runs / "results" / f"{run}.json").read_text())
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(source)
    data = runs / "data"
    records = json.loads((data / "qa-test.json").read_text())
    images = [Image.open(data / "images" / r["image"]).convert("RGB") for r in records]
    items, meta = [], []
    for index, record in enumerate(records):
        turns = record["conversations"]
        for position, qtype in enumerate(record["types"]):
            question = turns[2 * position]["value"].replace("<image>", "").strip()
            items.append((question, index))
            meta.append((qtype, turns[2 * position + 1]["value"]))
    answers = single_turn_answers(model, processor, items, images)
    correct = [a == m[1] for a, m in zip(answers, meta, strict=True)]
    single = sum(correct) / len(correct)
    # Samples: only question types the model answers well above chance (a right answer on a type it guesses would
    # show luck, not the model); one question per allowed type in turn, each about another image, answered right
    # when asked alone; images whose questions are all answered right come first.
    chance = {t: 1 / n for t, n in sb.ANSWER_COUNTS.items()}
    by_type: dict[str, list[bool]] = {}
    for (qtype, _), hit in zip(meta, correct, strict=True):
        by_type.setdefault(qtype, []).append(hit)
    type_accuracy = {t: sum(v) / len(v) for t, v in by_type.items()}
    allowed = [t for t in sb.QUESTION_TYPES if type_accuracy[t] >= 1.5 * chance[t]]
    per_image: dict[str, list[int]] = {}
    for position, (_, index) in enumerate(items):
        per_image.setdefault(records[index]["image"], []).append(position)
    order = sorted(per_image, key=lambda name: (not all(correct[p] for p in per_image[name]), name))
    chosen, used = [], set()
    for turn in range(num_samples * max(1, len(allowed))):
        if len(chosen) == num_samples or not allowed:
            break
        qtype = allowed[turn % len(allowed)]
        for name in order:
            hits = [p for p in per_image[name] if meta[p][0] == qtype and correct[p]]
            if name not in used and hits:
                chosen.append((items[hits[0]][1], hits[0]))
                used.add(name)
                break
    if output.exists():
        shutil.rmtree(output)
    (output / "samples").mkdir(parents=True)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    for path in output.glob("*_ms_llava.py"):  # remote-code copies of the package's modules: not shipped twice
        path.unlink()
    samples = []
    for index, p in chosen:
        name = f"samples/{records[index]['image']}"
        shutil.copyfile(data / "images" / records[index]["image"], output / name)
        samples.append({"image": name, "question": items[p][0], "answer": meta[p][1], "type": meta[p][0]})
    (output / "demo_samples.json").write_text(json.dumps(samples, indent=1) + "\n", encoding="utf-8")
    test = result["test"]
    rows = "\n".join(f"| {key} | {100 * test[key]:.1f}% |" for key in ("overall", "fine", "attribute", "global"))
    rows += "\n" + "\n".join(f"| {key} | {100 * test[key]:.1f}% |" for key in sb.QUESTION_TYPES)
    resampler = model.config.resampler_config
    card = CARD.format(
        params=sum(p.numel() for p in model.parameters()),
        run=run,
        M=resampler.num_queries,
        windows=list(resampler.scope_windows),
        beta=resampler.scope_bias_strength,
        fusion=resampler.fusion,
        n_test=len(items),
        rows=rows,
        num_allowed=len(allowed),
        allowed=", ".join(allowed) or "none",
        not_allowed=", ".join(t for t in sb.QUESTION_TYPES if t not in allowed) or "none",
        lm_layers=model.config.text_config.num_hidden_layers,
        lm_width=model.config.text_config.hidden_size,
        vocab=model.config.text_config.vocab_size,
        steps1=_steps(source, "pretrain", result),
        steps2=_steps(source, "finetune", result),
    )
    (output / "README.md").write_text(card, encoding="utf-8")
    info = {
        "run": run,
        "test": test,
        "single_turn_accuracy_by_type": type_accuracy,
        "chance_by_type": chance,
        "sample_types": allowed,
    }
    (output / "scopebench_result.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    size = sum(f.stat().st_size for f in output.rglob("*") if f.is_file())
    log(f"shipped {run} to {output}: {size / 1e6:.2f} MB, accuracy {single:.3f}, {len(samples)} samples ({allowed})")
    return info
