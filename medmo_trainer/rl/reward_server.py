"""The reward-scoring worker: a stateless HTTP service that scores batches of completions.

    python -m medmo_trainer.rl.reward_server --port 8000 [--host 0.0.0.0] [--max-request-bytes N]
        [--config <rl stage config>] [--token-file F]

Requests need the run's token (`--token-file`, default `$MEDMO_PROGRESS_TOKEN_FILE`; see
`medmo_trainer.rl.http`).

POST /v1/score  {"weights": {...}, "maxCompletionLength": 512,
                 "items": [{"prompt": ..., "completion": "...", "completionLength": 37,
                            "reference": {"task": "grounding", "answer": "...", "boxes": [[...]], "options": [...]}}]}
  -> 200 {"rewards": [{"total": 1.5, "components": {"accuracy": 1.0, "bbox": 0.9, "format": 0.0, "overlong": 0.0}}],
          "parseFailures": {"bbox/unparseable": 1}}
GET /healthz, GET /readyz.

Everything a score needs is in the request or the worker's fixed defaults, so replicas are interchangeable.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from dataclasses import dataclass, field
from typing import Annotated, Any

from aiohttp import web
from pydantic import Field

from medmo_trainer.config import ConfigModel, RewardWeights, TaskType, load_stage_config
from medmo_trainer.rl.http import READY, new_app, parse_body, read_run_token, serve
from medmo_trainer.rl.rewards import RewardSuite

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024
MAX_ITEMS = 8192


class Reference(ConfigModel):
    """What a completion is checked against (the record's verifiable answer)."""

    task: TaskType | None = None
    answer: str | None = None
    boxes: list[Any] | None = None
    """Reference boxes on the 0-1000 grid, `[x1, y1, x2, y2]` or `{"label", "box"}`; unset reads `answer`."""
    options: list[str] | None = None


class ScoreItem(ConfigModel):
    prompt: Any = None
    completion: str
    completion_length: Annotated[int, Field(ge=0)] | None = None
    """Completion tokens, for the over-length penalty."""
    reference: Reference


class ScoreRequest(ConfigModel):
    weights: RewardWeights | None = None
    """Unset: the worker's defaults (its `--config` stage's rewards, else RewardWeights())."""
    max_completion_length: Annotated[int, Field(ge=1)] | None = None
    """Unset: the worker's default (its `--config` stage's maxCompletionLength, else 512)."""
    items: Annotated[list[ScoreItem], Field(min_length=1, max_length=MAX_ITEMS)]


@dataclass(frozen=True)
class Defaults:
    weights: RewardWeights = field(default_factory=RewardWeights)
    max_completion_length: int = 512


DEFAULTS = web.AppKey("defaults", Defaults)


def score_request(request: ScoreRequest, defaults: Defaults) -> dict:
    """The response body for one request (pure: no state kept between requests)."""
    suite = RewardSuite(request.weights or defaults.weights,
                        request.max_completion_length or defaults.max_completion_length)
    items = request.items
    scored = suite(
        [item.prompt for item in items],
        [item.completion for item in items],
        task=[item.reference.task for item in items],
        answer=[item.reference.answer for item in items],
        boxes=[item.reference.boxes for item in items],
        options=[item.reference.options for item in items],
        completion_length=[item.completion_length for item in items],
    )
    rewards = [
        {"total": total, "components": {name: values[i] for name, values in scored.components.items()}}
        for i, total in enumerate(scored.total)
    ]
    return {"rewards": rewards, "parseFailures": suite.take_stats()}


async def handle_score(request: web.Request) -> web.Response:
    body = await parse_body(request, ScoreRequest)
    # Scoring is CPU work; a thread keeps /healthz answering while a large batch is scored.
    scored = await asyncio.to_thread(score_request, body, request.app[DEFAULTS])
    totals = [reward["total"] for reward in scored["rewards"]]
    # One line per request (the access log is off: probes would drown it), so `kubectl logs` shows the traffic.
    log.info("score: %d completions, mean reward %.3f (from %s)", len(totals), sum(totals) / len(totals), request.remote)
    return web.json_response(scored)


def build_app(token: str, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
              defaults: Defaults | None = None) -> web.Application:
    app = new_app(token, max_request_bytes)
    app[DEFAULTS] = defaults or Defaults()
    app.router.add_post("/v1/score", handle_score)

    async def mark_ready(app: web.Application) -> None:
        app[READY].update(ready=True, reason="")

    app.on_startup.append(mark_ready)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES)
    parser.add_argument("--config", help="an rl stage config whose reward weights and maxCompletionLength "
                        "are the defaults of requests that do not send their own")
    parser.add_argument("--token-file", help="file holding the run's token (default: $MEDMO_PROGRESS_TOKEN_FILE)")
    args = parser.parse_args(argv)
    try:
        token = read_run_token(args.token_file)
    except ValueError as error:
        parser.error(str(error))
    logging.basicConfig(level=logging.INFO)
    defaults = Defaults()
    if args.config:
        config = load_stage_config(args.config)
        if config.rl is not None:
            defaults = Defaults(config.rl.rewards, config.rl.algorithm.max_completion_length)
    serve(build_app(token, args.max_request_bytes, defaults), args.host, args.port, "reward server")


if __name__ == "__main__":
    main()
