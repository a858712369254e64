"""Prepares datasets for streaming: writes a folder's shard index, or converts a dataset to Parquet shards.

    medmo data index URI [--column FIELD=COLUMN ...]
    medmo data pack SOURCE DEST [--records-per-shard 10000] [--column FIELD=COLUMN ...] [--task TASK]

`index` counts the records of every shard of URI once and writes `medmo-index.json` beside them, so
that every later loader starts without reading any shard (`medmo_trainer.data.shards`). `pack` reads
SOURCE (JSONL, Parquet or Arrow, one shard at a time), keeps the records that validate against the
schema (the others are counted by reason and left out, once, instead of at every pass), makes their
image references absolute (images stay where they are and are fetched when a sample is used), and
writes Parquet shards of `--records-per-shard` records under DEST with their index: the format that
Hugging Face `datasets`, pandas and DuckDB read too.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator

from medmo_trainer.config import ALL_TASKS, RECORD_FIELDS
from medmo_trainer.data.records import MalformedRecordError, validate
from medmo_trainer.data.schema import Record
from medmo_trainer.data.shards import Shard, count_shard, list_shards, open_dataset, write_index
from medmo_trainer.fsio import join, url_to_fs


def index(uri: str, columns: dict[str, str] | None = None) -> dict:
    """Writes the shard index of the dataset folder `uri` (every shard file in it, counted afresh)."""
    shards = [count_shard(shard, columns) for shard in list_shards(uri)]
    return {"index": write_index(uri, shards), "shards": len(shards), "records": sum(s.records for s in shards)}


def pack(source_uri: str, dest: str, records_per_shard: int = 10_000, columns: dict[str, str] | None = None,
         task: str | None = None) -> dict:
    """Converts a dataset to Parquet shards with an index under `dest`; returns a summary."""
    source = open_dataset(source_uri, columns, [task] if task else None)
    fs, root = url_to_fs(dest)
    fs.makedirs(root, exist_ok=True)
    skipped: Counter = Counter()
    written: list[Shard] = []
    batch: list[Record] = []

    def flush() -> None:
        path = join(root, f"part-{len(written):05d}.parquet")
        fs.pipe_file(path, _parquet_bytes(batch))
        tasks = Counter(record.task for record in batch)
        written.append(Shard(fs.unstrip_protocol(path), len(batch), dict(tasks)))
        batch.clear()

    for record in _valid_records(source, skipped):
        batch.append(record)
        if len(batch) == records_per_shard:
            flush()
    if batch:
        flush()
    if not written:
        raise ValueError(f"{source_uri} holds no valid record; skipped: {dict(skipped)}")
    return {"index": write_index(dest, written), "shards": len(written),
            "records": sum(s.records for s in written), "skipped": dict(skipped)}


def _valid_records(source, skipped: Counter) -> Iterator[Record]:
    everything = frozenset(ALL_TASKS)
    for shard in range(len(source.shards)):
        for raw in source.read(shard, everything):
            try:
                yield validate(raw)
            except MalformedRecordError as error:
                skipped[error.reason] += 1


def _parquet_bytes(records: list[Record]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for record in records:
        row = record.model_dump(mode="json", by_alias=True)
        row["meta"] = json.dumps(row["meta"]) if row["meta"] else None  # free-form: no one column type fits
        rows.append({field: row.get(field) for field in RECORD_FIELDS})
    table = pa.Table.from_pylist(rows, schema=_schema())
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _schema():
    import pyarrow as pa

    text, texts = pa.string(), pa.list_(pa.string())
    box = pa.struct([("label", text), ("box", pa.list_(pa.int64()))])
    types = {"images": texts, "options": texts, "findings": texts, "boxes": pa.list_(box)}
    return pa.schema([(field, types.get(field, text)) for field in RECORD_FIELDS])


def parse_columns(pairs: list[str]) -> dict[str, str]:
    """`FIELD=COLUMN` arguments as a column mapping; raises ValueError naming a malformed one."""
    columns = {}
    for pair in pairs:
        field, sep, column = pair.partition("=")
        if not sep or field not in RECORD_FIELDS:
            raise ValueError(f"--column {pair!r}: expected FIELD=COLUMN with FIELD one of {list(RECORD_FIELDS)}")
        columns[field] = column
    return columns
