"""Linear probes on a ScopeBench model's visual tokens: is the evidence still in what the projector hands the LLM?

For each image, the digit (9 classes) and the marked object's colour (6 classes) are predicted by a linear classifier
(multinomial logistic regression, standardised inputs, Adam with weight decay) from

- `@anchor`: the one projected token whose query anchor cell holds the digit's patch (the query grid is sqrt(M) x
  sqrt(M) over the 24 x 24 patches, in raster order, as MS-Resampler anchors its queries), and
- `@all`: all M projected tokens, concatenated.

Trained on the first images of the train split, scored on the test split. A probe high at initialisation and low after
training says training removed the evidence from the visual tokens; a probe high after training with the question at
chance says the language model does not read it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from . import generator as sb
from .runs import build_variant, variants

COLOURS = tuple(sb.COLOURS)


def first_scenes(data: Path, split: str, count: int) -> list[tuple[str, dict]]:
    """(image file, scene) of the first `count` images of `split`, from `qa-<split>.json`."""
    return list(sb.scenes_by_image(Path(data) / f"qa-{split}.json").items())[:count]


@torch.no_grad()
def visual_tokens(model, processor, images: list[Path], batch_size: int = 50) -> torch.Tensor:
    """(num_images, M, hidden): the projector's output tokens, as the language model receives them."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = [Image.open(path).convert("RGB") for path in images[start : start + batch_size]]
        pixel_values = processor.image_processor(batch, return_tensors="pt")["pixel_values"]
        features = model.model.get_image_features(
            pixel_values=pixel_values.to(model.device, model.dtype),
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        )
        out.append(torch.stack(list(features.pooler_output)).float().cpu())
    return torch.cat(out)


def targets(scenes: list[tuple[str, dict]], side: int) -> dict[str, torch.Tensor]:
    """Digit (0-8), marked object's colour (0-5) and the raster index of the query cell that holds the digit."""
    digit, colour, cell = [], [], []
    for _, scene in scenes:
        marked = next(o for o in scene["objects"] if o["digit"])
        digit.append(int(marked["digit"]) - 1)
        colour.append(COLOURS.index(marked["colour"]))
        cell.append(sb.patch_cell(*sb.centre_patch(marked), side))
    return {"digit": torch.tensor(digit), "colour": torch.tensor(colour), "cell": torch.tensor(cell)}


def linear_probe(x_train, y_train, x_test, y_test, num_classes: int, weight_decay: float = 1e-3, steps: int = 400,
                 seed: int = 0) -> dict[str, float]:  # fmt: skip
    """Multinomial logistic regression on standardised features; accuracy on the test and the training rows."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    torch.manual_seed(seed)
    linear = torch.nn.Linear(x_train.shape[1], num_classes)
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=weight_decay)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(linear(x_train), y_train).backward()
        optimizer.step()
    with torch.no_grad():
        return {
            "test": (linear(x_test).argmax(1) == y_test).float().mean().item(),
            "train": (linear(x_train).argmax(1) == y_train).float().mean().item(),
        }


def probe_model(
    model, processor, data: Path, train_images: int = 1500, test_images: int = 300, steps: int = 400
) -> dict:
    """The four probes (digit / colour, @anchor / @all) of one model, `steps` optimizer steps each; accuracies."""
    data = Path(data)
    train, test = first_scenes(data, "train", train_images), first_scenes(data, "test", test_images)
    x_train = visual_tokens(model, processor, [data / "images" / name for name, _ in train])
    x_test = visual_tokens(model, processor, [data / "images" / name for name, _ in test])
    side = round(x_train.shape[1] ** 0.5)
    if side * side != x_train.shape[1] or sb.GRID % side:
        raise ValueError(f"the probe needs a square query grid dividing {sb.GRID}, got M = {x_train.shape[1]}")
    y_train, y_test = targets(train, side), targets(test, side)
    anchor_train = x_train[torch.arange(len(x_train)), y_train["cell"]]
    anchor_test = x_test[torch.arange(len(x_test)), y_test["cell"]]
    result = {"M": x_train.shape[1], "train_images": len(train), "test_images": len(test)}
    for target, classes in (("digit", 9), ("colour", 6)):
        result[f"{target}@anchor"] = linear_probe(
            anchor_train, y_train[target], anchor_test, y_test[target], classes, steps=steps
        )
        result[f"{target}@all"] = linear_probe(
            x_train.flatten(1),
            y_train[target],
            x_test.flatten(1),
            y_test[target],
            classes,
            weight_decay=1e-2,
            steps=steps,
        )
    return result


def probe_runs(runs: Path, data: Path, names: list[str], init_variants: list[str]):
    """Yields (name, probes) for finished runs and for fresh projectors (`init-<variant>`, seed 0); each result is
    also written to RUNS/probes/<name>.json."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    by_name = {v["name"]: v for v in variants()}
    for name in [*names, *(f"init-{v}" for v in init_variants)]:
        if name.startswith("init-"):
            variant = by_name.get(name[len("init-") :])
            if variant is None or variant["kind"] != "ms":
                raise ValueError(f"--init takes MS-Resampler variant names, got {name[len('init-') :]!r}")
            model, processor = build_variant(variant, 0, runs)
        else:
            folder = runs / "models" / name / "stage2"
            if not folder.is_dir():
                raise ValueError(f"no finished run {name!r}: {folder} does not exist")
            model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
            processor = AutoProcessor.from_pretrained(folder)
        result = probe_model(model, processor, data)
        (runs / "probes").mkdir(exist_ok=True)
        (runs / "probes" / f"{name}.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
        yield name, result


# --------------------------------------------------------------------------------------------- CLI
