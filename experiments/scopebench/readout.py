"""The projector table with the language model replaced by a trained readout: what can each projector carry at M?

The table's end-to-end runs do not separate the projectors because the tiny language model reads nothing of the
image but the count (README.md here, "Where the evidence is lost"). This experiment keeps everything upstream of
the language model as it is, the frozen tower, the same projector built with the same seed through the same
`get_image_features` path, and replaces the language model by a small readout trained with the projector on the
answers, as classification:

- the M projected tokens, layer-normed, plus a learned position embedding per token (the language model's positions),
- one pre-norm transformer encoder layer over them (width 128, 4 heads, MLP 256),
- per question type, a learned query that attends over the tokens (multi-head attention, 4 heads), then a 2-layer
  GELU MLP onto that type's answers (colour 6, shape 3, digit 9, count 4, layout 2).

Projector and readout are trained from scratch together on every training image (each has all five answers): the
five cross-entropies summed, AdamW (weight decay 0.01), lr 1e-3 with a 5% linear warm-up and cosine decay
(`transformers.get_cosine_schedule_with_warmup`), batch 32, gradient-norm clip 1, fixed steps. The frozen tower's
features come from `ms_llava.training.feature_cache` (computed once per image). Scored on every question of the test and
validation splits (argmax, so never an out-of-vocabulary answer); results have the table's format
(`RUNS/readout/<run>.json`) and go through the same `aggregate` and `claims`.

This is not the paper's setting: the paper's projector feeds a 7B language model, and the readout is a model of one
that can read what the tokens hold. What it measures is how much of each scope's evidence a projector keeps in a
readable form at its M, which is what the paper's claims are about; it does not measure what an LLM learns to use.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from . import generator as sb

ANSWERS = {
    "attribute_colour": tuple(sb.COLOURS),
    "attribute_shape": sb.SHAPES,
    "fine_digit": sb.DIGITS,
    "global_count": tuple(sb.COUNT_WORDS.values()),
    "global_layout": ("left", "right"),
}
READOUT = {"learning_rate": 1e-3, "weight_decay": 0.01, "batch_size": 32, "steps": 600, "warmup_ratio": 0.05}


def labels(qa_path: Path) -> tuple[list[str], torch.Tensor]:
    """(image files, answers `(num_images, 5)` as class indices in `ANSWERS` order) from a `qa-<split>.json`."""
    records = json.loads(Path(qa_path).read_text(encoding="utf-8"))
    by_image: dict[str, dict[str, int]] = {}
    for record in records:
        (qtype,) = record["types"]  # one question per record
        answer = record["conversations"][1]["value"]
        if qtype not in ANSWERS or answer not in ANSWERS[qtype]:
            raise ValueError(f"{qa_path}: question type {qtype!r} with answer {answer!r} is not a ScopeBench answer")
        by_image.setdefault(record["image"], {})[qtype] = ANSWERS[qtype].index(answer)
    incomplete = [image for image, answers in by_image.items() if len(answers) != len(ANSWERS)]
    if incomplete:
        raise ValueError(f"{qa_path}: {len(incomplete)} images lack some question type, e.g. {incomplete[0]!r}")
    images = list(by_image)
    return images, torch.tensor([[by_image[i][t] for t in ANSWERS] for i in images])


class Readout(nn.Module):
    """Projected tokens `(batch, M, width)` -> logits per question type (module docstring)."""

    def __init__(self, width: int, num_tokens: int, heads: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.position = nn.Parameter(torch.randn(num_tokens, width) * 0.02)
        self.encoder = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=2 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.queries = nn.Parameter(torch.randn(len(ANSWERS), width) * 0.02)
        self.pool = nn.MultiheadAttention(width, heads, batch_first=True)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, len(answers)))
            for answers in ANSWERS.values()
        )

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        if tokens.dim() != 3 or tokens.shape[1:] != self.position.shape:
            raise ValueError(f"Readout expects tokens of shape (batch, {tuple(self.position.shape)}), got "
                             f"{tuple(tokens.shape)}")  # fmt: skip
        hidden = self.encoder(self.norm(tokens) + self.position)
        pooled, _ = self.pool(self.queries.expand(len(tokens), -1, -1), hidden, hidden, need_weights=False)
        return [head(pooled[:, i]) for i, head in enumerate(self.heads)]


def projected(model, rows: torch.Tensor, cache) -> torch.Tensor:
    """The projector's tokens `(batch, M, width)` for the cache rows `rows`, called as the model's own
    `get_image_features` calls it (`FeatureCache.projector_args`)."""
    args, kwargs = cache.projector_args
    return model.model.multi_modal_projector(cache.features[rows], *args, **kwargs)


def accuracy(model, readout, rows: torch.Tensor, answers: torch.Tensor, cache, batch_size: int = 100) -> dict:
    """Per question type, per scope and overall, as `scopebench.question_type_accuracy` reports them."""
    correct = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            logits = readout(projected(model, rows[start : start + batch_size], cache))
            correct.append(torch.stack([lg.argmax(-1) for lg in logits], 1) == answers[start : start + batch_size])
    hits = torch.cat(correct).float()
    out = {qtype: hits[:, i].mean().item() for i, qtype in enumerate(ANSWERS)}
    for scope in ("fine", "attribute", "global"):
        columns = [i for i, qtype in enumerate(ANSWERS) if qtype.startswith(scope)]
        out[scope] = hits[:, columns].mean().item()
    out["overall"] = hits.mean().item()
    return dict(sorted(out.items()))


def train_readout(model, data: Path, seed: int, steps: int = READOUT["steps"], log=print) -> dict:
    """Trains `model`'s projector (everything else frozen) and a fresh readout on the train split's answers; returns
    `{"test", "val", "curve", "train_loss", "last_loss"}` (`curve`: the loss and validation accuracy every 250
    steps, for reading only; nothing is selected on it)."""
    from transformers import get_cosine_schedule_with_warmup

    from ms_llava.training.feature_cache import build_cache

    from .models import image_processor

    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    data = Path(data)
    splits = {split: labels(data / f"qa-{split}.json") for split in ("train", "val", "test")}
    paths = [data / "images" / image for split in splits.values() for image in split[0]]
    processor = SimpleNamespace(image_processor=image_processor())  # all `build_cache` reads of a processor
    cache = build_cache(model, processor, paths, log=lambda *a: log(a[0] % a[1:]))
    offsets, rows = 0, {}
    for split, (images, _) in splits.items():
        rows[split] = torch.arange(offsets, offsets + len(images))
        offsets += len(images)
    projector = model.model.multi_modal_projector
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in projector.parameters():
        parameter.requires_grad_(True)
    width = model.config.text_config.hidden_size
    num_tokens = projected(model, rows["train"][:1], cache).shape[1]
    torch.manual_seed(seed)
    readout = Readout(width, num_tokens)
    parameters = [*projector.parameters(), *readout.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=READOUT["learning_rate"], weight_decay=READOUT["weight_decay"])
    schedule = get_cosine_schedule_with_warmup(optimizer, round(READOUT["warmup_ratio"] * steps), steps)
    generator = torch.Generator().manual_seed(seed)
    train_rows, train_answers = rows["train"], splits["train"][1]
    order, position, losses, curve = torch.randperm(len(train_rows), generator=generator), 0, [], []
    model.train()
    for step in range(steps):
        if position + READOUT["batch_size"] > len(order):
            order, position = torch.randperm(len(train_rows), generator=generator), 0
        batch = order[position : position + READOUT["batch_size"]]
        position += READOUT["batch_size"]
        logits = readout(projected(model, train_rows[batch], cache))
        loss = sum(nn.functional.cross_entropy(lg, train_answers[batch, i]) for i, lg in enumerate(logits))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 250 == 0 or step + 1 == steps:
            readout.eval()
            val = accuracy(model, readout, rows["val"], splits["val"][1], cache)
            readout.train()
            curve.append({"step": step + 1, "loss": round(sum(losses[-250:]) / len(losses[-250:]), 4), "val": val})
            log(f"step {step + 1}: loss {curve[-1]['loss']:.3f}, val " + ", ".join(
                f"{qtype.split('_')[1]} {100 * val[qtype]:.1f}" for qtype in ANSWERS))  # fmt: skip
    model.eval()
    readout.eval()
    return {
        "test": accuracy(model, readout, rows["test"], splits["test"][1], cache),
        "val": curve[-1]["val"],
        "curve": curve,
        "train_loss": round(sum(losses) / len(losses), 4),
        "last_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
    }


def readout_one(variant: dict, seed: int, runs: Path, steps: int = READOUT["steps"], log=print) -> dict | None:
    """One (variant, seed) of the readout table; `RUNS/readout/<variant>-s<seed>.json`, skipped when it exists."""
    from .runs import build_variant, claim_run, run_identity

    name = f"{variant['name']}-s{seed}"
    path = runs / "readout" / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    lock = claim_run(path, name, log)
    if lock is None:
        return None
    try:
        started = time.perf_counter()
        # The language model only gives the projector its output width; the readout replaces it.
        model, _ = build_variant(variant, seed, runs)
        scores = train_readout(model, runs / "data", seed, steps=steps, log=lambda text: log(f"{name}: {text}"))
        result = {
            **run_identity(variant, seed),
            "readout": {**READOUT, "steps": steps},
            **scores,
            "wall_s": round(time.perf_counter() - started, 1),
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
        tmp.replace(path)
    finally:
        lock.unlink(missing_ok=True)
    log(f"{name}: test {result['test']['overall']:.3f} ({result['wall_s']:.0f} s)")
    return result
