"""Validating a dataset before training on it (`medmo data check`): what a stage would use and skip.

Reads every shard of a dataset URI as the stages do (`medmo_trainer.data.shards`), validates each
record against the schema, and (unless told not to) opens its images, so a user sees before a run
starts how many records of each task it holds and which lines a stage would skip, and why (the
reasons of `medmo_trainer.data.records.SKIP_REASONS`). JSONL problems carry their line number;
Parquet and Arrow ones their row number.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from medmo_trainer.data.records import MalformedRecordError, RawRecord, load_images, task_of, validate
from medmo_trainer.data.shards import list_shards, read_shard
from medmo_trainer.fsio import url_to_fs


@dataclass
class SkippedLine:
    shard: str
    line: int
    """1-based line of a JSONL shard (row of a Parquet or Arrow shard)."""
    reason: str
    """One of `SKIP_REASONS`."""
    detail: str

    def __str__(self) -> str:
        return f"{self.shard}:{self.line}: {self.reason}: {self.detail}"


@dataclass
class DatasetCheck:
    usable: Counter = field(default_factory=Counter)
    """Usable records per task."""
    kinds: Counter = field(default_factory=Counter)
    """Usable records by how many images they show: `text-only`, `one image`, `several images`;
    and multiple-choice (`choice`), closed and open questions among the VQA ones."""
    skipped: list[SkippedLine] = field(default_factory=list)

    @property
    def skipped_by_reason(self) -> Counter:
        return Counter(line.reason for line in self.skipped)


def check_dataset(uri: str, *, images: bool = True) -> DatasetCheck:
    """Checks every record of a dataset (a `.jsonl` file, a Parquet or Arrow shard, or a folder of them);
    raises DatasetUnavailableError when the URI cannot be read."""
    result = DatasetCheck()
    for shard in list_shards(uri):
        for line, raw in _numbered_records(shard):
            try:
                record = validate(raw)
                if images:
                    load_images(record)
            except MalformedRecordError as error:
                result.skipped.append(SkippedLine(shard, line, error.reason, str(error).split(": ", 1)[-1]))
                continue
            result.usable[record.task] += 1
            shown = len(record.image_refs)
            result.kinds["text-only" if shown == 0 else "one image" if shown == 1 else "several images"] += 1
            if record.task == "vqa":
                result.kinds[f"vqa {record.answer_type}"] += 1
    return result


def _numbered_records(shard: str) -> list[tuple[int, RawRecord]]:
    if not shard.endswith(".jsonl"):
        return list(enumerate(read_shard(shard, {}, None), start=1))
    fs, path = url_to_fs(shard)
    base = shard.rsplit("/", 1)[0]
    lines = fs.cat_file(path).decode("utf-8", errors="replace").splitlines()
    return [(number, RawRecord(line, base, task_of(line))) for number, line in enumerate(lines, start=1) if line.strip()]


def format_check(uri: str, result: DatasetCheck, shown: int = 20) -> str:
    """The report `medmo data check` prints: counts per task, then up to `shown` skipped lines and why."""
    lines = [f"{uri}: {sum(result.usable.values())} usable records, {len(result.skipped)} skipped", ""]
    lines += [f"  {task:<16} {count}" for task, count in sorted(result.usable.items())]
    if result.kinds:
        lines += [""] + [f"  {kind:<16} {count}" for kind, count in sorted(result.kinds.items())]
    if result.skipped:
        lines += ["", "skipped, by reason:"]
        lines += [f"  {reason:<16} {count}" for reason, count in sorted(result.skipped_by_reason.items())]
        lines += ["", f"skipped lines{' (first ' + str(shown) + ')' if len(result.skipped) > shown else ''}:"]
        lines += [f"  {line}" for line in result.skipped[:shown]]
    return "\n".join(lines)
