"""Starts the RL workers as real processes on 127.0.0.1 and stops them by pid.

As in a run's pods, workers and learners here share the run's token through the file named by
`$MEDMO_PROGRESS_TOKEN_FILE`, and rollout workers read weights only from under the run's storage:
here the session's temporary directory, which holds every test's storage.
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from medmo_trainer.rl.http import TOKEN_FILE_ENV

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
def worker(module: str, *args: str, startup_timeout: float = 180.0, env: dict | None = None,
           storage_uri: str | None = None) -> Iterator[Worker]:
    """Runs `python -m module --host 127.0.0.1 --port 0 args...` until the block ends; a rollout
    worker given no storage of its own (`--config` or `--storage-uri`) gets `storage_uri`."""
    if storage_uri and module.endswith("rollout_server") and not {"--config", "--storage-uri"} & set(args):
        args = (*args, "--storage-uri", storage_uri)
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


@pytest.fixture(scope="module", autouse=True)
def run_token(tmp_path_factory) -> Iterator[str]:
    """The run's token in a file named by $MEDMO_PROGRESS_TOKEN_FILE, for the workers and learners
    a test module starts (both inherit the environment); unset again after the module."""
    token = secrets.token_hex(32)
    path = tmp_path_factory.mktemp("run-token") / "token"
    path.write_text(token)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(TOKEN_FILE_ENV, str(path))
        yield token


@pytest.fixture(scope="module")
def start_worker(tmp_path_factory, run_token):
    """The `worker` context manager, for tests that start several; the session's temporary
    directory is the storage rollout workers read weights from."""
    return functools.partial(worker, storage_uri=str(tmp_path_factory.getbasetemp()))
