"""What every HTTP endpoint of a run shares (the operator's progress endpoint, the RL workers):
bearer tokens compared in constant time, and errors as JSON bodies that say what to change.

aiohttp and the standard library only: the operator imports it as it imports the other contracts.
"""

from __future__ import annotations

import hmac

from aiohttp import web


def json_error(status: int, message: str) -> web.Response:
    """An error response whose body says what to change: `{"error": message}`."""
    return web.json_response({"error": message}, status=status)


def bearer_token(request: web.Request) -> str:
    """The token of an `Authorization: Bearer <token>` header; empty for any other header."""
    header = request.headers.get("Authorization", "")
    return header[len("Bearer "):].strip() if header.startswith("Bearer ") else ""


def carries_token(request: web.Request, expected: str) -> bool:
    """Whether the request carries ``expected`` as its bearer token (compared in constant time)."""
    return hmac.compare_digest(bearer_token(request).encode(errors="replace"), expected.encode())


@web.middleware
async def errors_as_json(request: web.Request, handler):
    """aiohttp's own refusals (unknown path, wrong method, body over the size limit) as JSON errors."""
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge as error:
        return json_error(413, f"request body too large ({error.text}); send less per request")
    except web.HTTPException as error:
        if error.status < 400 or error.content_type == "application/json":
            raise
        allowed = f"; allowed: {error.headers['Allow']}" if "Allow" in error.headers else ""
        return json_error(error.status, f"{error.reason}: {request.method} {request.path}{allowed}")
