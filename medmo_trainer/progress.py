"""Progress of a stage: the report trainer rank 0 writes (one JSON line per step on stdout, and an
HTTP push to the operator), and the operator reads and folds into `status.stages[]`.

`Progress` is the one contract: the trainer builds it, the operator validates the pushed JSON with it,
and `metrics` and `counters` reach the stage's status unchanged. Every key is camelCase, like the rest
of the status, with `/` between the parts of a path (`reward/bbox`, `<benchmark>/groundingMiou`,
`skipped/badJson`); names a user chose (benchmarks, compared models) are DNS labels and fit that rule.

The push goes to `$MEDMO_PROGRESS_URL` with `Authorization: Bearer <token>`, the token read from
the file `$MEDMO_PROGRESS_TOKEN_FILE` (a mounted Secret, re-read on every send so rotation works)
or `$MEDMO_PROGRESS_TOKEN`. A background thread sends; the queue holds one report and a newer one
replaces an unsent one (the operator wants the latest state, not the history), failures are
retried with backoff, and nothing here ever blocks or fails training.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TextIO

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

logger = logging.getLogger(__name__)

LOG_PREFIX = "[medmo] "
"""Prefix of the per-step JSON lines on stdout (what `kubectl logs` shows)."""

# Metrics of the training stages (pretrain, sft) and the RL learner.
LOSS = "loss"
LEARNING_RATE = "learningRate"
GRAD_NORM = "gradNorm"
TOKENS_PER_SECOND = "tokensPerSecond"
SAMPLES_PER_SECOND = "samplesPerSecond"
MFU = "mfu"
"""Model FLOPs utilisation, 0-1 (`medmo_trainer.flops`); reported on GPUs whose peak is known, in bf16."""
TFLOPS_PER_DEVICE = "tflopsPerDevice"
"""Model TFLOPs per second of one device, averaged over the ranks (`medmo_trainer.flops`)."""
PEAK_GPU_MEMORY_GIB = "peakGpuMemoryGib"
"""Most GPU memory rank 0 held during the step (torch's allocator), in GiB; absent on CPU."""
REWARD_PREFIX = "reward/"
"""RL reward components, `reward/<component>` and `reward/total`."""

# Counters: running totals of the stage, never averaged.
RECORDS_READ = "recordsRead"
SKIPPED_RECORDS = "skippedRecords"
SKIPPED_PREFIX = "skipped/"
"""Malformed records (or unusable prompts) skipped, `skipped/<reason>`."""

KEY_PATTERN = re.compile(r"^[a-z0-9][a-zA-Z0-9-]*(/[a-z0-9][a-zA-Z0-9-]*)*$")
"""camelCase parts (or DNS-label names) joined by `/`: `loss`, `reward/bbox`, `vqa-rad/vqaClosedAcc`."""

ReportedPhase = Literal["Running", "Succeeded", "Failed"]


class Progress(BaseModel):
    """One report of a stage's state (camelCase JSON on the wire)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", use_attribute_docstrings=True,
        validate_assignment=True,
    )

    run: str
    """The MedMOTraining's name."""
    stage: str
    """The stage's name."""
    phase: ReportedPhase = "Running"
    step: Annotated[int, Field(ge=0)] = 0
    """Optimizer steps done (eval: generated batches)."""
    total_steps: Annotated[int, Field(ge=0)] | None = None
    """Steps the stage will run, once known."""
    last_checkpoint: str | None = None
    """URI of the last committed checkpoint."""
    message: str = ""
    """Why the stage is in its phase (a failure's error, where eval results were written)."""
    timestamp: float = 0.0
    """Unix seconds when the report was sent (set by `ProgressReporter.report`)."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """Latest measurements: loss, learningRate, gradNorm, tokensPerSecond, samplesPerSecond, mfu,
    tflopsPerDevice, peakGpuMemoryGib, reward/<component>, eval scores ...; folded into `status.stages[].metrics`."""
    counters: dict[str, int] = Field(default_factory=dict)
    """Running totals: recordsRead, skippedRecords, skipped/<reason>, eval sample counts ...;
    folded into `status.stages[].counters`."""

    @field_validator("metrics", "counters")
    @classmethod
    def _keys_are_camel_case(cls, values: Mapping[str, Any]) -> Mapping[str, Any]:
        wrong = sorted(key for key in values if not KEY_PATTERN.match(key))
        if wrong:
            raise ValueError(f"keys {wrong} are not camelCase parts joined by '/' (e.g. 'gradNorm', 'reward/bbox')")
        return values

    def to_json(self) -> dict[str, Any]:
        """The report as the trainer logs and pushes it."""
        return self.model_dump(mode="json", by_alias=True)


def data_counters(records_read: int | None, skipped_by_reason: Mapping[str, int]) -> dict[str, int]:
    """Counters of the records a stage read and skipped: recordsRead, skippedRecords, skipped/<reason>."""
    counters = {} if records_read is None else {RECORDS_READ: int(records_read)}
    counters[SKIPPED_RECORDS] = int(sum(skipped_by_reason.values()))
    counters.update({SKIPPED_PREFIX + reason: int(n) for reason, n in skipped_by_reason.items() if n})
    return counters


class ProgressReporter:
    """Logs and pushes progress reports; a no-op on ranks other than 0."""

    def __init__(
        self,
        enabled: bool,
        url: str | None = None,
        token: str | None = None,
        token_file: str | None = None,
        stream: TextIO = sys.stdout,
        timeout_seconds: float = 5.0,
        max_backoff_seconds: float = 30.0,
    ) -> None:
        self.enabled = enabled
        self.url = url
        self._token = token
        self._token_file = token_file
        self._stream = stream
        self._timeout = timeout_seconds
        self._max_backoff = max_backoff_seconds
        self._pending: dict[str, Any] | None = None
        self._condition = threading.Condition()
        self._closing = False
        self._idle = True
        self._thread: threading.Thread | None = None
        self.sent = 0
        self.failed_attempts = 0
        if enabled and url:
            self._thread = threading.Thread(target=self._send_loop, name="medmo-progress", daemon=True)
            self._thread.start()

    @classmethod
    def from_env(cls, enabled: bool) -> ProgressReporter:
        return cls(
            enabled=enabled,
            url=os.environ.get("MEDMO_PROGRESS_URL") or None,
            token=os.environ.get("MEDMO_PROGRESS_TOKEN") or None,
            token_file=os.environ.get("MEDMO_PROGRESS_TOKEN_FILE") or None,
        )

    def report(self, progress: Progress) -> None:
        """Logs the report and queues it for sending (replacing an unsent one); returns at once."""
        if not self.enabled:
            return
        payload = progress.model_copy(update={"timestamp": time.time()}).to_json()
        self._stream.write(LOG_PREFIX + json.dumps(payload) + "\n")
        self._stream.flush()
        if self._thread is None:
            return
        with self._condition:
            self._pending = payload
            self._idle = False
            self._condition.notify()

    def close(self, flush_timeout_seconds: float = 5.0) -> None:
        """Gives the last report a bounded time to go out, then stops the sender."""
        if self._thread is None:
            return
        deadline = time.monotonic() + flush_timeout_seconds
        with self._condition:
            while not self._idle and time.monotonic() < deadline:
                self._condition.wait(timeout=max(0.0, deadline - time.monotonic()))
            self._closing = True
            self._condition.notify_all()
        self._thread.join(timeout=1.0)

    def _send_loop(self) -> None:
        backoff = 0.5
        while True:
            with self._condition:
                while self._pending is None and not self._closing:
                    self._condition.wait()
                if self._closing:
                    return
                payload = self._pending
                self._pending = None
            if self._post(payload):
                backoff = 0.5
                with self._condition:
                    self._idle = self._pending is None
                    self._condition.notify_all()
                continue
            self.failed_attempts += 1
            with self._condition:
                if self._pending is None:  # retry this one unless a newer report arrived meanwhile
                    self._pending = payload
                self._condition.wait(timeout=backoff)
            backoff = min(backoff * 2, self._max_backoff)

    def _post(self, payload: dict[str, Any]) -> bool:
        request = urllib.request.Request(
            self.url, data=json.dumps(payload).encode(), method="POST", headers={"Content-Type": "application/json"}
        )
        token = self._read_token()
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                ok = 200 <= response.status < 300
        except Exception as error:  # any failure is retried; training must not notice
            logger.debug("progress push to %s failed: %s", self.url, error)
            return False
        if ok:
            self.sent += 1
        return ok

    def _read_token(self) -> str | None:
        if self._token_file:
            try:
                with open(self._token_file) as handle:
                    return handle.read().strip()
            except OSError as error:
                logger.warning("progress token file %s unreadable: %s", self._token_file, error)
        return self._token


_FINAL_STEP = re.compile(r"^OK: stage finished at step (\d+)\b")


def success_message(steps: int, summary: str, output_uri: str | None) -> str:
    """The termination message of a stage that finished: its final step first, where the operator reads it."""
    return f"OK: stage finished at step {steps} ({summary}); model at {output_uri}"


def final_step(termination_message: str | None) -> int | None:
    """The final step a finished stage's termination message states (:func:`success_message`); None if none.
    The operator's record of a stage whose last progress reports it missed (it was down) comes from here."""
    match = _FINAL_STEP.match(termination_message or "")
    return int(match.group(1)) if match else None
