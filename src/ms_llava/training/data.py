"""Training data: LLaVA JSON (`{"id", "image", "conversations": [{"from": "human" | "gpt", "value"}]}`, `<image>`
markers moved to the front of their turn as in LLaVA-1.5) and Hugging Face `messages` + `images` data (a `Dataset`,
a `save_to_disk` folder, `.json` / `.jsonl` / `.parquet` / `.arrow` files) become `Conversation`s: chat messages as the
processor's template takes them, and their images (paths relative to the image folder, PIL images or bytes).

`check_records`, the pre-pass, names every record that cannot be trained on before the model loads. Labels are the
tokens inside the chat template's `{% generation %}` markers, -100 elsewhere.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..images import decode_image

IMAGE_TOKEN, IGNORE_INDEX = "<image>", -100
LLAVA_ROLES = {"human": "user", "gpt": "assistant"}
MESSAGE_ROLES = ("system", "user", "assistant")
CHECK_BATCH_SIZE = 512  # conversations tokenised per call in the pre-pass
MALFORMED, IMAGE_COUNT, MISSING_IMAGE = "malformed record", "image count mismatch", "missing or unreadable image"
# How transformers recognises a template that supports `return_assistant_tokens_mask` (utils/chat_template_utils.py).
GENERATION_MARKER = re.compile(r"\{\%-?\s*generation\s*-?\%\}")
# The processor expands an image to M tokens whatever its pixels: with cached features, this stand-in gives the
# tokens and labels of the real images without decoding them.
STAND_IN_IMAGE = Image.new("RGB", (16, 16))


@dataclass
class Conversation:
    """`messages` whose image parts are `{"type": "image"}`, and one image per image part (a path, a PIL image, or
    undecoded `{"bytes", "path"}`)."""

    messages: list[dict]
    images: list[Any] = field(default_factory=list)
    record_id: str | None = None


@dataclass(frozen=True)
class RecordProblem:
    index: int
    record_id: str | None
    category: str
    reason: str

    def __str__(self) -> str:
        name = "no id" if self.record_id is None else f"id {self.record_id!r}"
        return f"record {self.index} ({name}): {self.category}: {self.reason}"

    def to_dict(self) -> dict:
        return {"index": self.index, "id": self.record_id, "category": self.category, "reason": self.reason}


class RecordError(ValueError):
    def __init__(self, category: str, reason: str):
        super().__init__(f"{category}: {reason}")
        self.category, self.reason = category, reason


def summarize_problems(problems: list[RecordProblem]) -> str:
    """ "2 missing or unreadable image, 1 malformed record" """
    return ", ".join(f"{n} {category}" for category, n in Counter(p.category for p in problems).most_common())


class BadRecordsError(ValueError):
    """The pre-pass found bad records (and `skip_bad_records` was off); `problems` lists them all."""

    def __init__(self, problems: list[RecordProblem], num_records: int, shown: int = 10):
        self.problems = problems
        listed = "".join(f"\n  {problem}" for problem in problems[:shown])
        more = f"\n  ... and {len(problems) - shown} more" if len(problems) > shown else ""
        super().__init__(
            f"{len(problems)} of {num_records} training records are bad ({summarize_problems(problems)}):{listed}"
            f"{more}\nfix them, or pass --skip-bad-records (skip_bad_records=True) to train without them"
        )


def _default_template(chat_template):  # of named templates, the processor applies "default"
    return chat_template.get("default") if isinstance(chat_template, dict) else chat_template


class ChatTemplateError(ValueError):
    """The processor's chat template marks no assistant token in any record: every label would be -100. For a template
    without `{% generation %}` markers, or whose markers enclose no token of the `num_tokenised` records rendered."""

    def __init__(self, chat_template, num_tokenised: int | None = None):
        template = _default_template(chat_template)
        if not isinstance(template, str) or not template:
            what = f"the processor has no chat template (chat_template is {chat_template!r})"
        elif GENERATION_MARKER.search(template):
            what = f"its {{% generation %}} markers enclose no token of any of the {num_tokenised} record(s) rendered"
        else:
            what = "it has no {% generation %} ... {% endgeneration %} markers around the assistant replies"
        super().__init__(
            f"the processor's chat template marks no assistant tokens ({what}): every label would be -100 and "
            "training would learn nothing (loss 0). Labels are the tokens inside the template's {% generation %} "
            "markers (return_assistant_tokens_mask). Fix the checkpoint's template, e.g. with LLaVA-1.5's: `import "
            "ms_llava; processor = AutoProcessor.from_pretrained(MODEL); processor.chat_template = "
            "ms_llava.LLAVA_1_5_CHAT_TEMPLATE; processor.save_pretrained(MODEL)`, or wrap each assistant reply of "
            "your template in {% generation %} ... {% endgeneration %}"
        )


def _text(text: str, where: str, split: bool = False):
    """`text` (as parts when `split`: "a <image> b" -> text, image, text), refused if it holds a lone surrogate (from
    JSON's `\\ud800` escapes), which the tokenizer cannot encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        reason = f"{where} holds {text[error.start : error.end]!r}, a lone surrogate that is not valid Unicode"
        raise RecordError(MALFORMED, reason) from None
    if not split:
        return text
    parts = []
    for n, piece in enumerate(text.split(IMAGE_TOKEN)):
        parts += [{"type": "image"}] * bool(n) + [{"type": "text", "text": piece}] * bool(piece)
    return parts


def _record_id(record) -> str | None:
    return None if not isinstance(record, dict) or record.get("id") is None else str(record["id"])


def llava_record_to_conversation(record: Any, image_folder: Path | None) -> Conversation:
    """A LLaVA record -> `Conversation`; the `<image>` markers of a human turn move to its front, as in LLaVA-1.5."""
    if not isinstance(record, dict):
        raise RecordError(MALFORMED, f"expected a JSON object, got {type(record).__name__}")
    turns, image = record.get("conversations"), record.get("image")
    if not isinstance(turns, list) or not turns:
        raise RecordError(MALFORMED, "missing or empty 'conversations'")
    images = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(images, list) or not all(isinstance(path, str) for path in images):
        raise RecordError(MALFORMED, f"'image' must be a path or a list of paths, got {image!r}")
    messages = []
    for number, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
            raise RecordError(MALFORMED, f"turn {number} needs 'from' and a string 'value', got {turn!r}")
        role = LLAVA_ROLES.get(turn["from"]) if isinstance(turn["from"], str) else None
        if role is None:
            raise RecordError(MALFORMED, f"turn {number} is from {turn['from']!r}; expected 'human' or 'gpt'")
        value = _text(turn["value"], f"turn {number}")
        if role == "user":
            text = value.replace(IMAGE_TOKEN, "").strip()
            content = [{"type": "image"}] * value.count(IMAGE_TOKEN) + [{"type": "text", "text": text}]
        else:
            content = _text(value, "", split=True)  # an <image> here is flagged by check_conversation
        messages.append({"role": role, "content": content})
    return Conversation(messages, [str(image_folder / _text(path, "'image'")) for path in images], _record_id(record))


def messages_record_to_conversation(record: Any, image_folder: Path | None) -> Conversation:
    """A `messages` + `images` record -> `Conversation`."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or not record["messages"]:
        raise RecordError(MALFORMED, "missing or empty 'messages'")
    images = record.get("images") or []
    if not isinstance(images, list):
        raise RecordError(MALFORMED, f"'images' must be a list, got {type(images).__name__}")
    messages = []
    for number, message in enumerate(record["messages"]):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RecordError(MALFORMED, f"message {number} needs 'role' and 'content', got {message!r}")
        content, where = message["content"], f"message {number}"
        if not isinstance(content, (str, list)):
            raise RecordError(MALFORMED, f"{where} content must be a string or a list of parts")
        parts = _text(content, where, split=True) if isinstance(content, str) else []
        for part in content if isinstance(content, list) else []:  # Arrow gives every part the union of the keys
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                parts.append({"type": "image"})
            elif kind == "text" and isinstance(part.get("text"), str):
                parts += _text(part["text"], where, split=True)
            else:
                raise RecordError(MALFORMED, f"{where} has a content part {part!r}")
        messages.append({"role": message["role"], "content": parts})
    images = [str(image_folder / image) if isinstance(image, str) and image_folder else image for image in images]
    return Conversation(messages, images, _record_id(record))


def check_conversation(conversation: Conversation) -> None:
    """RecordError unless the roles alternate user / assistant (after an optional system message) and end with the
    assistant, every assistant turn has text and no image, and there is one image per image part."""
    messages, image_parts = conversation.messages, 0
    for number, message in enumerate(messages):
        if message["role"] not in MESSAGE_ROLES:
            role = message["role"]
            raise RecordError(MALFORMED, f"message {number} has role {role!r}; expected one of {MESSAGE_ROLES}")
    start = 1 if messages[0]["role"] == "system" else 0
    for number, message in enumerate(messages[start:], start):
        expected = ("user", "assistant")[(number - start) % 2]
        if message["role"] != expected:
            raise RecordError(MALFORMED, f"message {number} is from {message['role']!r}; expected {expected!r}")
    if len(messages) == start or messages[-1]["role"] != "assistant":
        raise RecordError(MALFORMED, "the conversation must end with an assistant turn")
    for number, message in enumerate(messages):
        images_here = sum(part["type"] == "image" for part in message["content"])
        if message["role"] == "assistant" and images_here:
            raise RecordError(IMAGE_COUNT, f"assistant turn {number} contains {IMAGE_TOKEN}")
        if message["role"] == "assistant" and not "".join(part["text"] for part in message["content"]).strip():
            raise RecordError(MALFORMED, f"assistant turn {number} is empty")
        image_parts += images_here
    if image_parts != len(conversation.images):
        given = f"the record gives {len(conversation.images)} image(s)"
        raise RecordError(IMAGE_COUNT, f"the conversation has {image_parts} {IMAGE_TOKEN} but {given}")


def describe_image(image: Any, folder: Path | None = None) -> str:
    """How error messages name an image: a path (relative to `folder` if given), `embedded image bytes (N bytes, path
    ...)` or `a PIL image`."""
    if isinstance(image, str) and folder:
        return os.path.relpath(image, folder)
    if isinstance(image, dict) and image.get("bytes") is not None:
        path = f", path {image['path']!r}" if image.get("path") else ""
        return f"embedded image bytes ({len(image['bytes'])} bytes{path})"
    if isinstance(image, Image.Image):
        return f"a PIL image ({getattr(image, 'filename', '') or 'in memory'})"
    return str(image.get("path") or "<no path>") if isinstance(image, dict) else str(image)


def _check_image(image: Any, verify: bool) -> None:
    """The file exists and PIL identifies its header; with `verify`, PIL's `verify()` and a full decode (which finds a
    truncated file). Embedded bytes alike."""
    if isinstance(image, Image.Image):
        return
    if isinstance(image, dict) and image.get("bytes") is None:
        image = image.get("path") or "<no path>"
    if isinstance(image, str) and not Path(image).is_file():
        raise RecordError(MISSING_IMAGE, f"image file not found: {image}")
    if not isinstance(image, (str, dict)):
        raise RecordError(MISSING_IMAGE, f"an image must be a path, a PIL image or image bytes, got {image!r}")
    try:
        with Image.open(image if isinstance(image, str) else io.BytesIO(image["bytes"])) as opened:
            if verify:
                opened.verify()  # spends `opened`: the loader's full decode opens the image again
                load_image(image)  # truncated data refused
    except Exception as error:  # PIL raises many types for a bad file
        reason = f"cannot read image {describe_image(image)}: {type(error).__name__}: {error}"
        raise RecordError(MISSING_IMAGE, reason) from error


def load_image(image: Any) -> Image.Image:
    """A path, a PIL image or `{"bytes", "path"}` -> a PIL image in memory (decoded as the command line decodes)."""
    if isinstance(image, dict):
        image = io.BytesIO(image["bytes"]) if image.get("bytes") is not None else image["path"]
    return image if isinstance(image, Image.Image) else decode_image(image)


@dataclass
class TrainingRecords:
    """A training set's raw `rows` and their `converter`: `records[i]` is a `Conversation` (or raises `RecordError`);
    `undecoded`, the same rows with images left undecoded, serves the pre-pass and error messages."""

    rows: Any
    converter: Any
    image_folder: Path | None
    description: str
    undecoded: Any

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Conversation:
        return self.converter(self.rows[index], self.image_folder)

    def describe(self, index: int) -> str:
        """ "record 3 (id 'x'), image(s) /data/a.png": names a record in an error, without decoding its images."""
        record = next(itertools.islice(self.undecoded, index, None))
        try:
            images = ", ".join(map(describe_image, self.converter(record, self.image_folder).images))
        except RecordError:
            images = ""
        name = "no id" if _record_id(record) is None else f"id {_record_id(record)!r}"
        return f"record {index} ({name}), image(s) {images or 'none'}"


def load_training_records(data, image_folder: str | Path | None = None) -> TrainingRecords:
    """Opens `data`: a LLaVA or `messages` + `images` `.json` / `.jsonl` file, a `.parquet` / `.arrow` file, a
    `datasets.Dataset` or a `save_to_disk` folder. Image paths are relative to `image_folder` (default: the file's)."""
    folder = Path(image_folder) if image_folder is not None else None
    if folder is not None and not folder.is_dir():
        raise ValueError(f"image folder not found: {folder}")
    if type(data).__module__.startswith("datasets.") and type(data).__name__ == "Dataset":
        return _from_hf_dataset(data, folder, f"the {type(data).__name__} given")
    path, suffix = Path(data), Path(data).suffix.lower()
    if not path.exists():
        raise ValueError(f"training data not found: {path}")
    if path.is_dir() or suffix in (".parquet", ".arrow"):
        from datasets import Dataset, load_from_disk

        # Not datasets.load_dataset: its packaged builders send a download-count request to the Hub first.
        read = load_from_disk if path.is_dir() else Dataset.from_parquet if suffix == ".parquet" else Dataset.from_file
        try:
            dataset = read(str(path))
        except FileNotFoundError as error:  # a folder that save_to_disk did not write
            raise ValueError(
                f"{path} is a folder but not a data set written by Dataset.save_to_disk ({error}); give a data file "
                "(.json, .jsonl, .parquet, .arrow) or such a folder"
            ) from error
        except Exception as error:  # pyarrow raises its own types (ArrowInvalid ...) for a file that is not one
            raise ValueError(
                f"{path} is not {'a Parquet' if suffix == '.parquet' else 'an Arrow'} file that can be read: "
                f"{type(error).__name__}: {error}; write it again (e.g. with datasets' Dataset.to_parquet), or give "
                "the data as .json / .jsonl"
            ) from error
        return _from_hf_dataset(dataset, folder if folder or path.is_dir() else path.parent, str(path))
    if suffix not in (".json", ".jsonl"):
        raise ValueError(f"{path}: unsupported data file type {suffix!r}; use .json, .jsonl, .parquet or .arrow")
    records = _read_json_records(path)
    first = next(((index, record) for index, record in enumerate(records) if isinstance(record, dict)), None)
    if first is None:
        raise ValueError(
            f"{path}: no record is a JSON object (record 0 is {type(records[0]).__name__}); each record must be an "
            "object with 'conversations' (LLaVA format) or 'messages' (messages format)"
        )
    index, record = first
    for key, converter, name in (
        ("conversations", llava_record_to_conversation, "LLaVA"),
        ("messages", messages_record_to_conversation, "messages"),
    ):
        if key in record:
            return TrainingRecords(records, converter, folder or path.parent, f"{path} ({name} format)", records)
    raise ValueError(
        f"{path}: cannot tell the format: record {index}, the first JSON object, has neither 'conversations' (LLaVA "
        f"format) nor 'messages' (messages format); its keys are {sorted(record)[:10]}"
    )


def _read_json_records(path: Path) -> list:
    """The records of a `.json` (one list) or `.jsonl` (one value per line) file; every way it can fail to be that is a
    ValueError naming the file (and the line) and what to do."""
    jsonl = path.suffix.lower() == ".jsonl"
    layout = "a .jsonl file holds one JSON record per line" if jsonl else "a .json file holds one JSON list of records"
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark (Windows editors write one) is accepted
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(
            f"{path} is not UTF-8 text: byte {data[error.start]:#04x} at offset {error.start} (line {line}) "
            f"cannot be decoded ({error.reason}); JSON training data must be UTF-8: re-encode the file (e.g. "
            f"iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix}) or fix that line"
        ) from error

    def parse(text: str, where: str):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where} is not valid JSON: {error}; {layout}") from error
        except RecursionError as error:
            raise ValueError(f"{where} nests JSON too deeply to read; {layout}") from error

    if jsonl:  # split on newlines only: str.splitlines also splits on U+2028 / U+2029 / U+0085, which JSON allows raw
        records = [parse(line, f"line {n} of {path}") for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    else:
        records = parse(text, str(path))
    if not isinstance(records, list):
        got = (
            f"a JSON object with keys {sorted(records)[:10]}" if isinstance(records, dict) else type(records).__name__
        )
        raise ValueError(f"{path} must hold a JSON list of records, got {got}; {layout}")
    if not records:
        raise ValueError(f"{path} holds no records: nothing to train on")
    return records


def _from_hf_dataset(dataset, image_folder: Path | None, description: str) -> TrainingRecords:
    if "messages" not in dataset.column_names:
        raise ValueError(f"{description}: a data set needs a 'messages' column, has {dataset.column_names}")
    undecoded = dataset.to_iterable_dataset().decode(False)  # image columns as {"bytes", "path"}: a cheap pre-pass
    return TrainingRecords(dataset, messages_record_to_conversation, image_folder, description, undecoded)


@dataclass
class DataCheck:
    """The pre-pass result: `kept` indices, `problems` of the others, counts, and `fingerprint`, a hash of the records
    in order and the kept indices, which a resumed run compares."""

    num_records: int
    kept: list[int] = field(default_factory=list)
    problems: list[RecordProblem] = field(default_factory=list)
    num_truncated: int = 0
    num_text_only: int = 0
    num_tokenised: int = 0  # records whose chat template was rendered and tokenised
    num_with_assistant_tokens: int = 0
    fingerprint: str = ""

    def summary(self) -> str:
        text = f"{len(self.kept)} of {self.num_records} records kept"
        if self.problems:
            text += f"; {len(self.problems)} bad ({summarize_problems(self.problems)})"
        if self.num_truncated:
            text += f"; {self.num_truncated} longer than max_length (text truncated, images and an answer token kept)"
        return text + (f"; {self.num_text_only} text-only" if self.num_text_only else "")


def check_records(records: TrainingRecords, processor, max_length: int | None, verify_images: bool = False):
    """The pre-pass, reading only the images' headers (decoding them in full with `verify_images`); the chat template
    is rendered and tokenised once, in batches. ChatTemplateError when it marks no assistant token."""
    if not GENERATION_MARKER.search(str(_default_template(processor.chat_template) or "")):
        raise ChatTemplateError(processor.chat_template)
    check, pending, fingerprint = DataCheck(num_records=len(records)), [], hashlib.sha256()
    for index, record in enumerate(records.undecoded):
        record_id = _record_id(record)
        try:
            conversation = records.converter(record, records.image_folder)
            images = [describe_image(image, records.image_folder) for image in conversation.images]
            fingerprint.update(json.dumps([index, record_id, conversation.messages, images]).encode())
            check_conversation(conversation)
            for image in conversation.images:
                _check_image(image, verify_images)
        except RecordError as error:
            check.problems.append(RecordProblem(index, record_id, error.category, error.reason))
            fingerprint.update(json.dumps([index, record_id, error.category]).encode())
            continue
        pending.append((index, conversation))
        if len(pending) == CHECK_BATCH_SIZE:
            _check_lengths(pending, processor, max_length, check)
            pending = []
    _check_lengths(pending, processor, max_length, check)
    if check.num_tokenised and not check.num_with_assistant_tokens:
        raise ChatTemplateError(processor.chat_template, check.num_tokenised)
    check.problems.sort(key=lambda problem: problem.index)
    fingerprint.update(json.dumps(check.kept).encode())
    check.fingerprint = fingerprint.hexdigest()[:16]
    return check


def _check_lengths(pending: list[tuple[int, Conversation]], processor, max_length: int | None, check: DataCheck):
    """Token counts as training sees them (an image marker becomes M tokens; the tokenizer's special tokens count as a
    prefix), and the assistant-token mask of the same encoding."""
    if not pending:
        return
    tokenizer, image_id, m = processor.tokenizer, processor.image_token_id, processor.num_image_tokens
    batch = [conversation.messages for _, conversation in pending]
    encoded = tokenizer.apply_chat_template(
        batch, chat_template=processor.chat_template, return_assistant_tokens_mask=True
    )
    special, masks = tokenizer.num_special_tokens_to_add(pair=False), encoded["assistant_masks"]
    for (index, conversation), ids, mask in zip(pending, encoded["input_ids"], masks, strict=True):
        reason = None
        positions = list(itertools.accumulate((1 + (m - 1) * (token == image_id) for token in ids), initial=special))
        length, image_ends = positions[-1], [positions[i] + m - 1 for i, token in enumerate(ids) if token == image_id]
        check.num_tokenised += 1
        check.num_with_assistant_tokens += any(mask)
        if not any(mask):
            category = "no assistant tokens"
            reason = (
                "the chat template marks none of its tokens as an assistant token (none lies inside its "
                "{% generation %} markers): it would train on nothing"
            )
        elif max_length is not None and length > max_length:
            category = "too long"
            if image_ends and image_ends[-1] >= max_length:
                reason = (
                    f"{length} tokens (with {len(image_ends)} image(s) of M = {m} tokens) exceed max_length "
                    f"{max_length} and truncation would cut image tokens"
                )
            elif next((positions[i] for i, keep in enumerate(mask) if keep), length) >= max_length:
                reason = f"{length} tokens exceed max_length {max_length} and no assistant token would be left"
            check.num_truncated += reason is None
        if reason:
            check.problems.append(RecordProblem(index, conversation.record_id, category, reason))
        else:
            check.kept.append(index)
            check.num_text_only += not conversation.images


def encode_conversation(processor, conversation: Conversation, max_length: int | None = None, vision_features=None):
    """One conversation tokenised with its images by `processor.apply_chat_template`: `input_ids` and `labels` (1-D,
    cut to `max_length`), `pixel_values` when it has images. With `vision_features` (its images' cached features) the
    images are not loaded: the example holds those in place of `pixel_values`, with the same tokens and labels."""
    images = itertools.repeat(STAND_IN_IMAGE) if vision_features is not None else map(load_image, conversation.images)

    def with_image(part: dict) -> dict:
        return {**part, "image": next(images)} if part["type"] == "image" else part

    messages = [{**message, "content": list(map(with_image, message["content"]))} for message in conversation.messages]
    encoded = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    # Cut here rather than by the tokenizer, which would keep (and save) truncation settings.
    input_ids = encoded["input_ids"][0][:max_length]
    labels = torch.where(encoded["assistant_masks"][0][:max_length].bool(), input_ids, IGNORE_INDEX)
    if int((input_ids == processor.image_token_id).sum()) != processor.num_image_tokens * len(conversation.images):
        raise ValueError(
            f"record {conversation.record_id!r}: max_length {max_length} cuts its image tokens; the "
            "pre-pass (check_records) rejects such records"
        )
    if vision_features is not None:
        return {"input_ids": input_ids, "labels": labels, "vision_features": vision_features}
    return {"input_ids": input_ids, "labels": labels, **{k: v for k, v in encoded.items() if k == "pixel_values"}}


def chat_template_for_trl(processor) -> str:
    """The template to give TRL's `DataCollatorForVisionLanguageModeling` so that TRL (which tokenises with
    `add_special_tokens=False`) sees `encode_conversation`'s tokens: `{{ bos_token }}` in front when the tokenizer adds
    a BOS and the template writes none."""
    chat_template, tokenizer = _default_template(processor.chat_template), processor.tokenizer
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    rendered = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "a"}]}])
    return "{{ bos_token }}" * (adds_bos and not rendered.startswith(tokenizer.bos_token)) + chat_template


class SupervisedDataset(torch.utils.data.Dataset):
    """The records at `indices` (those the pre-pass kept), encoded on access; with `vision_features` (image -> its
    cached features, `feature_cache.FeatureCache`) the records with images yield those."""

    def __init__(self, records: TrainingRecords, indices: list[int], processor, max_length, vision_features=None):
        self.records, self.indices, self.processor, self.max_length = records, indices, processor, max_length
        self.vision_features = vision_features

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict:
        index = self.indices[position]
        try:
            conversation, features = self.records[index], None
            if self.vision_features is not None and conversation.images:
                features = torch.stack([self.vision_features[image] for image in conversation.images])
            return encode_conversation(self.processor, conversation, self.max_length, features)
        except Exception as error:  # a corrupt image (PIL's OSError ...) would otherwise name no record nor file
            raise ValueError(
                f"cannot load or encode training {self.records.describe(index)}: {type(error).__name__}: {error} "
                "(--verify-images decodes every image in the pre-pass; --skip-bad-records then skips such records)"
            ) from error


@dataclass
class RightPaddingCollator:
    """Pads on the right (`input_ids` with the pad token, `labels` with -100, `attention_mask` 0), so each sequence
    keeps positions 0..n-1, and concatenates the examples' `pixel_values` (or `vision_features`) in order."""

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict:
        pad, ids = torch.nn.utils.rnn.pad_sequence, [example["input_ids"] for example in examples]
        batch = {
            "input_ids": pad(ids, batch_first=True, padding_value=self.pad_token_id),
            "attention_mask": pad([torch.ones_like(i) for i in ids], batch_first=True),
            "labels": pad([example["labels"] for example in examples], batch_first=True, padding_value=IGNORE_INDEX),
        }
        for key in ("pixel_values", "vision_features"):
            if any(key in example for example in examples):
                batch[key] = torch.cat([example[key] for example in examples if key in example])
        return batch


def pad_token_id(tokenizer) -> int:
    """The pad token, else unk, else eos (never attended to nor trained on)."""
    ids = (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id)
    return next((token_id for token_id in ids if token_id is not None), 0)
