"""TRL's `SFTTrainer` as a client of MS-LLaVA: fine-tuning on `messages` + `images` data with the processor, the tokens
and labels TRL's vision-language collator builds against ours (ms_llava.training.data), and the loss on image
placeholders. The data are coloured shapes drawn in memory (ms_llava.testing_utils)."""

import math
import random

import pytest
import torch
from datasets import Dataset
from huggingface_hub import constants
from tokenizers import processors
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from ms_llava import LLAVA_1_5_CHAT_TEMPLATE
from ms_llava.testing_utils import build_tiny_processor, build_tiny_tokenizer, draw_shape
from ms_llava.training.data import (
    IGNORE_INDEX,
    RightPaddingCollator,
    SupervisedDataset,
    chat_template_for_trl,
    check_records,
    encode_conversation,
    load_training_records,
    pad_token_id,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch):
    """SFTTrainer sends a telemetry request to huggingface.co when it is built (unless HF_HUB_DISABLE_TELEMETRY)."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)


SHAPES = [("red", "circle"), ("blue", "square"), ("green", "circle"), ("yellow", "square")]


def user(text: str, image: bool = False) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * image + [{"type": "text", "text": text}]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def caption_dataset() -> Dataset:
    """One caption conversation per shape: "Describe the picture." -> "A red circle."."""
    rng = random.Random(0)
    return Dataset.from_dict(
        {
            "messages": [[user("Describe the picture.", image=True), assistant(f"A {c} {s}.")] for c, s in SHAPES],
            "images": [[draw_shape(colour, shape, rng)] for colour, shape in SHAPES],
        }
    )


def mixed_dataset() -> Dataset:
    """Conversations of different lengths and forms: a caption, a two-question chat with a system message, and a
    text-only chat (no image)."""
    rng = random.Random(1)
    messages = [
        [user("Describe the picture.", image=True), assistant("A red circle.")],
        [
            {"role": "system", "content": [{"type": "text", "text": "Answer in one word."}]},
            user("What colour is the shape?", image=True),
            assistant("blue"),
            user("What shape is it?"),
            assistant("square"),
        ],
        [user("How many shapes are there?"), assistant("one")],
    ]
    images = [[draw_shape("red", "circle", rng)], [draw_shape("blue", "square", rng)], []]
    return Dataset.from_dict({"messages": messages, "images": images})


def sft_config(output_dir, **overrides) -> SFTConfig:
    """CPU, float32, no saves or reports; the loss on the assistant replies only, as ms_llava.training trains."""
    settings = dict(
        output_dir=str(output_dir),
        assistant_only_loss=True,
        bf16=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        dataloader_num_workers=0,
        seed=0,
    )
    return SFTConfig(**{**settings, **overrides})


def processor_with_bos(tiny, bos_in_template: bool):
    """The tiny processor, with a tokenizer that adds a BOS as Llama's does (the tiny one adds none), and optionally a
    chat template that writes the BOS itself."""
    model, _ = tiny
    tokenizer = build_tiny_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    processor = build_tiny_processor(model.config, tokenizer)
    if bos_in_template:
        processor.chat_template = "{{ bos_token }}" + LLAVA_1_5_CHAT_TEMPLATE
    return processor


@pytest.mark.slow
def test_sft_trainer_fine_tunes_from_a_checkpoint_folder_and_the_model_generates(tiny_dir, tmp_path):
    """SFTTrainer given only the checkpoint's folder (it loads the model and the processor) and messages + images:
    the loss on one repeated batch falls; the saved model, loaded back, answers each picture as trained."""
    dataset = caption_dataset()
    args = sft_config(
        tmp_path / "run",
        max_steps=80,
        per_device_train_batch_size=len(dataset),
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
    )
    trainer = SFTTrainer(model=str(tiny_dir), args=args, train_dataset=dataset)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 80 and all(math.isfinite(loss) for loss in losses), losses
    assert max(losses[-5:]) < min(losses[:5]) and losses[-1] < losses[0] / 4, losses

    trainer.save_model(tmp_path / "fine-tuned")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "fine-tuned").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "fine-tuned")
    prompt = processor.apply_chat_template([user("Describe the picture.", image=True)], add_generation_prompt=True)
    images = [record["images"][0] for record in dataset]
    inputs = processor(images=images, text=[prompt] * len(images), padding=True, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answers = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert [answer.strip() for answer in answers] == [f"A {colour} {shape}." for colour, shape in SHAPES]


@pytest.mark.parametrize(
    "bos", ["tokenizer adds none", "tokenizer adds one", "template writes one"], ids=["no-bos", "bos", "bos-template"]
)
def test_trl_and_our_trainer_see_the_same_tokens_and_labels(tiny, tmp_path, bos):
    """Token by token, per conversation: TRL's collator (which tokenises with add_special_tokens=False) given
    `chat_template_for_trl`, and `encode_conversation`; exactly one BOS wherever the tokenizer has one to add."""
    model, processor = tiny
    if bos != "tokenizer adds none":
        processor = processor_with_bos(tiny, bos_in_template=bos == "template writes one")
    bos_id = processor.tokenizer.bos_token_id
    trl_collator = DataCollatorForVisionLanguageModeling(
        processor, assistant_only_loss=True, chat_template=chat_template_for_trl(processor)
    )
    dataset = mixed_dataset()
    records = load_training_records(dataset)
    for index in range(len(dataset)):
        ours = encode_conversation(processor, records[index])
        theirs = trl_collator([dataset[index]])
        ids = ours["input_ids"].tolist()
        assert theirs["input_ids"][0].tolist() == ids
        assert theirs["labels"][0].tolist() == ours["labels"].tolist()
        assert theirs["attention_mask"].all()
        if "pixel_values" in ours:
            assert torch.equal(theirs["pixel_values"], ours["pixel_values"])
        else:
            assert "pixel_values" not in theirs
        assert ids.count(bos_id) == (0 if bos == "tokenizer adds none" else 1) and ids[0] != IGNORE_INDEX
        if bos != "tokenizer adds none":
            assert ids[0] == bos_id
    if bos == "tokenizer adds one":
        # Why chat_template_for_trl exists: with the processor's own template TRL would drop the BOS.
        default = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)([dataset[0]])
        assert default["input_ids"][0].tolist() == encode_conversation(processor, records[0])["input_ids"][1:].tolist()
    else:
        assert chat_template_for_trl(processor) == processor.chat_template


def test_sft_trainer_and_our_trainer_give_the_same_loss_on_the_same_batch(tiny_dir, tmp_path):
    """One right-padded batch of three conversations (with and without images) as ms_llava.training builds it and as
    SFTTrainer's own collator builds it: the same tensors, and the same loss from our forward and from TRL's
    `compute_loss` (its fused LM head), to 1e-5."""
    dataset = mixed_dataset()
    trainer = SFTTrainer(model=str(tiny_dir), args=sft_config(tmp_path / "run"), train_dataset=dataset)
    model, processor = trainer.model.eval(), trainer.processing_class
    examples = [dataset[index] for index in range(len(dataset))]
    trl_batch = trainer.data_collator(examples)

    records = load_training_records(dataset)
    check = check_records(records, processor, max_length=None)
    assert check.kept == [0, 1, 2]
    ours = SupervisedDataset(records, check.kept, processor, max_length=None)
    our_batch = RightPaddingCollator(pad_token_id(processor.tokenizer))([ours[i] for i in range(len(ours))])

    assert set(trl_batch) == set(our_batch)
    for key in our_batch:
        assert torch.equal(trl_batch[key], our_batch[key]), key
    is_image = our_batch["input_ids"] == model.config.image_token_id
    assert int(is_image.sum()) == 2 * processor.num_image_tokens
    assert (trl_batch["labels"][is_image] == IGNORE_INDEX).all()

    with torch.no_grad():
        our_loss = model(**our_batch).loss
        trl_loss = trainer.compute_loss(model, dict(trl_batch))
    assert math.isfinite(our_loss.item())
    torch.testing.assert_close(trl_loss, our_loss, rtol=0, atol=1e-5)


def test_labels_on_image_placeholders_never_count_in_the_loss(tiny):
    """Labels copied from input_ids (TRL's collator without assistant_only_loss, llava-hf's scripts) hold the M image
    placeholders: the model's loss is the loss with those positions at -100, and the caller's labels stay as given."""
    model, processor = tiny
    messages = [user("Describe the picture.", image=True), assistant("A red circle.")]
    inputs = processor.apply_chat_template(
        [
            {
                **message,
                "content": [
                    {**part, "image": draw_shape("red", "circle", random.Random(0))}
                    if part["type"] == "image"
                    else part
                    for part in message["content"]
                ],
            }
            for message in messages
        ],
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    labels = inputs["input_ids"].clone()
    is_image = labels == model.config.image_token_id
    assert int(is_image.sum()) == processor.num_image_tokens
    masked = labels.masked_fill(is_image, IGNORE_INDEX)
    with torch.no_grad():
        output = model(**inputs, labels=labels)
        reference = model(**inputs, labels=masked).loss
    assert torch.equal(output.loss, reference)
    assert torch.equal(labels, inputs["input_ids"])  # not modified in place
    # Not vacuous: counting the placeholders gives another loss.
    logits = output.logits[0, :-1].float()
    with_placeholders = torch.nn.functional.cross_entropy(logits, labels[0, 1:])
    without = torch.nn.functional.cross_entropy(logits, masked[0, 1:], ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(without, reference)
    assert abs(with_placeholders.item() - reference.item()) > 1e-2
