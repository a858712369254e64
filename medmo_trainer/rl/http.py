"""What the RL workers' HTTP services share: health routes, JSON errors, request parsing, serving."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

log = logging.getLogger(__name__)

READY = web.AppKey("ready", dict)
"""Mutable readiness flag of an app: `{"ready": bool, "reason": str}`."""

ModelT = TypeVar("ModelT", bound=BaseModel)


def json_error(status: int, message: str) -> web.Response:
    """An error response whose body says what to change: `{"error": message}`."""
    return web.json_response({"error": message}, status=status)


async def parse_body(request: web.Request, model: type[ModelT]) -> ModelT:
    """The request's JSON body as `model`; raises a 4xx response naming the problem."""
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(
            text=json.dumps({"error": f"send JSON with Content-Type application/json, not {request.content_type!r}"}),
            content_type="application/json",
        )
    try:
        payload = await request.json()
    except json.JSONDecodeError as exc:
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
        return web.json_response(
            {"status": "ready" if state["ready"] else "not ready", "reason": state["reason"]},
            status=200 if state["ready"] else 503,
        )

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
