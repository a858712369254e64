"""Datasets as sequences of shards: which shards a dataset has, how many records of each task each one
holds, and the records of one shard, read when needed.

A dataset URI names one shard or a folder of shards, in one of three formats:

- `*.jsonl`: one `Record` per line (the schema's camelCase keys);
- `*.parquet`: Apache Parquet, as Hugging Face `datasets` publishes (`to_parquet`, the Hub) and
  `medmo data pack` writes;
- `*.arrow`: Arrow IPC streams, as `datasets.Dataset.save_to_disk` writes.

Columns of Parquet and Arrow shards map onto record fields (`DatasetSpec.columns`; a column named like
the field needs no mapping). A folder's `medmo-index.json` lists its shards with their records per
task, so a loader knows every shard's size without opening it; `pack`, `index` and the synthetic
generator write it. A folder without one is counted at start-up, one shard at a time (time grows with
the dataset, memory does not), and the log says how to avoid that.
"""

from __future__ import annotations

import base64
import json
import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from medmo_trainer.config import ALL_TASKS, RECORD_FIELDS
from medmo_trainer.data.records import DatasetUnavailableError, RawRecord, task_of
from medmo_trainer.fsio import join, url_to_fs

logger = logging.getLogger(__name__)

INDEX_NAME = "medmo-index.json"
SHARD_SUFFIXES = (".jsonl", ".parquet", ".arrow")
UNREADABLE = ""
"""Index key of records whose task is missing or not one of the five: kept by every task filter, so
that they are counted as malformed when used, as before any filter."""



@dataclass(frozen=True)
class Shard:
    """One shard and its record counts."""

    uri: str
    records: int
    tasks: Mapping[str, int] | None
    """Records per task (`UNREADABLE` for the rest); None when the records' task is the dataset's
    default task (a tabular dataset without a task column)."""

    def kept(self, tasks: frozenset[str]) -> int:
        """Records that a filter keeping `tasks` passes on."""
        if self.tasks is None:
            return self.records
        return sum(n for task, n in self.tasks.items() if task in tasks or task not in ALL_TASKS)


@dataclass(frozen=True)
class DatasetSource:
    """How to read one dataset: its shards, in name order, and how tabular columns become records."""

    uri: str
    shards: tuple[Shard, ...]
    columns: Mapping[str, str]
    """Record field -> column name, for Parquet and Arrow shards."""
    default_task: str | None
    """The task of records without one (a tabular dataset without a task column names it in `tasks`)."""

    def read(self, index: int, tasks: frozenset[str]) -> list[RawRecord]:
        """The records of shard `index` that the task filter keeps, in file order.

        Raises DatasetUnavailableError if the shard cannot be read or no longer holds what the index says.
        """
        shard = self.shards[index]
        records = [r for r in read_shard(shard.uri, self.columns, self.default_task, not tasks >= set(ALL_TASKS))
                   if r.task in tasks or r.task not in ALL_TASKS]
        if len(records) != shard.kept(tasks):
            raise DatasetUnavailableError(
                self.uri, f"shard {shard.uri} holds {len(records)} records of tasks {sorted(tasks)}, its index "
                f"says {shard.kept(tasks)}: the data changed after {INDEX_NAME} was written; write it again with "
                f"`medmo data index {self.uri}`")
        return records


def open_dataset(uri: str, columns: Mapping[str, str] | None = None,
                 tasks: list[str] | tuple[str, ...] | None = None) -> DatasetSource:
    """The shards of a dataset URI (itself if it is a file); raises DatasetUnavailableError."""
    from medmo_trainer.data import synthetic  # here, so `python -m medmo_trainer.data.synthetic` imports it once

    columns = dict(columns or {})
    default_task = tasks[0] if tasks and len(tasks) == 1 else None
    source = uri
    if uri.startswith(synthetic.SCHEME):
        try:
            source = synthetic.materialize(uri)
        except ValueError as error:
            raise DatasetUnavailableError(uri, str(error)) from error
    try:
        fs, path = url_to_fs(source)
        if fs.isdir(path) and fs.isfile(join(path, INDEX_NAME)):
            shards = _read_index(fs, path)
        else:
            uris = list_shards(source, uri)
            if len(uris) > 1:
                logger.warning("dataset %s has no %s: counting the records of its %d shards once (write the index "
                               "with `medmo data index %s` to start at once)",
                               uri, INDEX_NAME, len(uris), uri)
            shards = tuple(count_shard(shard, columns) for shard in uris)
    except DatasetUnavailableError:
        raise
    except Exception as error:  # credentials, network, permissions: the URI cannot be read as configured
        raise DatasetUnavailableError(uri, f"{type(error).__name__}: {error}") from error
    if any(s.tasks is None for s in shards) and default_task is None:
        raise DatasetUnavailableError(uri, "its records have no task column: map one in columns.task, or name "
                                           "the one task of all its records in tasks")
    return DatasetSource(uri, shards, columns, default_task)


def list_shards(source: str, uri: str | None = None) -> list[str]:
    """The shard URIs of a dataset (itself if it is a file; else its folder's shard files, sorted by
    name), whatever its index says; errors name `uri` (default: `source`)."""
    uri = uri or source
    fs, path = url_to_fs(source)
    if fs.isfile(path):
        return [fs.unstrip_protocol(path)]
    if not fs.isdir(path):
        raise DatasetUnavailableError(uri, "no such file or folder")
    paths = sorted(p for p in fs.find(path) if p.endswith(SHARD_SUFFIXES))
    if not paths:
        raise DatasetUnavailableError(uri, "the folder holds no *.jsonl shard (nor *.parquet, *.arrow)")
    return [fs.unstrip_protocol(p) for p in paths]


def _read_index(fs, folder: str) -> tuple[Shard, ...]:
    with fs.open(join(folder, INDEX_NAME), "rb") as file:
        index = json.load(file)
    return tuple(Shard(fs.unstrip_protocol(join(folder, entry["path"])), entry["records"], entry.get("tasks"))
                 for entry in index["shards"])


def count_shard(uri: str, columns: Mapping[str, str] | None = None) -> Shard:
    """The record counts of one shard (read whole, once)."""
    counts: Counter = Counter()
    for raw in read_shard(uri, columns or {}, None):
        counts[raw.task if raw.task in ALL_TASKS else UNREADABLE] += 1
    tabular_without_tasks = uri.endswith((".parquet", ".arrow")) and set(counts) <= {UNREADABLE}
    # such records take the dataset's default task when read (so do rows whose task is null)
    return Shard(uri, sum(counts.values()), None if tabular_without_tasks else dict(counts))


def write_index(uri: str, shards: list[Shard] | tuple[Shard, ...]) -> str:
    """Writes `medmo-index.json` into the dataset folder `uri` (shard paths relative to it); returns its URI."""
    fs, folder = url_to_fs(uri)
    prefix = fs.unstrip_protocol(folder).rstrip("/") + "/"
    entries = []
    for shard in shards:
        if not shard.uri.startswith(prefix):
            raise ValueError(f"shard {shard.uri} is not inside the dataset folder {uri}")
        entry = {"path": shard.uri[len(prefix):], "records": shard.records}
        if shard.tasks is not None:
            entry["tasks"] = dict(shard.tasks)
        entries.append(entry)
    target = join(folder, INDEX_NAME)
    fs.pipe_file(target, json.dumps({"version": 1, "shards": entries}, indent=0).encode())
    return fs.unstrip_protocol(target)


def read_shard(uri: str, columns: Mapping[str, str], default_task: str | None,
               with_tasks: bool = True) -> list[RawRecord]:
    """Every record of one shard, in file order (blank JSONL lines left out); `with_tasks=False` leaves
    JSONL records' task unread (None) when no filter needs it, which halves the work of reading."""
    base = uri.rsplit("/", 1)[0]
    try:
        fs, path = url_to_fs(uri)
        data = fs.cat_file(path)
    except Exception as error:
        raise DatasetUnavailableError(uri, f"cannot read shard: {type(error).__name__}: {error}") from error
    if uri.endswith((".parquet", ".arrow")):
        return list(_tabular_records(uri, data, base, columns, default_task))
    lines = data.decode("utf-8", errors="replace").splitlines()
    return [RawRecord(line, base, task_of(line) if with_tasks else None) for line in lines if line.strip()]


def _tabular_records(uri: str, data: bytes, base: str, columns: Mapping[str, str],
                     default_task: str | None) -> Iterator[RawRecord]:
    import pyarrow as pa  # only tabular datasets pay for pyarrow's import
    import pyarrow.parquet as pq

    try:
        if uri.endswith(".parquet"):
            table = pq.read_table(pa.BufferReader(data))
        else:
            table = pa.ipc.open_stream(pa.BufferReader(data)).read_all()
    except pa.ArrowException as error:
        raise DatasetUnavailableError(uri, f"not a readable {uri.rsplit('.', 1)[1]} file: {error}") from error
    wanted = {field: columns.get(field, field) for field in RECORD_FIELDS}
    missing = sorted(c for f, c in columns.items() if c not in table.column_names)
    if missing:
        raise DatasetUnavailableError(uri, f"columns names {missing}, which the shard does not have; "
                                           f"its columns are {table.column_names}")
    present = {field: column for field, column in wanted.items() if column in table.column_names}
    stem = uri.rsplit("/", 1)[1].rsplit(".", 1)[0]
    for row_index, row in enumerate(table.select(list(dict.fromkeys(present.values()))).to_pylist()):
        record = {field: _field_value(field, row[column]) for field, column in present.items()
                  if row[column] is not None}
        record.setdefault("id", f"{stem}-{row_index}")
        if default_task is not None:
            record.setdefault("task", default_task)
        if record.get("task") == "vqa" and "answerType" not in record:
            # published VQA sets rarely say; options are what make a question closed
            record["answerType"] = "closed" if record.get("options") else "open"
        task = record.get("task")
        yield RawRecord(json.dumps(record), base, task if isinstance(task, str) else None)


def _image_ref(value):
    if isinstance(value, dict):  # the `datasets` Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes):
        return "data:image;base64," + base64.b64encode(value).decode()
    return value


def _field_value(field: str, value):
    if field == "image":
        return _image_ref(value)
    if field == "images" and isinstance(value, list):
        return [_image_ref(image) for image in value]
    if field == "meta" and isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return {"text": value}
    if field == "answerType" and isinstance(value, str):
        return value.lower()
    if field in ("id", "prompt", "answer") and not isinstance(value, str):
        return str(value)
    return value
