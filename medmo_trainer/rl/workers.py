"""The learner's client of a group of worker replicas (rollout or reward), with failover.

A request that fails for infrastructure reasons (connection refused or reset, timeout, 5xx) is
retried on the next replica, round after round with backoff; every such failover is counted, so
the progress report shows it. A 4xx is the learner's own mistake and is raised at once. With one
URL (a Service), the retries wait 1+2+3+4 s: long enough for a dead pod to leave its endpoints.
Every request carries the run's token (see `medmo_trainer.rl.http`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from medmo_trainer.exit_codes import ConfigError, ExitCode, StageError
from medmo_trainer.rl.http import read_run_token

log = logging.getLogger(__name__)


class WorkerUnavailableError(StageError):
    """No replica of a worker group answered; retryable (the Deployment brings replicas back)."""

    exit_code = ExitCode.UNEXPECTED


class WorkerRequestError(RuntimeError):
    """A worker refused a request as malformed (4xx): a bug on the learner's side."""


class WorkerPool:
    """Replicas of one worker kind, called with JSON POSTs."""

    def __init__(self, name: str, urls: list[str], timeout_seconds: float, rounds: int = 5,
                 backoff_seconds: float = 1.0, token: str | None = None):
        """`token`: the run's token; unset, read from `$MEDMO_PROGRESS_TOKEN_FILE` as in the run's pods."""
        if not urls:
            raise ValueError(f"the {name} worker group has no URLs")
        if token is None:
            try:
                token = read_run_token()
            except ValueError as error:
                raise ConfigError(f"the {name} workers need the run's token: {error}") from None
        self.name = name
        self._headers = {"Authorization": f"Bearer {token}"}
        self.urls = [u.rstrip("/") for u in urls]
        self.timeout = timeout_seconds
        self.rounds = rounds
        self.backoff = backoff_seconds
        self.failovers: Counter[str] = Counter()
        """Failed attempts per replica URL since the start (each was retried elsewhere)."""
        self._lock = threading.Lock()

    def post(self, path: str, body: dict, preferred: int = 0) -> dict:
        """POSTs `body` to `path`, starting at replica `preferred` and failing over to the others."""
        data = json.dumps(body).encode()
        attempts = self.rounds * len(self.urls)
        last_error = ""
        for attempt in range(attempts):
            url = self.urls[(preferred + attempt) % len(self.urls)]
            try:
                return self._post_once(url + path, data)
            except WorkerRequestError:
                raise
            except Exception as error:  # refused, reset, timed out, 5xx: try another replica
                last_error = f"{url}: {error}"
                with self._lock:
                    self.failovers[url] += 1
                log.warning("%s worker %s failed (%s); retrying on another replica", self.name, url, error)
                if (attempt + 1) % len(self.urls) == 0:
                    time.sleep(self.backoff * ((attempt + 1) // len(self.urls)))
        raise WorkerUnavailableError(f"no {self.name} worker answered {path} after {attempts} attempts; last: {last_error}")

    def wait_ready(self, timeout_seconds: float, poll_seconds: float = 2.0) -> None:
        """Returns once a replica answers `GET /readyz` with 200. Raises WorkerUnavailableError after
        `timeout_seconds`, with what each URL last answered (a worker's readiness says why it is not
        ready, e.g. a model it cannot load)."""
        deadline = time.monotonic() + timeout_seconds
        next_log = time.monotonic() + 30
        while True:
            answers = []
            for url in self.urls:
                answer = self._readiness(url)
                if answer is None:
                    return
                answers.append(f"{url}: {answer}")
            if time.monotonic() >= deadline:
                raise WorkerUnavailableError(f"no {self.name} worker became ready within {timeout_seconds:.0f}s; "
                                             f"last answers: {'; '.join(answers)}")
            if time.monotonic() >= next_log:
                log.info("waiting for a ready %s worker: %s", self.name, "; ".join(answers))
                next_log = time.monotonic() + 30
            time.sleep(poll_seconds)

    def _readiness(self, url: str) -> str | None:
        """None when the replica is ready, else why not (its own reason, or why it cannot be reached)."""
        try:
            # With the token, a worker says why it is not ready.
            request = urllib.request.Request(url + "/readyz", headers=self._headers)
            with urllib.request.urlopen(request, timeout=min(self.timeout, 10.0)):
                return None
        except urllib.error.HTTPError as error:
            return f"HTTP {error.code} {error.read().decode(errors='replace')[:300]}"
        except Exception as error:  # not resolvable (no ready endpoint behind a Service yet), refused, timed out
            return str(error)

    def map(self, path: str, bodies: list[dict]) -> list[dict]:
        """POSTs each body concurrently, body i starting at replica i (spreads the work), in order."""
        with ThreadPoolExecutor(max_workers=max(1, len(bodies))) as pool:
            futures = [pool.submit(self.post, path, body, i) for i, body in enumerate(bodies)]
            return [f.result() for f in futures]

    def total_failovers(self) -> int:
        with self._lock:
            return sum(self.failovers.values())

    def _post_once(self, url: str, data: bytes) -> dict:
        request = urllib.request.Request(url, data=data, headers={**self._headers, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:500]
            if 400 <= error.code < 500 and error.code not in (408, 429):
                raise WorkerRequestError(f"{self.name} worker refused {url} ({error.code}): {detail}") from None
            raise RuntimeError(f"HTTP {error.code}: {detail}") from None
