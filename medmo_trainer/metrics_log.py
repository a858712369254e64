"""The per-step metrics history of a stage, in storage, for the run report.

Object stores cannot append, so the log is a folder of numbered JSONL part files,

    <storage uri>/<stage>/metrics/part-000000.jsonl, part-000001.jsonl, ...

each written once, whole, by one flush (every `flush_every` steps, at most `flush_seconds` apart, and
at close). A writer continues the numbering after the parts already there, so a restarted stage
never overwrites history. Lines are JSON objects:

    {"step": 12, "time": 1764470000.0, "loss": 1.93, "learningRate": 0.0002, ...}   one per logged step
                                                                                     (a progress report's metrics)
    {"event": "start", "step": 10, "time": ...}                                      a (re)start of the stage

A start line says the stage (re)started from step N (its checkpoint; 0 when fresh), so a reader
drops every earlier record past step N: those steps were lost with the killed attempt and are run
again. Readers see, per step, the record of the latest attempt.

Keys are those of `medmo_trainer.progress.Progress.metrics` (camelCase); the report reads `loss`
(training loss) and `reward/<component>` (RL reward components, e.g. `reward/bbox`, and
`reward/total`). Values must be numbers; non-finite ones are
written as null. Nothing here imports torch: the operator's report reads the log with
`read_metrics_log`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Mapping

from medmo_trainer.fsio import join, url_to_fs

logger = logging.getLogger(__name__)

LOG_FOLDER = "metrics"
_PART = re.compile(r"part-(\d+)\.jsonl$")


def stage_log_uri(storage_uri: str, stage: str) -> str:
    """Folder of a stage's metrics log under the run's storage."""
    return join(storage_uri, stage, LOG_FOLDER)


class MetricsLog:
    """Buffers per-step metrics and writes them as part files; a no-op when not enabled (ranks > 0).

    Write failures are logged and retried at the next flush; they never fail training.
    """

    def __init__(
        self,
        uri: str,
        enabled: bool,
        *,
        start_step: int = 0,
        flush_every: int = 50,
        flush_seconds: float = 60.0,
    ) -> None:
        self.uri = uri
        self.enabled = enabled
        self.flush_every = max(1, flush_every)
        self.flush_seconds = flush_seconds
        self._buffer: list[str] = []
        self._steps_buffered = 0
        self._last_flush = time.monotonic()
        self._next_part = 0
        if enabled:
            self._fs, self._root = url_to_fs(uri)
            self._next_part = self._first_free_part()
            self._buffer.append(json.dumps({"event": "start", "step": int(start_step), "time": time.time()}))

    @classmethod
    def for_stage(cls, storage_uri: str, stage: str, enabled: bool, start_step: int = 0, **options) -> MetricsLog:
        """The log of `stage` under the run's storage (`StageConfig.storage.uri`, `StageConfig.stage`)."""
        return cls(stage_log_uri(storage_uri, stage), enabled, start_step=start_step, **options)

    def log(self, step: int, metrics: Mapping[str, float | int | None]) -> None:
        """Records one step's metrics; flushes when enough steps or time have gone by."""
        if not self.enabled:
            return
        record = {"step": int(step), "time": time.time()}
        record.update({str(key): _finite(value) for key, value in metrics.items()})
        self._buffer.append(json.dumps(record))
        self._steps_buffered += 1
        if self._steps_buffered >= self.flush_every or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Writes the buffered lines as the next part file (nothing when the buffer is empty)."""
        if not self.enabled or not self._buffer:
            return
        path = join(self._root, f"part-{self._next_part:06d}.jsonl")
        try:
            self._fs.makedirs(self._root, exist_ok=True)
            self._fs.pipe_file(path, ("\n".join(self._buffer) + "\n").encode())
        except Exception as error:  # storage trouble must not stop training; retried at the next flush
            logger.warning("metrics log: writing %s failed (%s); will retry", path, error)
            return
        self._next_part += 1
        self._buffer.clear()
        self._steps_buffered = 0
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _first_free_part(self) -> int:
        numbers = [number for number, _ in _list_parts(self._fs, self._root)]
        return max(numbers, default=-1) + 1


def _finite(value: object) -> object:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    return value if math.isfinite(value) else None


def read_metrics_log(uri: str) -> list[dict]:
    """Step records of a metrics log folder, one per step (latest attempt), sorted by step.

    A missing folder reads as no records; unreadable lines (a part cut short) are skipped.
    """
    fs, root = url_to_fs(uri)
    by_step: dict[int, dict] = {}
    for _, name in _list_parts(fs, root):
        for line in fs.cat_file(name).decode(errors="replace").splitlines():
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (ValueError, KeyError, TypeError):
                continue
            if record.get("event") == "start":
                by_step = {s: r for s, r in by_step.items() if s <= step}
            else:
                by_step[step] = record
    return [by_step[step] for step in sorted(by_step)]


def _list_parts(fs, root: str) -> list[tuple[int, str]]:
    """(number, path) of the part files under `root`, in order; none when the folder is absent."""
    fs.invalidate_cache(root)  # s3fs caches listings; another writer may have added parts since
    try:
        names = fs.ls(root, detail=False)
    except FileNotFoundError:
        return []
    return sorted((int(m.group(1)), name) for name in names if (m := _PART.search(name)))
