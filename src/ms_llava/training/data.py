"""Training data for MS-LLaVA: LLaVA's JSON and Hugging Face `messages` + `images` data sets, checked before training.

Two input formats become one form, a `Conversation`: chat messages in the form the processor's chat template takes
(`{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ...}]}`) and the images they refer to.

- **LLaVA JSON** (a `.json` list or `.jsonl` lines): records `{"id", "image", "conversations": [{"from": "human" |
  "gpt", "value": ...}, ...]}`; `image` (a path, or a list of paths) is relative to the image folder. As LLaVA-1.5
  does, the `<image>` markers of a human turn are moved to the front of that turn (`"<image>\\n" + text`). Records
  without `image` and without `<image>` are text-only.
- **Hugging Face data sets** with a `messages` column (roles `system` / `user` / `assistant`, content a string or a
  list of `{"type": "image"}` / `{"type": "text", "text": ...}` parts) and an `images` column (PIL images, image
  bytes, or paths relative to the image folder): a `datasets.Dataset`, a directory written by `save_to_disk`, or local
  `.json` / `.jsonl` / `.parquet` / `.arrow` files. A literal `<image>` in a text part counts as an image part there.

`check_records` is the pre-pass run before training: it converts every record, checks its roles, its assistant
turns, that it has as many images as `<image>` markers, that its images exist and have an image header that PIL
identifies (and decode in full, with `verify_images=True`), that the chat template marks at least one of its tokens
as an assistant token, and that its images and at least one assistant token fit in `max_length`. It returns the
indices to train on (a `DataCheck`, with a fingerprint of the data) and a `RecordProblem` (index, id, reason) for
every bad record; a `BadRecordsError` names them all in one message. A chat template that marks no assistant token in
any record (no `{% generation %}` markers) is a `ChatTemplateError`: training on it would learn nothing.

`SupervisedDataset` encodes one record with `processor.apply_chat_template(..., return_assistant_tokens_mask=True)`:
labels are the token ids inside the template's `{% generation %}` markers (the assistant replies, with their
end-of-sequence token) and -100 everywhere else: system and user text, image tokens, the "ASSISTANT:" prefix. A
record that fails to load or encode during training (an image corrupt beyond its header, without `verify_images`)
raises a `ValueError` naming its index, id and image(s), the original error chained.
`RightPaddingCollator` pads on the right, so that each sequence keeps positions 0..n-1 (the model derives positions
from the cache position, not from the attention mask) and padding is masked (attention 0, label -100).
`chat_template_for_trl` is the template that makes TRL's `SFTTrainer` see the same tokens (docs/training.md).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..images import decode_image

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100
LLAVA_ROLES = {"human": "user", "gpt": "assistant"}
MESSAGE_ROLES = ("system", "user", "assistant")
CHECK_BATCH_SIZE = 512  # conversations tokenised per call in the pre-pass

# Problem categories, as counted in the log.
MALFORMED = "malformed record"
IMAGE_COUNT = "image count mismatch"
MISSING_IMAGE = "missing or unreadable image"
TOO_LONG = "too long"
NO_ASSISTANT_TOKENS = "no assistant tokens"

# How transformers recognises a template that supports `return_assistant_tokens_mask` (utils/chat_template_utils.py).
GENERATION_MARKER = re.compile(r"\{\%-?\s*generation\s*-?\%\}")


# --------------------------------------------------------------------------------------------- records


@dataclass
class Conversation:
    """One training example: chat `messages` whose image parts are `{"type": "image"}` (in order), and `images`, one
    per image part: a file path, a PIL image, or `{"bytes": ..., "path": ...}` (an undecoded `datasets.Image`)."""

    messages: list[dict]
    images: list[Any] = field(default_factory=list)
    record_id: str | None = None


@dataclass(frozen=True)
class RecordProblem:
    """Why record `index` (with `record_id`, if it has one) cannot be trained on."""

    index: int
    record_id: str | None
    category: str
    reason: str

    def __str__(self) -> str:
        name = f"id {self.record_id!r}" if self.record_id is not None else "no id"
        return f"record {self.index} ({name}): {self.category}: {self.reason}"

    def to_dict(self) -> dict:
        return {"index": self.index, "id": self.record_id, "category": self.category, "reason": self.reason}


class RecordError(ValueError):
    """Raised by the converters for a record that cannot be trained on."""

    def __init__(self, category: str, reason: str):
        super().__init__(f"{category}: {reason}")
        self.category, self.reason = category, reason


class BadRecordsError(ValueError):
    """The pre-pass found bad records (and `skip_bad_records` was off); `problems` lists them all."""

    def __init__(self, problems: list[RecordProblem], num_records: int, shown: int = 10):
        self.problems = problems
        listed = "\n  ".join(str(problem) for problem in problems[:shown])
        more = f"\n  ... and {len(problems) - shown} more" if len(problems) > shown else ""
        super().__init__(
            f"{len(problems)} of {num_records} training records are bad ({summarize_problems(problems)}):\n  "
            f"{listed}{more}\nfix them, or pass --skip-bad-records (skip_bad_records=True) to train without them"
        )


class ChatTemplateError(ValueError):
    """The processor's chat template marks no assistant token in any record: every label would be -100."""


def _default_template(chat_template):
    """Named templates (a dict): the processor applies the "default" one."""
    return chat_template.get("default") if isinstance(chat_template, dict) else chat_template


def has_generation_markers(chat_template) -> bool:
    chat_template = _default_template(chat_template)
    return isinstance(chat_template, str) and GENERATION_MARKER.search(chat_template) is not None


def chat_template_error(chat_template: str | None, num_tokenised: int | None = None) -> ChatTemplateError:
    """The error for a template without `{% generation %}` markers (`num_tokenised` None: found before reading the
    data) or whose markers enclose no token of the `num_tokenised` records rendered."""
    if not isinstance(_default_template(chat_template), str) or not _default_template(chat_template):
        what = f"the processor has no chat template (chat_template is {chat_template!r})"
    elif has_generation_markers(chat_template):
        what = f"its {{% generation %}} markers enclose no token of any of the {num_tokenised} record(s) rendered"
    else:
        what = "it has no {% generation %} ... {% endgeneration %} markers around the assistant replies"
    return ChatTemplateError(
        f"the processor's chat template marks no assistant tokens ({what}): every label would be -100 and "
        "training would learn nothing (loss 0). Labels are the tokens inside the template's {% generation %} "
        "markers (return_assistant_tokens_mask). Fix the checkpoint's template, e.g. with LLaVA-1.5's: `import "
        "ms_llava; processor = AutoProcessor.from_pretrained(MODEL); processor.chat_template = "
        "ms_llava.LLAVA_1_5_CHAT_TEMPLATE; processor.save_pretrained(MODEL)`, or wrap each assistant reply of your "
        "template in {% generation %} ... {% endgeneration %}"
    )


def summarize_problems(problems: list[RecordProblem]) -> str:
    """ "2 missing or unreadable image, 1 malformed record" """
    counts = Counter(problem.category for problem in problems)
    return ", ".join(f"{count} {category}" for category, count in counts.most_common())


def _resolve_image(reference: Any, image_folder: Path | None) -> Any:
    """A path relative to the image folder becomes absolute; PIL images and undecoded image dicts pass through."""
    if isinstance(reference, (str, Path)):
        path = Path(reference)
        return str(path if path.is_absolute() or image_folder is None else image_folder / path)
    return reference


def _text_parts(text: str) -> list[dict]:
    """Text with literal `<image>` markers as parts: "a <image> b" -> text "a ", image, text " b"."""
    parts = []
    for position, piece in enumerate(text.split(IMAGE_TOKEN)):
        if position:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def llava_record_to_conversation(record: Any, image_folder: Path | None) -> Conversation:
    """A LLaVA record -> `Conversation`. `<image>` markers of a human turn move to its front, as in LLaVA-1.5."""
    if not isinstance(record, dict):
        raise RecordError(MALFORMED, f"expected a JSON object, got {type(record).__name__}")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise RecordError(MALFORMED, "missing or empty 'conversations'")
    image = record.get("image")
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
        value = _unicode_text(turn["value"], f"turn {number}")
        if role == "user":
            text = value.replace(IMAGE_TOKEN, "").strip()
            content = [{"type": "image"}] * value.count(IMAGE_TOKEN) + [{"type": "text", "text": text}]
        else:
            content = _text_parts(value)  # an <image> here is flagged by check_conversation
        messages.append({"role": role, "content": content})
    images = [_unicode_text(path, "'image'") for path in images]
    return Conversation(messages, [_resolve_image(path, image_folder) for path in images], _record_id(record))


def _unicode_text(text: str, where: str) -> str:
    """`text` if it is valid Unicode; JSON's `\\ud800` escapes give lone surrogates, which the tokenizer (and the file
    system) cannot encode: a record error rather than a crash of the whole pre-pass."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise RecordError(
            MALFORMED, f"{where} holds {text[error.start : error.end]!r}, a lone surrogate that is not valid Unicode"
        ) from None
    return text


def messages_record_to_conversation(record: Any, image_folder: Path | None) -> Conversation:
    """A `messages` + `images` record (Hugging Face style) -> `Conversation`."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or not record["messages"]:
        raise RecordError(MALFORMED, "missing or empty 'messages'")
    images = record.get("images") or []
    if not isinstance(images, list):
        raise RecordError(MALFORMED, f"'images' must be a list, got {type(images).__name__}")
    messages = []
    for number, message in enumerate(record["messages"]):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RecordError(MALFORMED, f"message {number} needs 'role' and 'content', got {message!r}")
        content = message["content"]
        if isinstance(content, str):
            parts = _text_parts(_unicode_text(content, f"message {number}"))
        elif isinstance(content, list):
            parts = []
            for part in content:
                # Arrow gives every part the union of the keys, with None where a part has none.
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image":
                    parts.append({"type": "image"})
                elif kind == "text" and isinstance(part.get("text"), str):
                    parts.extend(_text_parts(_unicode_text(part["text"], f"message {number}")))
                else:
                    raise RecordError(MALFORMED, f"message {number} has a content part {part!r}")
        else:
            raise RecordError(MALFORMED, f"message {number} content must be a string or a list of parts")
        messages.append({"role": message["role"], "content": parts})
    return Conversation(messages, [_resolve_image(image, image_folder) for image in images], _record_id(record))


def _record_id(record: dict) -> str | None:
    record_id = record.get("id")
    return None if record_id is None else str(record_id)


def check_conversation(conversation: Conversation) -> None:
    """Raises `RecordError` unless the roles alternate user / assistant (after an optional system message) and end
    with the assistant, every assistant turn has text and no image, and there is one image per image part."""
    messages = conversation.messages
    for number, message in enumerate(messages):
        role = message["role"]
        if role not in MESSAGE_ROLES:
            raise RecordError(MALFORMED, f"message {number} has role {role!r}; expected one of {MESSAGE_ROLES}")
    start = 1 if messages[0]["role"] == "system" else 0
    for number, message in enumerate(messages[start:], start):
        expected = "user" if (number - start) % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise RecordError(MALFORMED, f"message {number} is from {message['role']!r}; expected {expected!r}")
    if len(messages) == start or messages[-1]["role"] != "assistant":
        raise RecordError(MALFORMED, "the conversation must end with an assistant turn")
    image_parts = 0
    for number, message in enumerate(messages):
        images_here = sum(part["type"] == "image" for part in message["content"])
        if message["role"] == "assistant":
            if images_here:
                raise RecordError(IMAGE_COUNT, f"assistant turn {number} contains {IMAGE_TOKEN}")
            if not "".join(part["text"] for part in message["content"]).strip():
                raise RecordError(MALFORMED, f"assistant turn {number} is empty")
        image_parts += images_here
    if image_parts != len(conversation.images):
        raise RecordError(
            IMAGE_COUNT,
            f"the conversation has {image_parts} {IMAGE_TOKEN} but the record gives {len(conversation.images)} "
            "image(s)",
        )


def describe_image(image: Any) -> str:
    """A path, `embedded image bytes (path ...)` or `a PIL image`: how error messages name an image."""
    if isinstance(image, (str, Path)):
        return str(image)
    if isinstance(image, dict):
        if image.get("bytes") is not None:
            size = len(image["bytes"])
            path = f", path {image['path']!r}" if image.get("path") else ""
            return f"embedded image bytes ({size} bytes{path})"
        return str(image.get("path") or "<no path>")
    if isinstance(image, Image.Image):
        return f"a PIL image ({getattr(image, 'filename', '') or 'in memory'})"
    return repr(image)


def _check_image(image: Any, verify: bool) -> None:
    """Always: the file exists and PIL identifies its header (`Image.open` reads the first bytes only). With `verify`:
    PIL's `verify()` (PNG chunk checksums, up to the end chunk) and a full decode (`load()`, which finds a truncated
    JPEG). Embedded bytes get the same checks."""
    if isinstance(image, str):
        if not Path(image).is_file():
            raise RecordError(MISSING_IMAGE, f"image file not found: {image}")
        _open_image(image, image, verify)
    elif isinstance(image, dict):
        if image.get("bytes") is None:
            _check_image(image.get("path") or "<no path>", verify)
        else:
            _open_image(lambda: io.BytesIO(image["bytes"]), describe_image(image), verify)
    elif not isinstance(image, Image.Image):
        raise RecordError(MISSING_IMAGE, f"an image must be a path, a PIL image or image bytes, got {image!r}")


def _open_image(source, name: str, verify: bool) -> None:
    """`source` is a path or a callable giving a fresh file object (PIL's verify() leaves an image unusable)."""
    fresh = source if callable(source) else lambda: source
    try:
        with Image.open(fresh()) as opened:
            if verify:
                opened.verify()
        if verify:
            decode_image(fresh())  # the full decode of the loader: truncated data refused (images._strict_decoding)
    except Exception as error:  # PIL raises many types for a bad file
        raise RecordError(MISSING_IMAGE, f"cannot read image {name}: {type(error).__name__}: {error}") from error


def load_image(image: Any) -> Image.Image:
    """A path, a PIL image or `{"bytes": ..., "path": ...}` -> a PIL image, read into memory."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, dict):
        image = io.BytesIO(image["bytes"]) if image.get("bytes") is not None else image["path"]
    return decode_image(image)  # the command line's decoding (EXIF-upright, mode kept); the caller names the record


# --------------------------------------------------------------------------------------------- sources


class TrainingRecords(Sequence):
    """The raw records of a training set and how to convert them: `records[i]` is a `Conversation` (or raises
    `RecordError`). `conversations_to_check()` yields the same without decoding images (for the pre-pass)."""

    def __init__(self, records, converter, image_folder: Path | None, description: str, undecoded=None):
        self._records = records
        self._undecoded = records if undecoded is None else undecoded
        self._converter = converter
        self.image_folder = image_folder
        self.description = description

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Conversation:
        return self._converter(self._records[index], self.image_folder)

    def describe(self, index: int) -> str:
        """ "record 3 (id 'x'), image(s) /data/a.png": names a record in an error, without decoding its images."""
        record = self._undecoded[index]
        record_id = _record_id(record) if isinstance(record, dict) else None
        try:
            images = [describe_image(image) for image in self._converter(record, self.image_folder).images]
        except Exception:  # a record the pre-pass rejects: no images to name
            images = []
        name = f"id {record_id!r}" if record_id is not None else "no id"
        return f"record {index} ({name}), image(s) {', '.join(images) or 'none'}"

    def conversations_to_check(self) -> Iterator[tuple[int, str | None, Conversation | RecordError]]:
        """Yields `(index, record id, conversation or the RecordError converting it raised)` for every record."""
        for index, record in enumerate(self._undecoded):
            record_id = _record_id(record) if isinstance(record, dict) else None
            try:
                yield index, record_id, self._converter(record, self.image_folder)
            except RecordError as error:
                yield index, record_id, error


def load_training_records(data, image_folder: str | Path | None = None) -> TrainingRecords:
    """Opens `data`: a LLaVA `.json` / `.jsonl` file, a `messages` + `images` `.json` / `.jsonl` / `.parquet` /
    `.arrow` file, a `datasets.Dataset`, or a directory written by `Dataset.save_to_disk`. Relative image paths are
    taken relative to `image_folder`, by default the data file's directory."""
    folder = Path(image_folder) if image_folder is not None else None
    if folder is not None and not folder.is_dir():
        raise ValueError(f"image folder not found: {folder}")
    if _is_hf_dataset(data):
        return _from_hf_dataset(data, folder, f"the {type(data).__name__} given")
    path = Path(data)
    if path.is_dir():
        import datasets

        try:
            dataset = datasets.load_from_disk(str(path))
        except FileNotFoundError as error:  # a folder that save_to_disk did not write
            raise ValueError(
                f"{path} is a folder but not a data set written by Dataset.save_to_disk ({error}); give a data file "
                "(.json, .jsonl, .parquet, .arrow) or such a folder"
            ) from error
        return _from_hf_dataset(dataset, folder, str(path))
    if not path.is_file():
        raise ValueError(f"training data not found: {path}")
    folder = folder if folder is not None else path.parent
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".arrow"):
        import datasets

        # Not datasets.load_dataset: its packaged builders send a download-count request to the Hub (S3) first.
        try:
            dataset = (
                datasets.Dataset.from_parquet(str(path))
                if suffix == ".parquet"
                else datasets.Dataset.from_file(str(path))
            )
        except Exception as error:  # pyarrow raises its own types (ArrowInvalid ...) for a file that is not one
            kind = "a Parquet" if suffix == ".parquet" else "an Arrow"
            raise ValueError(
                f"{path} is not {kind} file that can be read: {type(error).__name__}: {error}; write it again (e.g. "
                "with datasets' Dataset.to_parquet), or give the data as .json / .jsonl"
            ) from error
        return _from_hf_dataset(dataset, folder, str(path))
    if suffix not in (".json", ".jsonl"):
        raise ValueError(f"{path}: unsupported data file type {suffix!r}; use .json, .jsonl, .parquet or .arrow")
    records = _read_json_records(path)
    if not records:
        raise ValueError(f"{path} holds no records: nothing to train on")
    first = next(((index, record) for index, record in enumerate(records) if isinstance(record, dict)), None)
    if first is None:
        raise ValueError(
            f"{path}: no record is a JSON object (record 0 is {type(records[0]).__name__}); each record must be an "
            "object with 'conversations' (LLaVA format) or 'messages' (messages format)"
        )
    index, record = first
    if "conversations" in record:
        return TrainingRecords(records, llava_record_to_conversation, folder, f"{path} (LLaVA format)")
    if "messages" in record:
        return TrainingRecords(records, messages_record_to_conversation, folder, f"{path} (messages format)")
    raise ValueError(
        f"{path}: cannot tell the format: record {index}, the first JSON object, has neither 'conversations' (LLaVA "
        f"format) nor 'messages' (messages format); its keys are {sorted(record)[:10]}"
    )


def _read_json_records(path: Path) -> list:
    """The records of a `.json` file (one JSON list) or a `.jsonl` file (one JSON value per line). Every way the file
    can fail to be that is a ValueError naming the file (and the line, for `.jsonl`) and what to do."""
    layout = (
        "a .jsonl file holds one JSON record per line"
        if path.suffix.lower() == ".jsonl"
        else "a .json file holds one JSON list of records"
    )
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read training data {path}: {error.strerror or error}") from error
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark (Windows editors write one) is accepted
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(
            f"{path} is not UTF-8 text: byte {data[error.start]:#04x} at offset {error.start} (line {line}) "
            f"cannot be decoded ({error.reason}); JSON training data must be UTF-8: re-encode the file (e.g. "
            f"iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix}) or fix that line"
        ) from error
    if path.suffix.lower() == ".jsonl":
        records = []
        # split on newlines only: str.splitlines also splits on U+2028 / U+2029 / U+0085, which JSON allows raw
        for number, line in enumerate(text.split("\n"), 1):
            if line.strip():
                records.append(_parse_json(line, path, f"line {number} of {path}", layout))
        return records
    records = _parse_json(text, path, str(path), layout)
    if not isinstance(records, list):
        got = (
            f"a JSON object with keys {sorted(records)[:10]}" if isinstance(records, dict) else type(records).__name__
        )
        raise ValueError(f"{path} must hold a JSON list of records, got {got}; {layout}")
    return records


def _parse_json(text: str, path: Path, where: str, layout: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not valid JSON: {error}; {layout}") from error
    except RecursionError as error:
        raise ValueError(f"{where} nests JSON too deeply to read; {layout}") from error


def _is_hf_dataset(data) -> bool:
    module = type(data).__module__
    return module.startswith("datasets.") and type(data).__name__ in ("Dataset", "DatasetDict")


def _from_hf_dataset(dataset, image_folder: Path | None, description: str) -> TrainingRecords:
    if type(dataset).__name__ == "DatasetDict":
        if "train" not in dataset:
            raise ValueError(f"{description}: a DatasetDict without a 'train' split (splits: {list(dataset)})")
        dataset = dataset["train"]
    if "messages" not in dataset.column_names:
        raise ValueError(f"{description}: a data set needs a 'messages' column, has {dataset.column_names}")
    return TrainingRecords(
        dataset, messages_record_to_conversation, image_folder, description, undecoded=_without_image_decoding(dataset)
    )


def _without_image_decoding(dataset):
    """The same rows with `datasets.Image` columns left undecoded ({"bytes", "path"}), so the pre-pass is cheap."""
    import copy

    import datasets

    features = copy.deepcopy(dataset.features)
    changed = False

    def undecode(feature) -> None:  # in place, through lists and dicts of features
        nonlocal changed
        if isinstance(feature, datasets.Image) and feature.decode:
            feature.decode, changed = False, True
        elif isinstance(feature, dict):
            for child in feature.values():
                undecode(child)
        elif isinstance(feature, list):
            for child in feature:
                undecode(child)
        elif hasattr(feature, "feature"):  # datasets.List / Sequence / LargeList
            undecode(feature.feature)

    undecode(features)
    return dataset.cast(features) if changed else dataset


# --------------------------------------------------------------------------------------------- pre-pass


@dataclass
class DataCheck:
    """The pre-pass result: `kept` indices to train on, `problems` of the others, counts worth logging, and
    `fingerprint`, a hash of the records in order (ids, messages, image references) and of the kept indices, which a
    resumed run compares."""

    num_records: int
    kept: list[int]
    problems: list[RecordProblem]
    num_truncated: int = 0
    num_text_only: int = 0
    num_tokenised: int = 0  # records whose chat template was rendered and tokenised
    num_with_assistant_tokens: int = 0  # of those, records with at least one assistant (label) token
    fingerprint: str = ""

    def summary(self) -> str:
        text = f"{len(self.kept)} of {self.num_records} records kept"
        if self.problems:
            text += f"; {len(self.problems)} bad ({summarize_problems(self.problems)})"
        if self.num_truncated:
            text += f"; {self.num_truncated} longer than max_length (their text is truncated, images and at least "
            text += "one answer token kept)"
        if self.num_text_only:
            text += f"; {self.num_text_only} text-only"
        return text


def check_records(
    records: TrainingRecords, processor, max_length: int | None, verify_images: bool = False
) -> DataCheck:
    """The pre-pass: every record is converted and checked (see the module docstring) without decoding images (only
    their headers are read, unless `verify_images`); the chat template is rendered and tokenised in batches, once, for
    the lengths and the assistant-token masks.

    Raises:
        ChatTemplateError: the chat template has no `{% generation %}` markers (before any record is read), or no
            record it tokenised has an assistant token.
    """
    chat_template = processor.chat_template
    if not has_generation_markers(chat_template):
        raise chat_template_error(chat_template)
    problems, pending = [], []
    check = DataCheck(num_records=len(records), kept=[], problems=problems)
    fingerprint = hashlib.sha256()
    for index, record_id, conversation in records.conversations_to_check():
        if isinstance(conversation, RecordError):
            problems.append(RecordProblem(index, record_id, conversation.category, conversation.reason))
            fingerprint.update(json.dumps([index, record_id, conversation.category]).encode())
            continue
        fingerprint.update(_fingerprint_entry(index, conversation, records.image_folder))
        try:
            check_conversation(conversation)
            for image in conversation.images:
                _check_image(image, verify_images)
        except RecordError as error:
            problems.append(RecordProblem(index, conversation.record_id, error.category, error.reason))
            continue
        pending.append((index, conversation))
        if len(pending) == CHECK_BATCH_SIZE:
            _check_lengths(pending, processor, max_length, check)
            pending = []
    _check_lengths(pending, processor, max_length, check)
    if check.num_tokenised and not check.num_with_assistant_tokens:
        raise chat_template_error(chat_template, check.num_tokenised)
    problems.sort(key=lambda problem: problem.index)
    fingerprint.update(json.dumps(check.kept).encode())
    check.fingerprint = fingerprint.hexdigest()[:16]
    return check


def _fingerprint_entry(index: int, conversation: Conversation, image_folder: Path | None) -> bytes:
    """What identifies a record for `DataCheck.fingerprint`: its id, messages and image references (paths relative
    to the image folder, so that moving the folder keeps the fingerprint; embedded images by their path and size)."""
    images = []
    for image in conversation.images:
        if isinstance(image, str):
            if image_folder is not None and image.startswith(str(image_folder) + os.sep):
                image = os.path.relpath(image, image_folder)
            images.append(image)
        elif isinstance(image, dict):
            images.append([image.get("path"), None if image.get("bytes") is None else len(image["bytes"])])
        else:
            images.append([type(image).__name__, getattr(image, "size", None)])
    return json.dumps([index, conversation.record_id, conversation.messages, images], default=str).encode()


def _check_lengths(pending: list[tuple[int, Conversation]], processor, max_length: int | None, check: DataCheck):
    """Token counts as `SupervisedDataset` will see them: each image marker becomes M tokens, and the special tokens
    the tokenizer adds (a BOS) are counted as a prefix, conservatively. The same encoding gives the assistant-token
    mask: a record without any assistant token would train on nothing."""
    if not pending:
        return
    tokenizer = processor.tokenizer
    encoded = tokenizer.apply_chat_template(
        [conversation.messages for _, conversation in pending],
        chat_template=processor.chat_template,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    extra_per_image = processor.num_image_tokens - 1
    num_special = tokenizer.num_special_tokens_to_add(pair=False)
    for (index, conversation), ids, mask in zip(
        pending, encoded["input_ids"], encoded["assistant_masks"], strict=True
    ):
        check.num_tokenised += 1
        if not any(mask):
            reason = (
                "the chat template marks none of its tokens as an assistant token (none lies inside its "
                "{% generation %} markers): it would train on nothing"
            )
            check.problems.append(RecordProblem(index, conversation.record_id, NO_ASSISTANT_TOKENS, reason))
            continue
        check.num_with_assistant_tokens += 1
        positions, position = [], num_special  # position of each token once image markers are expanded
        for token in ids:
            positions.append(position)
            position += 1 + (extra_per_image if token == processor.image_token_id else 0)
        length = position
        if max_length is not None and length > max_length:
            image_ends = [
                positions[i] + extra_per_image for i, token in enumerate(ids) if token == processor.image_token_id
            ]
            first_answer = next((positions[i] for i, keep in enumerate(mask) if keep), length)
            if image_ends and image_ends[-1] >= max_length:
                reason = (
                    f"{length} tokens (with {len(image_ends)} image(s) of M = {processor.num_image_tokens} tokens) "
                    f"exceed max_length {max_length} and truncation would cut image tokens"
                )
            elif first_answer >= max_length:
                reason = f"{length} tokens exceed max_length {max_length} and no assistant token would be left"
            else:
                reason = None
                check.num_truncated += 1
            if reason:
                check.problems.append(RecordProblem(index, conversation.record_id, TOO_LONG, reason))
                continue
        check.kept.append(index)
        check.num_text_only += not conversation.images


# --------------------------------------------------------------------------------------------- encoding


def encode_conversation(
    processor, conversation: Conversation, max_length: int | None = None, vision_features: torch.Tensor | None = None
) -> dict:
    """Tokenises one conversation with its images: `input_ids` and `labels` (1-D, cut to `max_length` tokens from
    the right), `pixel_values` (images, 3, H, W) when it has images. Labels keep only the tokens inside the chat
    template's generation markers. With `vision_features` (its images' features, `(images, tokens, dim)`) the images
    are not loaded: the example holds those in place of `pixel_values`, and the same `input_ids` and `labels`."""
    if vision_features is not None:
        input_ids, assistant_mask = _encode_text(processor, conversation.messages)
    else:
        images = iter([load_image(image) for image in conversation.images])
        messages = [
            {
                **message,
                "content": [
                    {"type": "image", "image": next(images)} if part["type"] == "image" else part
                    for part in message["content"]
                ],
            }
            for message in conversation.messages
        ]
        encoded = processor.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
        )
        input_ids, assistant_mask = encoded["input_ids"][0], encoded["assistant_masks"][0]
    # Truncated here rather than by the tokenizer, whose backend would keep (and save with the processor) the
    # truncation settings. The pre-pass drops records whose images would not fit.
    input_ids = input_ids[:max_length]
    labels = torch.where(assistant_mask[:max_length].bool(), input_ids, IGNORE_INDEX)
    num_image_tokens = int((input_ids == processor.image_token_id).sum())
    if num_image_tokens != processor.num_image_tokens * len(conversation.images):
        raise ValueError(
            f"record {conversation.record_id!r}: max_length {max_length} cuts its image tokens; the pre-pass "
            "(check_records) rejects such records"
        )
    example = {"input_ids": input_ids, "labels": labels}
    if vision_features is not None:
        example["vision_features"] = vision_features
    elif "pixel_values" in encoded:
        example["pixel_values"] = encoded["pixel_values"]
    return example


def _encode_text(processor, messages: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids` and the assistant mask that `processor.apply_chat_template` gives, without images: the prompt it
    renders, each image token expanded to M as it does, tokenised as it does (special tokens unless the prompt opens
    with BOS); the mask from the tokenizer's own chat template with the image tokens expanded alike."""
    tokenizer, image_id, num_image_tokens = processor.tokenizer, processor.image_token_id, processor.num_image_tokens
    prompt = processor.apply_chat_template(messages, tokenize=False)
    bos = tokenizer.bos_token
    input_ids = tokenizer(
        prompt.replace(processor.image_token, processor.image_token * num_image_tokens),
        add_special_tokens=not (bos is not None and prompt.startswith(bos)),
    )["input_ids"]
    plain = tokenizer.apply_chat_template(
        messages, chat_template=processor.chat_template, tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True,
    )  # fmt: skip
    expanded_ids, expanded_mask = [], []
    for token, keep in zip(plain["input_ids"], plain["assistant_masks"], strict=True):
        copies = num_image_tokens if token == image_id else 1
        expanded_ids += [token] * copies
        expanded_mask += [0 if token == image_id else keep] * copies
    # The special tokens the processor adds (BOS) surround the same tokens: find where these start.
    for start in range(len(input_ids) - len(expanded_ids) + 1):
        if input_ids[start : start + len(expanded_ids)] == expanded_ids:
            mask = [0] * start + expanded_mask + [0] * (len(input_ids) - start - len(expanded_ids))
            return torch.tensor(input_ids), torch.tensor(mask)
    # Without this check a tokenizer that merges text across image tokens would get labels on the wrong tokens.
    raise ValueError("the tokenizer splits the prompt differently around expanded image tokens; train without the "
                     "vision feature cache")  # fmt: skip


def chat_template_for_trl(processor) -> str:
    """The chat template to give TRL's `DataCollatorForVisionLanguageModeling` so that TRL tokenises a conversation
    exactly as `encode_conversation` does: the processor's template, with `{{ bos_token }}` in front when the
    tokenizer adds a BOS and the template writes none (TRL tokenises with `add_special_tokens=False`; the processor,
    here and at inference, lets the tokenizer add its BOS)."""
    chat_template = _default_template(processor.chat_template)
    tokenizer = processor.tokenizer
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    if not adds_bos:
        return chat_template
    rendered = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "a"}]}])
    return chat_template if rendered.startswith(tokenizer.bos_token) else "{{ bos_token }}" + chat_template


class SupervisedDataset(torch.utils.data.Dataset):
    """The records at `indices` (those the pre-pass kept), encoded on access by `encode_conversation`."""

    def __init__(
        self, records: TrainingRecords, indices: list[int], processor, max_length: int | None, vision_features=None
    ):
        self.records, self.indices, self.processor, self.max_length = records, indices, processor, max_length
        # A mapping from a record's image (its path) to the image's `vision_features` `(tokens, dim)`, e.g.
        # ms_llava.training.feature_cache.FeatureCache: records with images then yield those, the images unloaded.
        self.vision_features = vision_features

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict:
        index = self.indices[position]
        try:
            conversation = self.records[index]
            features = None
            if self.vision_features is not None and conversation.images:
                features = torch.stack([self.vision_features[image] for image in conversation.images])
            return encode_conversation(self.processor, conversation, self.max_length, features)
        except Exception as error:  # a corrupt image (PIL's OSError ...) would otherwise name no record nor file
            raise ValueError(
                f"cannot load or encode training {self.records.describe(index)}: {type(error).__name__}: {error} "
                "(--verify-images decodes every image in the pre-pass; --skip-bad-records then skips such records)"
            ) from error


class RightPaddingCollator:
    """Pads a list of encoded examples on the right: `input_ids` with the pad token, `labels` with -100,
    `attention_mask` 0 on padding; concatenates the examples' `pixel_values` (or `vision_features`) in order."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict:
        longest = max(len(example["input_ids"]) for example in examples)
        batch = {
            "input_ids": torch.full((len(examples), longest), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(examples), longest), dtype=torch.long),
            "labels": torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long),
        }
        for row, example in enumerate(examples):
            length = len(example["input_ids"])
            batch["input_ids"][row, :length] = example["input_ids"]
            batch["attention_mask"][row, :length] = 1
            batch["labels"][row, :length] = example["labels"]
        for key in ("pixel_values", "vision_features"):
            images = [example[key] for example in examples if key in example]
            if images:
                batch[key] = torch.cat(images)
        return batch


def pad_token_id(tokenizer) -> int:
    """The pad token, else unk, else eos (the value is never attended to nor trained on)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0
