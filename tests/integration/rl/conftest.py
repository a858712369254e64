"""Starts the RL workers as real processes on 127.0.0.1 and stops them by pid."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

_LISTENING = re.compile(r"listening on (http://[\d.]+:\d+)")


class Worker:
    """One worker process and the base URL it printed once bound."""

    def __init__(self, proc: subprocess.Popen, url: str, output: list[str]):
        self.proc, self.url, self.output = proc, url, output

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


@contextmanager
def worker(module: str, *args: str, startup_timeout: float = 180.0, env: dict | None = None) -> Iterator[Worker]:
    """Runs `python -m module --host 127.0.0.1 --port 0 args...` until the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    output: list[str] = []
    found = threading.Event()
    url: list[str] = []

    def pump() -> None:
        for line in proc.stdout:
            output.append(line)
            if not found.is_set() and (match := _LISTENING.search(line)):
                url.append(match.group(1))
                found.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + startup_timeout
    while not found.is_set() and proc.poll() is None and time.monotonic() < deadline:
        found.wait(0.2)
    handle = Worker(proc, url[0] if url else "", output)
    try:
        if not url:
            raise RuntimeError(f"{module} did not start:\n{''.join(output)}")
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="session")
def start_worker():
    """The `worker` context manager, for tests that start several."""
    return worker
