"""Reading JSONL record shards from any fsspec URI, validating records and loading their images.

Malformed records never stop a run: each is counted under a reason (`SKIP_REASONS`) and skipped.
An unreadable dataset URI raises `DatasetUnavailableError`, whose message names the URI.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError

from medmo_trainer.config import ALL_TASKS, TaskType
from medmo_trainer.data.schema import Record
from medmo_trainer.fsio import join, url_to_fs

SKIP_REASONS = ("badJson", "unknownTask", "badBox", "invalidRecord", "missingImage", "badImage", "tooLong")
"""Why a record was skipped: unparseable line; task not one of the five; a box off the 0-1000 grid or
not matching the answer; any other schema violation; image not found; image not decodable; prompt
and image alone longer than `maxSeqLength`."""


class DatasetUnavailableError(RuntimeError):
    """A dataset URI cannot be read or holds no usable record. Not retryable: the config must change."""

    def __init__(self, uri: str, detail: str):
        super().__init__(f"dataset {uri!r} is unavailable: {detail}")
        self.uri = uri


class MalformedRecordError(ValueError):
    """One record cannot be used; `reason` is one of `SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class RawRecord:
    """One JSONL line, not yet validated, with the folder its relative image paths start from.

    Only the line is kept (parsed again when used): a string costs far less memory than the parsed
    object, and a loader holds every line of the shards it reads from. Tabular (Parquet, Arrow)
    shards' rows become such lines too (`medmo_trainer.data.shards`).
    """

    line: str
    base: str
    task: str | None
    """The record's task when the line is a JSON object with a string `task`, else None."""

    def parse(self) -> dict:
        """The JSON object of the line; raises MalformedRecordError('badJson')."""
        try:
            data = json.loads(self.line)
        except json.JSONDecodeError as error:
            raise MalformedRecordError("badJson", f"{error}: {self.line[:80]}") from error
        if not isinstance(data, dict):
            raise MalformedRecordError("badJson", f"not a JSON object: {self.line[:80]}")
        return data


def task_of(line: str) -> str | None:
    """The task of a JSONL line when it is a JSON object with a string `task`, else None."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError:
        return None
    task = data.get("task") if isinstance(data, dict) else None
    return sys.intern(task) if isinstance(task, str) else None


def validate(raw: RawRecord) -> Record:
    """The validated record, its image references made absolute; raises MalformedRecordError."""
    data = raw.parse()
    try:
        record = Record.model_validate(data)
    except ValidationError as error:
        raise MalformedRecordError(_reason(error), str(error.errors()[0]["msg"])) from error
    return record.model_copy(update={
        "image": None if record.image is None else resolve_image_ref(record.image, raw.base),
        "images": [resolve_image_ref(image, raw.base) for image in record.images],
    })


def _reason(error: ValidationError) -> str:
    first = error.errors()[0]
    location = first["loc"]
    if location and location[0] == "task":
        return "unknownTask"
    if (location and location[0] == "boxes") or "box" in first["msg"]:
        return "badBox"
    return "invalidRecord"


def resolve_image_ref(image: str, base: str) -> str:
    """An absolute URI (or data URI) for an image reference relative to a shard's folder."""
    if image.startswith("data:") or "://" in image or image.startswith("/"):
        return image
    return join(base, image)


@lru_cache(maxsize=64)
def _image_bytes(ref: str) -> bytes:
    if ref.startswith("data:"):
        try:
            return base64.b64decode(ref.split(",", 1)[1], validate=True)
        except (IndexError, binascii.Error) as error:
            raise MalformedRecordError("badImage", f"embedded image is not base64: {error}") from error
    try:
        fs, path = url_to_fs(ref)
        return fs.cat_file(path)
    except FileNotFoundError as error:
        raise MalformedRecordError("missingImage", ref) from error


def load_image(ref: str) -> Image.Image:
    """The image at an absolute reference (URI, path or data URI), as RGB; raises MalformedRecordError."""
    data = _image_bytes(ref)
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise MalformedRecordError("badImage", f"{ref[:80]}: {error}") from error


def load_images(record: Record) -> list[Image.Image]:
    """The record's images in order (none for a text-only record); raises MalformedRecordError."""
    return [load_image(ref) for ref in record.image_refs]


def iter_records(uri: str, tasks: list[TaskType] | tuple[TaskType, ...] | None = None,
                 skipped: Counter | None = None) -> Iterator[Record]:
    """Valid records of a dataset in file order (for evaluation and RL prompts); malformed ones are
    counted into `skipped` by reason and left out. Images are checked when loaded, not here. Reads one
    shard at a time."""
    from medmo_trainer.data.shards import open_dataset  # shards builds on this module's RawRecord

    keep = frozenset(tasks or ALL_TASKS)
    source = open_dataset(uri, tasks=tasks)
    for index in range(len(source.shards)):
        yield from _valid(source.read(index, keep), skipped)


def _valid(raws: list[RawRecord], skipped: Counter | None) -> Iterator[Record]:
    for raw in raws:
        try:
            yield validate(raw)
        except MalformedRecordError as error:
            if skipped is not None:
                skipped[error.reason] += 1
