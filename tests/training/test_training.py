"""Training (ms_llava.training): the paper's two-stage recipe on transformers' Trainer, on CPU: options, data
encoding and the pre-pass, the two stages, checkpoints and resume, LoRA, the command, the Hub push.

The data are generated (conftest `shapes`). The tiny random model needs hyper-parameters of its own to learn anything
in seconds (TINY_RECIPE, docs/training.md). Every run uses one intra-op thread and no data-loader workers.
"""

import csv
import io
import json
import re
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

import ms_llava
from ms_llava import LLAVA_1_5_CHAT_TEMPLATE
from ms_llava.recipes import LORA_DEFAULTS, PAPER_RECIPES
from ms_llava.testing_utils import answer_accuracy
from ms_llava.training import add_arguments
from ms_llava.training.adapters import language_model_lora_targets
from ms_llava.training.arguments import MSLlavaTrainingArguments, gradient_accumulation_steps
from ms_llava.training.data import (
    IGNORE_INDEX,
    BadRecordsError,
    ChatTemplateError,
    Conversation,
    RightPaddingCollator,
    SupervisedDataset,
    check_records,
    encode_conversation,
    llava_record_to_conversation,
    load_training_records,
)
from ms_llava.training.trainer import complete_checkpoints, train

ACCELERATE_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
RUN = {"dataloader_num_workers": 0, "save_steps": 1000, "warmup_ratio": 0.1}  # test runs: no workers, no saves
# Overrides that let the tiny random model learn the shapes task in seconds (the paper's lr 1e-5 would not move it).
TINY_RECIPE = {
    "warm-up": {"global_batch_size": 8, "learning_rate": 1e-2, "num_train_epochs": 10},  # stands in for the LLM
    "pretrain": {"global_batch_size": 8, "learning_rate": 1e-2, "num_train_epochs": 8},
    "finetune": {"global_batch_size": 8, "learning_rate": 3e-3, "num_train_epochs": 10},
}
# one thread: training runs are small, and with two their timing gets erratic on a 2-core machine
pytestmark = pytest.mark.usefixtures("one_thread")


def read_loss_log(output_dir: Path) -> list[tuple[int, float]]:
    with open(output_dir / "loss_log.csv", encoding="utf-8") as handle:
        return [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(handle)]


def accuracy(checkpoint: Path, shapes) -> float:
    model = AutoModelForImageTextToText.from_pretrained(checkpoint)
    processor = AutoProcessor.from_pretrained(checkpoint)
    return answer_accuracy(model, processor, shapes["held_out"], shapes["images"])


# --------------------------------------------------------------------------------------------- recipe and batch


def test_paper_recipe_is_the_default_and_every_setting_can_be_overridden():
    pretrain, finetune = MSLlavaTrainingArguments.for_stage("pretrain"), MSLlavaTrainingArguments.for_stage("finetune")
    assert (pretrain.learning_rate, pretrain.global_batch_size, pretrain.num_train_epochs) == (1e-3, 32, 1.0)
    assert (finetune.learning_rate, finetune.global_batch_size, finetune.num_train_epochs) == (1e-5, 16, 1.0)
    assert PAPER_RECIPES["pretrain"].trained_modules == ("model.multi_modal_projector",)
    assert PAPER_RECIPES["finetune"].trained_modules == (
        "model.multi_modal_projector",
        "model.language_model",
        "lm_head",
    )
    assert (finetune.lr_scheduler_type, finetune.warmup_ratio, finetune.weight_decay) == ("cosine", 0.03, 0.0)
    assert finetune.max_length == 2048 and finetune.projector_learning_rate is None

    custom = MSLlavaTrainingArguments.for_stage("finetune", learning_rate=2e-5, global_batch_size=128, max_length=512)
    assert (custom.learning_rate, custom.global_batch_size, custom.max_length) == (2e-5, 128, 512)
    lora = MSLlavaTrainingArguments.for_stage("finetune", lora=True)
    assert (lora.learning_rate, lora.projector_learning_rate) == (2e-4, 2e-5) == tuple(LORA_DEFAULTS.values())
    assert MSLlavaTrainingArguments.for_stage("finetune", lora=True, learning_rate=1e-3).learning_rate == 1e-3
    assert MSLlavaTrainingArguments.for_stage("finetune", qlora=True).lora

    with pytest.raises(ValueError, match=r"unknown training option\(s\) \['learning_rat'\]"):
        MSLlavaTrainingArguments.for_stage("pretrain", learning_rat=1.0)
    with pytest.raises(ValueError, match="stage must be one of"):
        MSLlavaTrainingArguments.for_stage("sft")
    with pytest.raises(ValueError, match="global_batch_size must be a positive number, got 0"):
        MSLlavaTrainingArguments.for_stage("pretrain", global_batch_size=0)
    with pytest.raises(ValueError, match="'pretrain' stage keeps frozen"):
        MSLlavaTrainingArguments.for_stage("pretrain", lora=True)


def test_the_options_are_training_arguments_with_the_recipe_as_preset():
    """The options object is what Trainer gets: the batch layout, warm-up, data seed and activation checkpointing
    follow from ms-llava's options (and are no options themselves); other TrainingArguments options pass through;
    --push-to-hub names the repository without turning on Trainer's own per-checkpoint push."""
    from transformers import TrainingArguments

    config = MSLlavaTrainingArguments.for_stage(
        "pretrain",
        per_device_batch_size=4,
        warmup_ratio=0.1,
        seed=7,
        gradient_checkpointing=True,
        optim="sgd",
        push_to_hub="org/name",
    )
    assert isinstance(config, TrainingArguments)
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps) == (4, 8)  # 32 = 4 x 8 x 1
    assert (config.warmup_steps, config.data_seed, config.activation_checkpointing) == (0.1, 7, True)
    assert (config.learning_rate, config.num_train_epochs, config.max_steps) == (1e-3, 1.0, -1)
    assert config.optim == "sgd" and config.remove_unused_columns is False
    assert (config.push_to_hub, config.hub_model_id) == (False, "org/name")
    assert MSLlavaTrainingArguments.for_stage("finetune", adapter="scale").learning_rate == 2e-2  # ScAle's preset
    for derived in ("per_device_train_batch_size", "gradient_accumulation_steps", "warmup_steps", "data_seed"):
        with pytest.raises(ValueError, match=rf"unknown training option\(s\) \['{derived}'\]"):
            MSLlavaTrainingArguments.for_stage("pretrain", **{derived: 1})
    with pytest.raises(ValueError, match=r"\['learning_rat'\]; did you mean learning_rate\b"):
        MSLlavaTrainingArguments.for_stage("pretrain", learning_rat=1.0)


@pytest.mark.parametrize(
    ("global_batch", "per_device", "world", "accumulation"),
    [(32, 32, 1, 1), (32, 4, 1, 8), (32, 4, 2, 4), (16, 2, 8, 1), (128, 4, 8, 4)],
)
def test_gradient_accumulation_follows_from_the_global_batch(global_batch, per_device, world, accumulation):
    assert gradient_accumulation_steps(global_batch, per_device, world) == accumulation
    config = MSLlavaTrainingArguments.for_stage(
        "pretrain", global_batch_size=global_batch, per_device_batch_size=per_device
    )
    assert config.batch_layout(world) == (per_device, accumulation)


def test_a_global_batch_that_does_not_divide_is_refused():
    with pytest.raises(ValueError, match=r"global batch size 32 is not a multiple of per-device batch size 6 x 2 "):
        gradient_accumulation_steps(32, 6, 2)
    with pytest.raises(ValueError, match=r"global batch size 16 is not divisible by the 3 processes"):
        MSLlavaTrainingArguments.for_stage("finetune").batch_layout(3)
    assert MSLlavaTrainingArguments.for_stage("finetune").batch_layout(4) == (4, 1)  # default: no accumulation


# --------------------------------------------------------------------------------------------- data


def test_llava_records_become_chat_messages_with_the_image_first():
    record = {
        "id": "r1",
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "What is it?\n<image>"},
            {"from": "gpt", "value": "A circle."},
            {"from": "human", "value": "Colour?"},
            {"from": "gpt", "value": "red"},
        ],
    }
    conversation = llava_record_to_conversation(record, Path("/data"))
    assert conversation.record_id == "r1" and conversation.images == ["/data/a.png"]
    assert conversation.messages == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A circle."}]},
        {"role": "user", "content": [{"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]
    text_only = llava_record_to_conversation({"conversations": record["conversations"][2:]}, None)
    assert text_only.images == [] and text_only.record_id is None


def test_labels_are_the_assistant_tokens_only_as_built_by_hand(tiny, image):
    """Labels from the chat template's generation markers equal a mask built by hand from the template's pieces."""
    _, processor = tiny
    conversation = Conversation(
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
            {"role": "user", "content": [{"type": "text", "text": "What shape is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "circle"}]},
        ],
        [image],
    )
    example = encode_conversation(processor, conversation)
    pieces = [  # (text, trained): LLaVA-1.5's "USER: ... ASSISTANT: reply</s>" with M = 16 image tokens
        ("USER: " + "<image>" * 16 + "\nWhat colour is the shape? ASSISTANT:", False),
        (" red", True),
        ("</s>", True),
        ("USER: What shape is it? ASSISTANT:", False),
        (" circle", True),
        ("</s>", True),
    ]
    input_ids, labels = [], []
    for text, trained in pieces:
        ids = processor.tokenizer.encode(text, add_special_tokens=False)
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    assert example["input_ids"].tolist() == input_ids
    assert example["labels"].tolist() == labels
    image_positions = example["input_ids"] == processor.image_token_id
    assert image_positions.sum() == 16 and (example["labels"][image_positions] == IGNORE_INDEX).all()
    assert example["pixel_values"].shape == (1, 3, 32, 32)
    truncated = encode_conversation(processor, conversation, max_length=40)
    assert truncated["labels"].tolist() == labels[:40]


def test_right_padded_batch_gives_each_example_its_own_loss(tiny, image):
    """Right padding keeps every sequence at positions 0..n-1 and masks the padding: the batch loss is the
    token-weighted mean of the examples' losses computed one by one."""
    model, processor = tiny
    question = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}
    conversations = [
        Conversation([question, {"role": "assistant", "content": [{"type": "text", "text": "red"}]}], [image]),
        Conversation(
            [
                {"role": "user", "content": [{"type": "text", "text": "Describe the picture in words."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A green triangle above a star."}]},
            ]
        ),
        Conversation(
            [question, {"role": "assistant", "content": [{"type": "text", "text": "one two three"}]}], [image]
        ),
    ]
    examples = [encode_conversation(processor, conversation) for conversation in conversations]
    collator = RightPaddingCollator(processor.tokenizer.pad_token_id)
    batch = collator(examples)
    lengths = [len(example["input_ids"]) for example in examples]
    assert batch["input_ids"].shape == (3, max(lengths)) and batch["pixel_values"].shape == (2, 3, 32, 32)
    for row, length in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (max(lengths) - length)
        assert (batch["input_ids"][row, length:] == processor.tokenizer.pad_token_id).all()
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
    with torch.no_grad():
        batch_loss = model(**batch).loss
        sums, counts = [], []
        for example in [collator([example]) for example in examples]:
            count = int((example["labels"][:, 1:] != IGNORE_INDEX).sum())
            sums.append(model(**example).loss * count)
            counts.append(count)
    torch.testing.assert_close(batch_loss, sum(sums) / sum(counts), rtol=1e-5, atol=1e-6)


def test_messages_datasets_encode_exactly_like_llava_json(tiny, shapes, tmp_path):
    """The same records as a datasets.Dataset (PIL images), a save_to_disk folder, a JSONL file with image paths and
    a Parquet file (image bytes) give the same tokens, labels and pixels as the LLaVA JSON."""
    datasets = pytest.importorskip("datasets")
    _, processor = tiny
    llava = json.loads(shapes["qa"].read_text())[:4]
    rows = []
    for record in llava:
        turns = record["conversations"]
        messages = [
            {
                "role": "user" if turn["from"] == "human" else "assistant",
                "content": ([{"type": "image"}] if "<image>" in turn["value"] else [])
                + [{"type": "text", "text": turn["value"].replace("<image>", "").strip()}],
            }
            for turn in turns
        ]
        rows.append({"id": record["id"], "messages": messages, "images": [record["image"]]})
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    reference = load_training_records(tmp_path / "llava.json", shapes["images"])

    with_pil = [{**row, "images": [Image.open(shapes["images"] / row["images"][0])]} for row in rows]
    dataset = datasets.Dataset.from_list(with_pil)
    dataset.save_to_disk(str(tmp_path / "on_disk"))
    dataset.to_parquet(str(tmp_path / "data.parquet"))
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    sources = [
        load_training_records(dataset),
        load_training_records(tmp_path / "on_disk"),
        load_training_records(tmp_path / "data.parquet"),
        load_training_records(tmp_path / "data.jsonl", shapes["images"]),
    ]
    for source in sources:
        check = check_records(source, processor, max_length=2048)
        assert check.kept == [0, 1, 2, 3] and not check.problems, source.description
        for index in range(4):
            expected = encode_conversation(processor, reference[index])
            got = encode_conversation(processor, source[index])
            assert source[index].record_id == llava[index]["id"]
            for key in ("input_ids", "labels", "pixel_values"):
                torch.testing.assert_close(got[key], expected[key], msg=f"{source.description}: {key}")


@pytest.mark.slow
def test_bad_records_are_found_before_the_model_loads_and_named(tiny_dir, shapes, tmp_path, caplog):
    good = json.loads(shapes["qa"].read_text())[:8]
    image = good[0]["image"]
    question, answer = {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}
    long_question = {"from": "human", "value": "<image>\n" + "one two three " * 20}
    bad = [
        {"id": "missing-image", "image": "no-such-file.png", "conversations": [question, answer]},
        {
            "id": "two-markers",
            "image": image,
            "conversations": [{"from": "human", "value": "<image><image>Hi"}, answer],
        },
        {"id": "no-conversations", "image": image},
        {"id": "wrong-role", "image": image, "conversations": [question, {"from": "bot", "value": "red"}]},
        {"id": "empty-answer", "image": image, "conversations": [question, {"from": "gpt", "value": "  "}]},
        {"id": "starts-with-gpt", "image": image, "conversations": [answer, question, answer]},
        {"id": "image-in-answer", "image": image, "conversations": [question, {"from": "gpt", "value": "<image>"}]},
        {"id": "no-answer-fits", "image": image, "conversations": [long_question, answer]},
        {
            "id": "images-do-not-fit",
            "image": [image] * 3,
            "conversations": [{"from": "human", "value": "<image>" * 3}, answer],
        },
        "not a record",
    ]
    records = good[:4] + bad + good[4:]
    (tmp_path / "mixed.json").write_text(json.dumps(records))
    settings = {"global_batch_size": 4, "max_length": 40, "max_steps": 1, **RUN}

    with mock.patch("ms_llava.training.trainer.load_model", side_effect=AssertionError("the model was loaded")):
        with pytest.raises(BadRecordsError) as caught:
            train(tiny_dir, "finetune", tmp_path / "mixed.json", shapes["images"], tmp_path / "out", **settings)
    message = str(caught.value)
    assert "10 of 18 training records are bad" in message and "--skip-bad-records" in message
    expected = [
        (4, "missing-image", "missing or unreadable image: image file not found: "),
        (5, "two-markers", "image count mismatch: the conversation has 2 <image> but the record gives 1 image"),
        (6, "no-conversations", "malformed record: missing or empty 'conversations'"),
        (7, "wrong-role", "malformed record: turn 1 is from 'bot'; expected 'human' or 'gpt'"),
        (8, "empty-answer", "malformed record: assistant turn 1 is empty"),
        (9, "starts-with-gpt", "malformed record: message 0 is from 'assistant'; expected 'user'"),
        (10, "image-in-answer", "image count mismatch: assistant turn 1 contains <image>"),
    ]
    for index, record_id, reason in expected:
        assert f"record {index} (id '{record_id}'): {reason}" in message
    problems = {problem.index: problem for problem in caught.value.problems}
    assert "no assistant token would be left" in problems[11].reason
    assert "truncation would cut image tokens" in problems[12].reason
    assert problems[13].record_id is None and "expected a JSON object" in problems[13].reason

    with caplog.at_level("WARNING", logger="ms_llava.training.trainer"):
        result = train(
            tiny_dir,
            "finetune",
            tmp_path / "mixed.json",
            shapes["images"],
            tmp_path / "out",
            skip_bad_records=True,
            **settings,
        )
    assert result.num_examples == 8 and len(result.skipped) == 10 and result.global_step == 1
    assert "skipping 10 bad record(s)" in caplog.text
    skipped = [json.loads(line) for line in (tmp_path / "out" / "skipped_records.jsonl").read_text().splitlines()]
    assert [entry["index"] for entry in skipped] == list(range(4, 14))


def strip_generation_markers(template: str) -> str:
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)


def checkpoint_with_template(tiny_dir: Path, directory: Path, chat_template: str) -> Path:
    """A copy of the tiny checkpoint whose processor has `chat_template`."""
    shutil.copytree(tiny_dir, directory)
    processor = AutoProcessor.from_pretrained(directory)
    processor.chat_template = chat_template
    processor.save_pretrained(directory)
    return directory


@pytest.mark.slow
def test_a_chat_template_that_marks_no_assistant_token_stops_the_run_before_training(tiny_dir, shapes, tmp_path):
    """Without {% generation %} markers (llava-hf's templates have none) every label would be -100 and the loss 0;
    the run stops before the model loads, saying how to fix the template. The fix it names makes the run train."""
    settings = {"global_batch_size": 4, "max_steps": 2, **RUN}
    markerless = checkpoint_with_template(
        tiny_dir, tmp_path / "markerless", strip_generation_markers(LLAVA_1_5_CHAT_TEMPLATE)
    )
    with mock.patch("ms_llava.training.trainer.load_model", side_effect=AssertionError("the model was loaded")):
        with pytest.raises(ChatTemplateError) as caught:
            train(markerless, "finetune", shapes["qa"], shapes["images"], tmp_path / "out", **settings)
    message = str(caught.value)
    assert "chat template marks no assistant tokens" in message
    assert "no {% generation %} ... {% endgeneration %} markers" in message and "learn nothing" in message
    assert "processor.chat_template = ms_llava.LLAVA_1_5_CHAT_TEMPLATE; processor.save_pretrained(MODEL)" in message
    assert not (tmp_path / "out").exists()

    # Markers that never render: found from the token masks the length check computes anyway.
    processor = AutoProcessor.from_pretrained(markerless)
    unused = "{%- if false -%}{%- generation -%}x{%- endgeneration -%}{%- endif -%}"
    processor.chat_template = unused + processor.chat_template
    with pytest.raises(ChatTemplateError, match=r"its \{% generation %\} markers enclose no token of any of the 96 "):
        check_records(load_training_records(shapes["qa"], shapes["images"]), processor, max_length=2048)

    # The fix the message gives.
    processor = AutoProcessor.from_pretrained(markerless)
    processor.chat_template = ms_llava.LLAVA_1_5_CHAT_TEMPLATE
    processor.save_pretrained(markerless)
    result = train(markerless, "finetune", shapes["qa"], shapes["images"], tmp_path / "fixed", **settings)
    assert len(result.losses) == 2 and all(loss > 1.0 for _, loss in result.losses), result.losses


@pytest.mark.slow
def test_a_record_without_assistant_tokens_is_a_bad_record(tiny_dir, shapes, tmp_path):
    """A record whose assistant turns the template keeps outside its generation markers is named (and skippable);
    a data set of one record with an empty or an all-truncated answer names that record, not the template."""
    # A template that does not train on "n/a" answers: they render outside the markers.
    template = LLAVA_1_5_CHAT_TEMPLATE.replace(
        "{{ 'ASSISTANT:' }}{%- generation -%}",
        "{{ 'ASSISTANT:' }}{%- if (message['content'] | map(attribute='text') | join) == 'n/a' -%}"
        "{{ ' n/a' }}{{ eos_token }}{%- else -%}{%- generation -%}",
    ).replace("{{ eos_token }}{%- endgeneration -%}", "{{ eos_token }}{%- endgeneration -%}{%- endif -%}")
    checkpoint = checkpoint_with_template(tiny_dir, tmp_path / "model", template)
    good = json.loads(shapes["qa"].read_text())[:4]
    question = {"from": "human", "value": "<image>\nWhat colour?"}
    unlabelled = {"id": "n-a", "image": good[0]["image"], "conversations": [question, {"from": "gpt", "value": "n/a"}]}
    (tmp_path / "data.json").write_text(json.dumps(good[:2] + [unlabelled] + good[2:]))
    settings = {"global_batch_size": 4, "max_steps": 1, **RUN}
    with mock.patch("ms_llava.training.trainer.load_model", side_effect=AssertionError("the model was loaded")):
        with pytest.raises(BadRecordsError) as caught:
            train(checkpoint, "finetune", tmp_path / "data.json", shapes["images"], tmp_path / "out", **settings)
    assert "1 of 5 training records are bad (1 no assistant tokens)" in str(caught.value)
    assert "record 2 (id 'n-a'): no assistant tokens: the chat template marks none of its tokens" in str(caught.value)
    result = train(
        checkpoint,
        "finetune",
        tmp_path / "data.json",
        shapes["images"],
        tmp_path / "out",
        skip_bad_records=True,
        **settings,
    )
    assert result.num_examples == 4 and [problem.record_id for problem in result.skipped] == ["n-a"]

    long_question = {"from": "human", "value": "<image>\n" + "one two three " * 20}
    for name, record, reason in (
        (
            "empty",
            {"id": "e", "image": good[0]["image"], "conversations": [question, {"from": "gpt", "value": ""}]},
            "record 0 (id 'e'): malformed record: assistant turn 1 is empty",
        ),
        (
            "truncated",
            {"id": "t", "image": good[0]["image"], "conversations": [long_question, good[0]["conversations"][1]]},
            "record 0 (id 't'): too long: ",
        ),
    ):
        (tmp_path / f"{name}.json").write_text(json.dumps([record]))
        with mock.patch("ms_llava.training.trainer.load_model", side_effect=AssertionError("the model was loaded")):
            with pytest.raises(BadRecordsError, match="1 of 1 training records are bad") as caught:
                train(
                    tiny_dir,
                    "finetune",
                    tmp_path / f"{name}.json",
                    shapes["images"],
                    tmp_path / name,
                    max_length=40,
                    **settings,
                )
        assert reason in str(caught.value)
    assert "no assistant token would be left" in str(caught.value)


def corrupt_png_bytes() -> tuple[bytes, bytes]:
    """A PNG cut in the middle of its pixel data (the header reads, decoding fails) and bytes that are no image."""
    pixels = torch.randint(0, 256, (32, 32, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, "PNG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2], b"not an image at all" * 10


@pytest.mark.slow
def test_corrupt_images_are_found_by_the_pre_pass_or_named_when_training_hits_them(tiny, tiny_dir, shapes, tmp_path):
    """By default the pre-pass reads every image's header (bytes that are no image are bad records); a file cut after
    its header needs --verify-images (a full decode, embedded bytes included). Without it, training stops on such an
    image with a ValueError naming the record and the image, the PIL error chained."""
    datasets = pytest.importorskip("datasets")
    _, processor = tiny
    truncated, garbage = corrupt_png_bytes()
    images = tmp_path / "images"
    shutil.copytree(shapes["images"], images)
    (images / "truncated.png").write_bytes(truncated)
    (images / "garbage.png").write_bytes(garbage)
    good = json.loads(shapes["qa"].read_text())[:4]
    conversations = good[0]["conversations"]
    records = [
        *good[:2],
        {"id": "cut", "image": "truncated.png", "conversations": conversations},
        {"id": "junk", "image": "garbage.png", "conversations": conversations},
        *good[2:],
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    llava = load_training_records(tmp_path / "data.json", images)

    default = check_records(llava, processor, max_length=2048)
    assert [(problem.index, problem.record_id) for problem in default.problems] == [(3, "junk")]
    assert "cannot read image " + str(images / "garbage.png") + ": UnidentifiedImageError" in str(default.problems[0])
    verified = check_records(llava, processor, max_length=2048, verify_images=True)
    assert [(problem.index, problem.record_id) for problem in verified.problems] == [(2, "cut"), (3, "junk")]
    assert "cannot read image " + str(images / "truncated.png") + ": OSError" in str(verified.problems[0])

    # (b) a record that fails while training: index, id and image named, the PIL error chained
    dataset = SupervisedDataset(llava, default.kept, processor, 2048)
    dataset[0]
    with pytest.raises(ValueError) as caught:
        dataset[default.kept.index(2)]
    message = str(caught.value)
    assert (
        f"cannot load or encode training record 2 (id 'cut'), image(s) {images / 'truncated.png'}: OSError" in message
    )
    assert "--verify-images" in message and isinstance(caught.value.__cause__, OSError)
    with pytest.raises(ValueError, match=r"record 2 \(id 'cut'\), image\(s\) .*truncated\.png: OSError"):
        train(
            tiny_dir,
            "finetune",
            tmp_path / "data.json",
            images,
            tmp_path / "out",
            skip_bad_records=True,
            global_batch_size=5,
            max_steps=1,
            **RUN,
        )

    # (a) embedded bytes in a data set (here a single .arrow file): checked alike
    rows = [
        {
            "id": record["id"],
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
            ],
            "images": [{"bytes": (images / record["image"]).read_bytes(), "path": record["image"]}],
        }
        for record in records
    ]
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "messages": [
                {
                    "role": datasets.Value("string"),
                    "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}],
                }
            ],
            "images": datasets.List(datasets.Image()),
        }
    )
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "saved"))
    (arrow_file,) = (tmp_path / "saved").glob("*.arrow")
    embedded = load_training_records(arrow_file)
    default = check_records(embedded, processor, max_length=2048)
    assert [(problem.index, problem.record_id) for problem in default.problems] == [(3, "junk")]
    assert "embedded image bytes (190 bytes, path 'garbage.png')" in str(default.problems[0])
    verified = check_records(embedded, processor, max_length=2048, verify_images=True)
    assert [(problem.index, problem.record_id) for problem in verified.problems] == [(2, "cut"), (3, "junk")]
    assert (
        f"embedded image bytes ({len(truncated)} bytes, path 'truncated.png'): OSError" in verified.problems[0].reason
    )
    dataset = SupervisedDataset(embedded, default.kept, processor, 2048)
    with pytest.raises(ValueError) as caught:  # datasets decodes the image when the row is read
        dataset[default.kept.index(2)]
    assert (
        f"record 2 (id 'cut'), image(s) embedded image bytes ({len(truncated)} bytes, path 'truncated.png'): OSError"
        in str(caught.value)
    )
    assert isinstance(caught.value.__cause__, OSError)


# --------------------------------------------------------------------------------------------- the two stages


@pytest.fixture(scope="module")
def two_stages(tiny_dir, shapes, tmp_path_factory):
    """An LLM warm-up on text, then stage 1 (pretrain) and stage 2 (finetune), with held-out accuracy at each point."""
    root = tmp_path_factory.mktemp("two_stages")
    runs, accuracies = {}, {"untrained": accuracy(tiny_dir, shapes)}
    start = tiny_dir
    for name, stage, data in (
        ("warm-up", "finetune", "text"),
        ("pretrain", "pretrain", "caption"),
        ("finetune", "finetune", "qa"),
    ):
        runs[name] = train(start, stage, shapes[data], shapes["images"], root / name, **TINY_RECIPE[name], **RUN)
        start = root / name
        accuracies[name] = accuracy(start, shapes)
    for name, result in runs.items():
        losses = [round(loss, 3) for _, loss in result.losses]
        print(f"{name}: {result.global_step} steps in {result.wall_time_s:.1f} s, losses {losses}")
    print(f"held-out exact-match accuracy: {accuracies}")
    return runs, accuracies, {"base": tiny_dir, **{name: root / name for name in runs}}


def tensors(directory: Path, prefix: str) -> dict:
    return {key: value for key, value in load_file(directory / "model.safetensors").items() if key.startswith(prefix)}


def changed(before: Path, after: Path, prefix: str) -> bool:
    old, new = tensors(before, prefix), tensors(after, prefix)
    assert old and old.keys() == new.keys()
    return any(not torch.equal(old[key], new[key]) for key in old)


@pytest.mark.slow
def test_stage_1_trains_only_the_projector_and_stage_2_also_the_llm(two_stages):
    _, _, dirs = two_stages
    assert changed(dirs["warm-up"], dirs["pretrain"], "model.multi_modal_projector.")
    assert not changed(dirs["warm-up"], dirs["pretrain"], "model.language_model.")
    assert not changed(dirs["warm-up"], dirs["pretrain"], "lm_head.")
    assert changed(dirs["pretrain"], dirs["finetune"], "model.multi_modal_projector.")
    assert changed(dirs["pretrain"], dirs["finetune"], "model.language_model.")
    assert changed(dirs["pretrain"], dirs["finetune"], "lm_head.")
    for before, after in (("base", "warm-up"), ("warm-up", "pretrain"), ("pretrain", "finetune")):
        assert not changed(dirs[before], dirs[after], "model.vision_tower.")


@pytest.mark.slow
def test_both_stages_lower_the_loss_and_the_model_answers_better(two_stages):
    runs, accuracies, dirs = two_stages
    for stage in ("pretrain", "finetune"):
        losses = [loss for _, loss in runs[stage].losses]
        final = sum(losses[-5:]) / 5
        assert final < 0.5 * losses[0], f"{stage}: {losses[0]:.3f} -> {final:.3f}"
    # Stage 1 gets below what a caption costs without looking at the image: colour and shape guessed cost ln 8
    # nats per caption of 6.25 answer tokens on average (" A red circle.</s>" is 6), 0.33 per token. The projector
    # carries what the image shows into the frozen LLM.
    assert sum(loss for _, loss in runs["pretrain"].losses[-10:]) / 10 < 0.25
    assert accuracies["untrained"] < 0.1 and accuracies["warm-up"] <= 0.4
    assert accuracies["finetune"] >= 0.6 and accuracies["finetune"] >= accuracies["warm-up"] + 0.3, accuracies


@pytest.mark.slow
def test_the_final_model_is_a_complete_hf_checkpoint(two_stages):
    runs, _, dirs = two_stages
    final = dirs["finetune"]
    for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "trainer_state.json"):
        assert (final / name).is_file(), name
    for module in ("configuration", "modeling", "processing", "image_processing"):
        assert (final / f"{module}_ms_llava.py").is_file()
    assert json.loads((final / "config.json").read_text())["auto_map"]["AutoModelForImageTextToText"]
    # the processor is saved as it was given: no truncation settings picked up on the way
    assert "max_length" not in json.loads((final / "tokenizer_config.json").read_text())
    assert read_loss_log(final) == runs["finetune"].losses
    assert len(runs["finetune"].losses) == runs["finetune"].global_step == 120  # 96 records / 8 x 10 epochs
    history = json.loads((final / "trainer_state.json").read_text())["log_history"]
    assert [entry["loss"] for entry in history if "loss" in entry] == [loss for _, loss in runs["finetune"].losses]
    # save_steps 1000 is never reached; Trainer also saves at the last step
    assert [path.name for path in complete_checkpoints(final)] == ["checkpoint-120"]
    # the training record carries the stages recorded in each run's --model folder, oldest first
    stages = json.loads((final / "ms_llava_training.json").read_text())["stages"]
    assert [stage["stage"] for stage in stages] == ["finetune", "pretrain", "finetune"]
    assert stages[:2] == json.loads((dirs["pretrain"] / "ms_llava_training.json").read_text())["stages"]
    assert [stage["steps_run"] for stage in stages] == [result.global_step for result in runs.values()]
    assert [stage["base_model"] for stage in stages] == [str(dirs[name]) for name in ("base", "warm-up", "pretrain")]
    assert all(stage["completed"] for stage in stages)


# --------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.slow
def test_resume_after_a_crash_mid_save_reproduces_the_loss_curve(tiny_dir, shapes, tmp_path, caplog):
    """A crash while checkpoint-6 is written leaves checkpoint-3 as the last complete one; resuming from it gives the
    uninterrupted run's per-step losses and final weights (exactly on CPU; the test allows 1e-6). transformers'
    own choice (get_last_checkpoint, what resume_from_checkpoint=True takes) would be the half-written checkpoint-6."""
    settings = {"global_batch_size": 8, "per_device_batch_size": 4, "learning_rate": 1e-2, "max_steps": 8}
    settings.update(dataloader_num_workers=0, save_steps=3, warmup_ratio=0.1)
    args = (tiny_dir, "finetune", shapes["qa"], shapes["images"])
    uninterrupted = train(*args, tmp_path / "uninterrupted", **settings)
    assert [path.name for path in complete_checkpoints(tmp_path / "uninterrupted")] == ["checkpoint-6", "checkpoint-8"]

    save_rng_state = Trainer._save_rng_state  # written after the weights and the optimizer state

    def crash_while_saving_step_6(trainer, output_dir):
        if trainer.state.global_step == 6:
            raise RuntimeError("simulated crash mid-save")
        return save_rng_state(trainer, output_dir)

    output_dir = tmp_path / "interrupted"
    with mock.patch.object(Trainer, "_save_rng_state", crash_while_saving_step_6):
        with pytest.raises(RuntimeError, match="simulated crash mid-save"):
            train(*args, output_dir, **settings)
    half_written = output_dir / "checkpoint-6"
    assert (half_written / "model.safetensors").is_file() and (half_written / "optimizer.pt").is_file()
    assert not (half_written / "trainer_state.json").exists() and not (half_written / "rng_state.pth").exists()
    assert get_last_checkpoint(str(output_dir)) == str(half_written)
    assert [path.name for path in complete_checkpoints(output_dir)] == ["checkpoint-3"]

    with pytest.raises(ValueError, match="already holds checkpoints \\(checkpoint-3\\): pass --resume"):
        train(*args, output_dir, **settings)
    with pytest.raises(ValueError, match="settings that change the loss curve: learning_rate 0.01 -> 0.02"):
        train(*args, output_dir, resume=True, **{**settings, "learning_rate": 0.02})

    with caplog.at_level("WARNING", logger="ms_llava.training.trainer"):
        resumed = train(*args, output_dir, resume=True, **settings)
    assert f"removing {half_written}: an incomplete checkpoint left by an interrupted save" in caplog.text
    assert resumed.resumed_from == output_dir / "checkpoint-3"
    every_checkpoint = sorted(path.name for path in output_dir.glob("checkpoint-*"))
    assert (
        every_checkpoint
        == [path.name for path in complete_checkpoints(output_dir)]
        == ["checkpoint-6", "checkpoint-8"]
    )
    steps = [step for step, _ in resumed.losses]
    assert steps == list(range(1, 9)) == [step for step, _ in read_loss_log(output_dir)]
    torch.testing.assert_close(
        [loss for _, loss in resumed.losses], [loss for _, loss in uninterrupted.losses], rtol=0, atol=1e-6
    )
    final, reference = (
        load_file(output_dir / "model.safetensors"),
        load_file(tmp_path / "uninterrupted" / "model.safetensors"),
    )
    for key, value in reference.items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow
def test_resume_refuses_other_bf16_or_other_data_and_no_stale_skipped_list_remains(tiny_dir, shapes, tmp_path):
    """The run record holds bf16 and a fingerprint of the data (ids, messages, image references, records kept): a
    resume that changes either is refused, even with as many examples. A skipped-records list from an earlier run
    goes when this run skips none."""
    records = json.loads(shapes["qa"].read_text())[:8]
    (tmp_path / "data.json").write_text(json.dumps(records))
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "skipped_records.jsonl").write_text('{"index": 3, "id": "stale"}\n')  # an earlier run's
    settings = {"global_batch_size": 4, "learning_rate": 1e-2, "max_steps": 2, **{**RUN, "save_steps": 1}}
    args = (tiny_dir, "finetune", tmp_path / "data.json", shapes["images"], output_dir)
    train(*args, **settings)
    assert not (output_dir / "skipped_records.jsonl").exists()
    run_record = json.loads((output_dir / "ms_llava_training.json").read_text())["stages"][-1]
    assert run_record["bf16"] is False and re.fullmatch(r"[0-9a-f]{16}", run_record["data_fingerprint"])

    with pytest.raises(ValueError, match=r"settings that change the loss curve: bf16 False -> True;? "):
        train(*args, resume=True, bf16=True, **settings)
    changed = json.loads(json.dumps(records))
    changed[5]["conversations"][1]["value"] = "blue" if changed[5]["conversations"][1]["value"] != "blue" else "red"
    (tmp_path / "data.json").write_text(json.dumps(changed))
    with pytest.raises(ValueError, match=r"data_fingerprint '[0-9a-f]{16}' -> '[0-9a-f]{16}' \(the training data "):
        train(*args, resume=True, **settings)
    (tmp_path / "data.json").write_text(json.dumps(records))
    assert train(*args, resume=True, **settings).resumed_from == output_dir / "checkpoint-2"


def test_only_checkpoints_holding_a_trainer_state_are_complete(tmp_path):
    for name in ("checkpoint-4", "checkpoint-10", "checkpoint-9", "checkpoint-x"):
        (tmp_path / name).mkdir()
    for name in ("checkpoint-4", "checkpoint-10"):
        (tmp_path / name / "trainer_state.json").write_text("{}")  # the file Trainer writes last
    (tmp_path / "checkpoint-9" / "model.safetensors").write_text("a save died after the weights")
    (tmp_path / "checkpoint-12").write_text("not a directory")
    assert complete_checkpoints(tmp_path) == [tmp_path / "checkpoint-4", tmp_path / "checkpoint-10"]  # by step
    assert complete_checkpoints(tmp_path / "no-such-dir") == []


# --------------------------------------------------------------------------------------------- options


@pytest.mark.slow
def test_bf16_and_gradient_checkpointing_train(tiny_dir, shapes, tmp_path):
    settings = {"global_batch_size": 8, "learning_rate": 1e-2, "max_steps": 3, **RUN}
    plain = train(tiny_dir, "finetune", shapes["qa"], shapes["images"], tmp_path / "fp32", **settings)
    checkpointed = train(
        tiny_dir,
        "finetune",
        shapes["qa"],
        shapes["images"],
        tmp_path / "ckpt",
        gradient_checkpointing=True,
        **settings,
    )
    mixed = train(tiny_dir, "finetune", shapes["qa"], shapes["images"], tmp_path / "bf16", bf16=True, **settings)
    # Recomputing activations changes no number; bf16 autocast changes them a little.
    assert checkpointed.losses == plain.losses
    torch.testing.assert_close(
        [loss for _, loss in mixed.losses], [loss for _, loss in plain.losses], rtol=0, atol=0.05
    )
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "float32"  # master weights


class RecordOptimizerGroups(TrainerCallback):
    def on_train_begin(self, args, state, control, optimizer=None, model=None, **kwargs):
        names = {id(param): name for name, param in model.named_parameters()}
        self.groups = [
            (group["initial_lr"], {"multi_modal_projector" in names[id(param)] for param in group["params"]})
            for group in optimizer.param_groups
        ]


@pytest.mark.slow
def test_lora_adapts_only_the_llm_trains_the_projector_and_merges(tiny_dir, tiny, shapes, tmp_path):
    from peft import PeftModel

    recorder = RecordOptimizerGroups()
    result = train(
        tiny_dir,
        "finetune",
        shapes["qa"],
        shapes["images"],
        tmp_path / "lora",
        lora=True,
        lora_r=8,
        lora_alpha=16,
        learning_rate=1e-2,
        projector_learning_rate=5e-3,
        global_batch_size=8,
        max_steps=10,
        merge_lora=True,
        callbacks=[recorder],
        **RUN,
    )
    losses = [loss for _, loss in result.losses]
    assert result.adapter and losses[-1] < losses[0] - 0.2, losses
    # the projector (PEFT's trained copy) has its own learning rate, the adapters the main one
    assert {lr for lr, _ in recorder.groups} == {5e-3, 1e-2}
    assert all(in_projector == {lr == 5e-3} for lr, in_projector in recorder.groups)
    adapter_config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert adapter_config["modules_to_save"] == ["multi_modal_projector"]

    base_model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    names = [name for name, _ in base_model.named_modules()]
    targeted = [name for name in names if re.fullmatch(adapter_config["target_modules"], name)]
    assert targeted and all(name.startswith("model.language_model.layers.") for name in targeted)
    assert any(name.startswith("model.vision_tower.") and name.endswith(".q_proj") for name in names)  # not matched
    assert adapter_config["target_modules"] == language_model_lora_targets(base_model)

    processor = AutoProcessor.from_pretrained(tmp_path / "lora")
    record = json.loads(shapes["held_out"].read_text())[0]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=Image.open(shapes["images"] / record["image"]), text=prompt, return_tensors="pt")
    with torch.no_grad():
        base_logits = base_model(**inputs).logits
        adapted = PeftModel.from_pretrained(base_model, tmp_path / "lora").eval()
        lora_layers = [name for name, module in adapted.named_modules() if hasattr(module, "lora_A")]
        assert lora_layers and all(".language_model." in name for name in lora_layers)
        projector = adapted.base_model.model.model.multi_modal_projector
        assert not torch.equal(projector.modules_to_save["default"].queries, projector.original_module.queries)
        adapter_logits = adapted(**inputs).logits
        merged_logits = AutoModelForImageTextToText.from_pretrained(result.merged_dir)(**inputs).logits
    assert (adapter_logits - base_logits).abs().max() > 1e-2
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=1e-5, atol=1e-5)


# Every option string of `ms-llava train` as of commit 0225c8f (before the options became a TrainingArguments
# subclass): the command keeps all of them, with the meanings below.
TRAIN_FLAGS = [
    "--adapter",
    "--bf16",
    "--cache-vision-features",
    "--data",
    "--epochs",
    "--global-batch-size",
    "--gradient-checkpointing",
    "--help",
    "--image-folder",
    "--learning-rate",
    "--logging-steps",
    "--lora",
    "--lora-alpha",
    "--lora-dropout",
    "--lora-r",
    "--lr-scheduler",
    "--max-grad-norm",
    "--max-length",
    "--max-steps",
    "--merge-lora",
    "--model",
    "--num-workers",
    "--output-dir",
    "--per-device-batch-size",
    "--projector-learning-rate",
    "--push-to-hub",
    "--qlora",
    "--resume",
    "--save-steps",
    "--save-total-limit",
    "--scale-bound",
    "--scale-layers",
    "--scale-token-scope",
    "--seed",
    "--skip-bad-records",
    "--stage",
    "--verify-images",
    "--warmup-ratio",
    "--weight-decay",
    "-h",
]
# (option, its value on the command line or None for a bare flag, the attribute it sets, the value it parses to)
TRAIN_FLAG_MEANINGS = [
    ("--learning-rate", "2e-5", "learning_rate", 2e-5),
    ("--projector-learning-rate", "3e-5", "projector_learning_rate", 3e-5),
    ("--global-batch-size", "64", "global_batch_size", 64),
    ("--per-device-batch-size", "4", "per_device_batch_size", 4),
    ("--epochs", "2.5", "num_train_epochs", 2.5),
    ("--max-steps", "7", "max_steps", 7),
    ("--save-steps", "11", "save_steps", 11),
    ("--save-total-limit", "3", "save_total_limit", 3),
    ("--seed", "5", "seed", 5),
    ("--max-length", "512", "max_length", 512),
    ("--lr-scheduler", "linear", "lr_scheduler_type", "linear"),
    ("--warmup-ratio", "0.1", "warmup_ratio", 0.1),
    ("--weight-decay", "0.01", "weight_decay", 0.01),
    ("--max-grad-norm", "0.5", "max_grad_norm", 0.5),
    ("--logging-steps", "2", "logging_steps", 2),
    ("--num-workers", "0", "dataloader_num_workers", 0),
    ("--lora-r", "8", "lora_r", 8),
    ("--lora-alpha", "16", "lora_alpha", 16),
    ("--lora-dropout", "0.1", "lora_dropout", 0.1),
    ("--push-to-hub", "org/name", "push_to_hub", "org/name"),
    ("--adapter", "scale", "adapter", "scale"),
    ("--scale-bound", "0.5", "scale_bound", 0.5),
    ("--scale-token-scope", "all", "scale_token_scope", "all"),
    ("--scale-layers", "0,2", "scale_layers", [0, 2]),
    ("--bf16", None, "bf16", True),
    ("--gradient-checkpointing", None, "gradient_checkpointing", True),
    ("--resume", None, "resume", True),
    ("--cache-vision-features", None, "cache_vision_features", True),
    ("--skip-bad-records", None, "skip_bad_records", True),
    ("--verify-images", None, "verify_images", True),
    ("--lora", None, "lora", True),
    ("--qlora", None, "qlora", True),
    ("--merge-lora", None, "merge_lora", True),
]


def test_the_train_command_keeps_every_flag_with_its_meaning():
    """Today's flags are all listed in --help; each parses to the same attribute and value, and one left out parses to
    None (the stage recipe's value)."""
    import argparse

    parser = argparse.ArgumentParser(prog="ms-llava train")
    add_arguments(parser)
    help_text = parser.format_help()
    assert all(re.search(rf"(^|[\s,\[]){re.escape(flag)}\b", help_text) for flag in TRAIN_FLAGS), help_text
    required = ["--stage", "finetune", "--model", "m", "--data", "d.json", "--output-dir", "out"]
    bare = parser.parse_args(required)
    assert (bare.stage, bare.model, bare.data, bare.output_dir, bare.image_folder) == (
        "finetune",
        "m",
        "d.json",
        "out",
        None,
    )
    for _, _, attribute, _ in TRAIN_FLAG_MEANINGS:
        assert getattr(bare, attribute) is None, attribute
    assert parser.parse_args([*required, "--image-folder", "imgs"]).image_folder == "imgs"
    for flag, value, attribute, expected in TRAIN_FLAG_MEANINGS:
        parsed = parser.parse_args([*required, flag] + ([] if value is None else [value]))
        assert getattr(parsed, attribute) == expected, flag
        assert type(getattr(parsed, attribute)) is type(expected), flag
    for missing in ("--stage", "--model", "--data", "--output-dir"):
        index = required.index(missing)
        with pytest.raises(SystemExit):
            parser.parse_args(required[:index] + required[index + 2 :])
    with pytest.raises(SystemExit):
        parser.parse_args([*required, "--scale-layers", "a,b"])
    assert parser.parse_args([*required, "--optim", "sgd"]).optim == "sgd"  # TrainingArguments' own options parse
    assert "--report_to REPORT_TO" not in help_text  # ... without being listed


def test_train_command(tiny_dir, shapes, run_train, tmp_path):
    """`ms-llava train` through the command line's entry point: a run prints one summary line; a bad setting is one
    error line before any work; a bad --stage is an argument error."""
    common = ["--model", tiny_dir, "--data", shapes["caption"], "--image-folder", shapes["images"]]
    status, out, _ = run_train(
        [*common, "--stage", "pretrain", "--output-dir", tmp_path / "out", "--global-batch-size", "8"]
        + ["--per-device-batch-size", "4", "--max-steps", "2", "--learning-rate", "1e-2", "--num-workers", "0"]
    )
    assert status == 0 and "trained pretrain: 2 steps, 96 examples (0 skipped)" in out
    assert len(read_loss_log(tmp_path / "out")) == 2
    with mock.patch("ms_llava.training.trainer.load_model", side_effect=AssertionError("the model was loaded")):
        status, _, err = run_train(
            [*common, "--stage", "finetune", "--output-dir", tmp_path / "bad", "--per-device-batch-size", "5"]
        )
    assert status != 0
    assert (
        "ms-llava train: error: global batch size 16 is not a multiple of per-device batch size 5 x 1 process(es) = 5"
        in err
    )
    status, _, err = run_train([*common, "--stage", "sft", "--output-dir", tmp_path])
    assert status == 2 and "argument --stage: invalid choice: 'sft'" in err


@pytest.mark.slow
def test_push_to_hub_after_training(tiny_dir, shapes, tmp_path, hub):
    from huggingface_hub import HfApi, ModelCard

    repo = "ms-llava-test/trained-tiny"
    train(
        tiny_dir,
        "pretrain",
        shapes["caption"],
        shapes["images"],
        tmp_path / "out",
        push_to_hub=repo,
        learning_rate=1e-2,
        global_batch_size=8,
        max_steps=1,
        **RUN,
    )
    api = HfApi()
    files = set(api.list_repo_files(repo))
    assert {"config.json", "model.safetensors", "processor_config.json", "modeling_ms_llava.py"} <= files
    card = ModelCard.load(api.hf_hub_download(repo, "README.md"))
    assert "Untrained weights" not in card.text and "From this folder's training record" in card.text
    # the card states the recipe that ran, from the run's own record
    (row,) = [line for line in card.text.splitlines() if line.startswith("| 1. pretrain |")]
    assert "| 0.01 (cosine" in row and "| 8 (8 x 1 x 1) |" in row and "| 1 of 1 |" in row


# --------------------------------------------------------------------------------------------- several processes


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {}
    for path in sorted(ACCELERATE_CONFIGS.glob("*.yaml")):
        config = load_config_from_file(str(path))
        kinds[path.stem] = str(config.distributed_type)
        if config.deepspeed_config:
            deepspeed_file = ACCELERATE_CONFIGS.parents[1] / config.deepspeed_config["deepspeed_config_file"]
            stage = json.loads(deepspeed_file.read_text())["zero_optimization"]["stage"]
            assert path.stem.endswith(f"zero{stage}")
    assert kinds == {
        "ddp": "DistributedType.MULTI_GPU",
        "deepspeed_zero2": "DistributedType.DEEPSPEED",
        "deepspeed_zero3": "DistributedType.DEEPSPEED",
        "fsdp": "DistributedType.FSDP",
    }


def test_the_pre_pass_runs_on_the_main_process_only(tiny_dir, shapes):
    """Only process 0 runs check_records; the others take its result from the broadcast, or raise its error (they
    do not wait for a result that never comes)."""
    from types import SimpleNamespace

    from ms_llava.training.trainer import _pre_pass

    records = load_training_records(shapes["qa"], shapes["images"])
    config = MSLlavaTrainingArguments.for_stage("finetune")
    processor = AutoProcessor.from_pretrained(tiny_dir)
    main, other = (SimpleNamespace(num_processes=2, is_main_process=rank == 0, process_index=rank) for rank in (0, 1))
    sent = []

    def broadcast(payload, from_process):  # process 0's object reaches the others
        assert from_process == 0
        if sent:
            payload[0] = sent.pop()
        else:
            sent.append(payload[0])

    with mock.patch("accelerate.utils.broadcast_object_list", side_effect=broadcast):
        result = _pre_pass(records, processor, config, main)
        assert result.kept == list(range(96)) and sent
        with mock.patch("ms_llava.training.trainer.check_records", side_effect=AssertionError("ran on process 1")):
            assert _pre_pass(records, processor, config, other) == result

        processor.chat_template = strip_generation_markers(processor.chat_template)
        with pytest.raises(ChatTemplateError, match="marks no assistant tokens"):
            _pre_pass(records, processor, config, main)
        with mock.patch("ms_llava.training.trainer.check_records", side_effect=AssertionError("ran on process 1")):
            with pytest.raises(ValueError, match="the pre-pass on the main process failed: ChatTemplateError: the "):
                _pre_pass(records, processor, config, other)


def test_a_training_forward_fills_no_kv_cache(tiny):
    """In training mode the model asks its LLM for no KV cache unless the caller does (what lets FSDP's activation
    checkpointing recompute a decoder layer); in eval mode the cache is there as before."""
    model, processor = tiny
    inputs = processor(text="USER: Hi ASSISTANT: Hello", return_tensors="pt")
    try:
        model.train()
        assert model(**inputs).past_key_values is None
        assert model(**inputs, use_cache=True).past_key_values is not None
    finally:
        model.eval()
    with torch.no_grad():
        assert model(**inputs).past_key_values is not None


def test_a_missing_training_extra_names_the_install_command(monkeypatch):
    import importlib.util

    from ms_llava.training.trainer import require_training_extra

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real_find_spec(name))
    require_training_extra(lora=False)  # accelerate is there, peft is not needed
    with pytest.raises(ImportError, match=r"needs peft: install the training extra, pip install -e '\.\[train\]'"):
        require_training_extra(lora=True)
