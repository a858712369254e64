"""The operator's progress endpoint: trainer rank 0 posts its progress here, per run, with a token.

Reports are checked (the run's HMAC token, and the body against the trainer's own contract,
`medmo_trainer.progress.Progress`), bounded in size, and kept in memory as the latest
report per stage; the reconcile loop folds them into the resource's status at its own pace, so a
chatty trainer never turns into a storm of status writes. Nothing here writes to the API server,
and the operator needs no storage credentials.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from pydantic import ValidationError

from medmo_operator import render
from medmo_trainer.progress import Progress
from medmo_trainer.webapi import carries_token, errors_as_json, json_error

MAX_REPORT_BYTES = 64 * 1024
"""A report is a few dozen metrics and counters: a few KiB. Anything larger is refused unread."""
log = logging.getLogger(__name__)


class ProgressStore:
    """Latest report per (namespace, run, stage); thread-safe (handlers run in worker threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reports: dict[tuple[str, str], dict[str, Progress]] = {}

    def put(self, namespace: str, run: str, stage: str, report: Progress) -> None:
        with self._lock:
            self._reports.setdefault((namespace, run), {})[stage] = report

    def latest(self, namespace: str, run: str) -> dict[str, Progress]:
        with self._lock:
            return dict(self._reports.get((namespace, run), {}))

    def forget(self, namespace: str, run: str) -> None:
        with self._lock:
            self._reports.pop((namespace, run), None)


@dataclass
class ProgressEndpoint:
    """The HTTP side: `POST /v1/namespaces/{ns}/medmotrainings/{name}/progress`."""

    store: ProgressStore
    token_key: bytes
    run_uid: Callable[[str, str], str | None]
    """Looks up a run's uid; None when the run is unknown. It may block (an API request): it runs
    in a worker thread, never on the event loop."""

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_REPORT_BYTES, middlewares=[errors_as_json])
        app.router.add_post("/v1/namespaces/{namespace}/medmotrainings/{name}/progress", self.post_progress)
        app.router.add_get("/healthz", self.healthz)
        return app

    async def serve(self, host: str, port: int) -> web.AppRunner:
        """Serves on host:port (port 0: a free one, in the runner's `addresses`) until `cleanup()`."""
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        return runner

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def post_progress(self, request: web.Request) -> web.Response:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        uid = await asyncio.to_thread(self.run_uid, namespace, name)
        # An unknown run gets the same answer as a wrong token, so the endpoint does not tell a
        # caller without a token which runs exist.
        if uid is None or not carries_token(
            request, render.progress_token(render.RunRef(name=name, namespace=namespace, uid=uid), self.token_key)
        ):
            return json_error(
                401,
                "missing or wrong progress token for this run (or no such run is known to this operator):"
                " send Authorization: Bearer <token>",
            )
        try:
            body = json.loads(await request.read())
        except web.HTTPRequestEntityTooLarge:
            return json_error(413, f"progress reports are limited to {MAX_REPORT_BYTES} bytes")
        except (ValueError, RecursionError):  # not JSON, not UTF-8, nested deeper than the parser goes
            return json_error(400, "the body must be a JSON object")
        try:
            report = Progress.model_validate(body)
        except ValidationError as error:
            return json_error(400, f"not a progress report: {error}")
        if report.run != name:
            return json_error(400, f"a report of run {report.run!r} was posted to run {name!r}'s endpoint")
        self.store.put(namespace, name, report.stage, report)
        return web.json_response({"accepted": True}, status=202)
