"""What the RL workers' HTTP services share: the run's token, health routes, JSON errors, request
parsing, serving.

Every route but `/healthz` and `/readyz` needs `Authorization: Bearer <the run's token>`: the token
the operator derives for the run (an HMAC of its identity, the same one its progress reports carry)
and mounts from the run's Secret into every pod of the run, learner and workers alike. The probes
stay open because the kubelet sends no token; they answer a status and nothing else unless the
caller sends the token (the learner does, and reports why a worker is not ready).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from medmo_trainer.webapi import carries_token, errors_as_json, json_error

log = logging.getLogger(__name__)

READY = web.AppKey("ready", dict)
"""Mutable readiness flag of an app: `{"ready": bool, "reason": str}`."""
TOKEN = web.AppKey("token", str)
"""The run's token: requests to every route but the probes must carry it."""
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
"""Routes the kubelet's probes call without a token; they reveal nothing to an unauthenticated caller."""
TOKEN_FILE_ENV = "MEDMO_PROGRESS_TOKEN_FILE"
"""Where every pod of a run finds the run's token (the mounted Secret): the learner's progress
reports, its worker requests and the workers' checks all use this one token."""

ModelT = TypeVar("ModelT", bound=BaseModel)


def read_run_token(path: str | None = None) -> str:
    """The run's token from `path`, else from the file named by `$MEDMO_PROGRESS_TOKEN_FILE`."""
    path = path or os.environ.get(TOKEN_FILE_ENV)
    if not path:
        raise ValueError(f"no run token: give --token-file or set {TOKEN_FILE_ENV} to the file holding the run's "
                         "token (the operator mounts it from the run's Secret)")
    try:
        with open(path) as handle:
            token = handle.read().strip()
    except OSError as error:
        raise ValueError(f"cannot read the run's token from {path}: {error}") from None
    if not token:
        raise ValueError(f"the run's token file {path} is empty")
    return token


def is_authorized(request: web.Request) -> bool:
    """Whether the request carries the run's token."""
    return carries_token(request, request.app[TOKEN])


@web.middleware
async def require_token(request: web.Request, handler):
    """401 for any route but the probes without the run's token, before the route is even looked at."""
    if request.path not in OPEN_PATHS and not is_authorized(request):
        response = json_error(401, "missing or wrong token: send Authorization: Bearer <the run's token>")
        response.headers["WWW-Authenticate"] = 'Bearer realm="medmo"'
        return response
    return await handler(request)


def new_app(token: str, max_request_bytes: int) -> web.Application:
    """A worker app: bounded bodies, JSON errors, the run's token on every route but the probes."""
    if not token:
        raise ValueError("a worker needs the run's token")
    app = web.Application(client_max_size=max_request_bytes, middlewares=[errors_as_json, require_token])
    app[TOKEN] = token
    add_health_routes(app)
    return app


async def parse_body(request: web.Request, model: type[ModelT]) -> ModelT:
    """The request's JSON body as `model`; raises a 4xx response naming the problem."""
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(
            text=json.dumps({"error": f"send JSON with Content-Type application/json, not {request.content_type!r}"}),
            content_type="application/json",
        )
    try:
        payload = await request.json()
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested deeper than the parser goes
        raise web.HTTPBadRequest(
            text=json.dumps({"error": f"request body is not valid JSON: {exc}"}), content_type="application/json"
        ) from None
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:10])
        raise web.HTTPUnprocessableEntity(
            text=json.dumps({"error": f"invalid request: {problems}"}), content_type="application/json"
        ) from None


def add_health_routes(app: web.Application) -> None:
    """`/healthz` (the process serves) and `/readyz` (it can take work now)."""
    app[READY] = {"ready": False, "reason": "starting"}

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        state = request.app[READY]
        body = {"status": "ready" if state["ready"] else "not ready"}
        if is_authorized(request):  # the reason names the model and its error: only for the run's own pods
            body["reason"] = state["reason"]
        return web.json_response(body, status=200 if state["ready"] else 503)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)


def serve(app: web.Application, host: str, port: int, name: str) -> None:
    """Serves until SIGTERM or SIGINT; prints `<name> listening on http://host:port` once bound.

    Port 0 binds a free port; the printed line tells the real one (tests read it).
    """
    asyncio.run(_serve(app, host, port, name))


async def _serve(app: web.Application, host: str, port: int, name: str) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]
    print(f"{name} listening on http://{bound[0]}:{bound[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    app[READY].update(ready=False, reason="shutting down")
    await runner.cleanup()
    print(f"{name} stopped", file=sys.stderr, flush=True)
