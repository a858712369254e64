"""Progress of a stage: one JSON line per step on stdout, and an HTTP push to the operator.

The push goes to `$MEDMO_PROGRESS_URL` with `Authorization: Bearer <token>`, the token read from
the file `$MEDMO_PROGRESS_TOKEN_FILE` (a mounted Secret, re-read on every send so rotation works)
or `$MEDMO_PROGRESS_TOKEN`. A background thread sends; the queue holds one report and a newer one
replaces an unsent one (the operator wants the latest state, not the history), failures are
retried with backoff, and nothing here ever blocks or fails training.

The payload (camelCase JSON):

    run, stage, phase ("Running" | "Succeeded" | "Failed"), step, totalSteps,
    loss, learningRate, gradNorm, tokensPerSecond, samplesPerSecond, recordsRead, skippedRecords,
    skippedByReason {reason: count}, lastCheckpoint (URI or null), message, timestamp (Unix seconds),
    metrics {name: number}
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

logger = logging.getLogger(__name__)

LOG_PREFIX = "[medmo] "
"""Prefix of the per-step JSON lines on stdout (what `kubectl logs` shows)."""


@dataclass
class Progress:
    """One report of a stage's state."""

    run: str
    stage: str
    phase: str = "Running"
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_second: float | None = None
    samples_per_second: float | None = None
    records_read: int = 0
    skipped_records: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    last_checkpoint: str | None = None
    message: str = ""
    timestamp: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    """Further named metrics (eval scores, reward components), folded into the stage's status metrics."""

    def to_json(self) -> dict[str, Any]:
        return {_camel(key): value for key, value in asdict(self).items()}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


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
        progress.timestamp = time.time()
        payload = progress.to_json()
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
