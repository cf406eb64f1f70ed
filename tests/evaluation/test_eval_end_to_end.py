"""The paper's workflow on tiny parts, end to end with the field's tools: compose a CLIP tower and a Llama LLM ->
train the two stages (a few steps) -> `ms-llava eval` (the real lmms-eval, on a local copy of its GQA task) ->
`ms-llava push --results` to the loopback Hub -> the card read back from the Hub carries the evaluated numbers, which
equal the GQA metric computed by hand from the trained model's own `generate`."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard
from lmms_helpers import POST_PROMPT, load, reference_answer, write_local_task
from transformers import CLIPVisionModel, LlamaForCausalLM

from ms_llava.cli import main
from ms_llava.compose import compose
from ms_llava.testing_utils import (
    COLOUR_QUESTION,
    COLOURS,
    SHAPE_QUESTION,
    SHAPES,
    build_tiny_tokenizer,
    draw_shape,
    tiny_text_config,
    tiny_vision_config,
    write_shapes_dataset,
)
from ms_llava.training import train

CLIP_PREPROCESSING = {
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
}


def write_parts(root):
    """A tiny CLIP vision tower (32 px, patch 4) and a tiny Llama with its tokenizer, as transformers saves them."""
    tower = root / "clip"
    CLIPVisionModel(tiny_vision_config()).save_pretrained(tower)
    (tower / "preprocessor_config.json").write_text(json.dumps(CLIP_PREPROCESSING), encoding="utf-8")
    llm = root / "llama"
    tokenizer = build_tiny_tokenizer(with_image_token=False)
    LlamaForCausalLM(tiny_text_config(tokenizer, pad_token_id=None)).save_pretrained(llm)  # a config with no pad token
    tokenizer.save_pretrained(llm)
    return tower, llm


@pytest.mark.slow
def test_compose_train_eval_push_card(tmp_path, hub, capsys):
    import torch

    torch.manual_seed(0)
    tower, llm = write_parts(tmp_path / "parts")
    composed = tmp_path / "composed"
    compose(
        tower,
        llm,
        composed,
        num_queries=16,
        scope_windows=[2, 4, 8],
        resampler_kwargs={"hidden_size": 20, "num_attention_heads": 2, "fusion_hidden_size": 5},
        log=lambda line: None,
    )
    data = tmp_path / "data"
    captions, questions = write_shapes_dataset(data, "caption", 16), write_shapes_dataset(data, "qa", 32)
    run = {"global_batch_size": 8, "dataloader_num_workers": 0, "save_steps": 1000, "warmup_ratio": 0.1}
    train(composed, "pretrain", captions, data / "images", tmp_path / "stage1", learning_rate=1e-2, max_steps=2, **run)
    # the paper's stage-2 learning rate (2e-5) would not move a random tiny model in a few steps
    train(tmp_path / "stage1", "finetune", questions, data / "images", tmp_path / "stage2", learning_rate=1e-2,
          max_steps=16, **run)  # fmt: skip
    trained = tmp_path / "stage2"

    # a local copy of lmms-eval's GQA task: colour and shape questions about coloured shapes
    import random

    rng = random.Random(5)
    columns = {"id": [], "question": [], "answer": [], "image": []}
    for index in range(8):
        colour, shape = list(COLOURS)[index % len(COLOURS)], SHAPES[(index // 2) % 2]
        columns["id"].append(str(index))
        columns["question"].append(COLOUR_QUESTION if index % 2 else SHAPE_QUESTION)
        columns["answer"].append(colour if index % 2 else shape)
        columns["image"].append(draw_shape(colour, shape, rng))
    tasks = write_local_task(
        tmp_path, "gqa_local", {"testdev": columns}, builtin="gqa/gqa.yaml", dataset_name="null", process_docs="null"
    )
    results_file = tmp_path / "results.json"
    argv = ["eval", "--model", str(trained), "--tasks", "gqa_local", "--include-path", str(tasks)]
    assert main([*argv, "--output", str(results_file), "--batch-size", "4"]) == 0
    results = json.loads(results_file.read_text())

    model, processor = load(trained)
    answers = [
        reference_answer(model, processor, question + POST_PROMPT, [image], 16)
        for question, image in zip(columns["question"], columns["image"], strict=True)
    ]
    hits = [a.lower().strip(".") == t for a, t in zip(answers, columns["answer"], strict=True)]
    assert results == {"GQA": round(100 * sum(hits) / len(hits), 4)}, answers
    assert 0 < sum(hits), answers  # the trained model answers some questions: the number is not a default

    repo_id = "ms-llava-test/composed-evaluated"
    assert main(["push", str(trained), repo_id, "--results", str(results_file), "--training", "paper"]) == 0
    card = ModelCard.load(repo_id)
    assert f"| GQA | {results['GQA']:g} |" in card.text
    assert "No evaluation results" not in card.text
