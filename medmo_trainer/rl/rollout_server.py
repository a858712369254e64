"""The rollout worker: an HTTP service holding one policy version and sampling completions from it.

    python -m medmo_trainer.rl.rollout_server (--model <source> | --config <stage config>) --port 8000
        [--token-file F] [--storage-uri URI] [--host 0.0.0.0] [--backend transformers] [--seed 0]
        [--max-request-bytes N] [--threads N]

`--config` takes the model source, the run's storage and the backend (`rl.rolloutBackend`) from an
rl stage's config (what the operator mounts). A preset's random weights use seed 0 unless `--seed`
says otherwise, as the learner builds them: the learner publishes only the tensors that train, so
the frozen rest must already be the same on both sides. Requests need the run's token (`--token-file`, default
`$MEDMO_PROGRESS_TOKEN_FILE`; see `medmo_trainer.rl.http`), and weights are read only from under
the run's storage (`--storage-uri`, default the config's `storage.uri`; without either, only pushed
weights are taken): a worker never reads what its run did not write. `<source>` is anything
`medmo_trainer.model.load_model` takes (`preset:tiny-qwen3-vl`, a local path, `s3://...` or a
Hugging Face id). S3 credentials and endpoint come from the environment
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `MEDMO_S3_ENDPOINT`).

POST /v1/generate  {"prompts": [{"id": "p0", "record": {...}} | {"messages": [...], "images": [...]}],
                    "sampling": {"n": 8, "temperature": 1.0, "topP": 1.0, "maxNewTokens": 512,
                                 "seed": 7, "imageSize": 768},
                    "policy": {"version": 3, "uri": "s3://.../policy/v-3.safetensors"}}     (optional)
  -> 200 {"policyVersion": 3, "results": [{"id": "p0", "completions": [
              {"tokenIds": [...], "logprobs": [...], "text": "...", "truncated": false}, ...]},
              {"id": "p1", "completions": [], "error": "cannot read image ..."}],
          "generatedTokens": 812, "seconds": 1.9, "tokensPerSecond": 427.4}
POST /v1/weights   {"version": 4, "uri": "s3://bucket/run/grpo/policy/v4.safetensors"}      (from storage)
                   or the safetensors bytes with Content-Type application/octet-stream and
                   header X-Policy-Version: 4                                                (pushed)
  -> 200 {"policyVersion": 4}; 409 when the version is older than the one held; 403 for a URI outside
     the run's storage
GET  /v1/policy    -> {"policyVersion": 3, "model": "<source>", "backend": "transformers",
                       "weightFetches": 3, "weightBytesFetched": 123456,        (policy files read from storage)
                       "generatedTokens": 9000, "generationSeconds": 20.5}     (since the worker started)

A worker reads each policy version from storage once: requests naming the version it holds load
nothing, and concurrent requests naming a new one wait for one read.
GET  /healthz, GET /readyz (503 until the model is loaded).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import posixpath
import time
from typing import Annotated
from urllib.parse import urlsplit

import torch
from aiohttp import web
from pydantic import Field
from safetensors.torch import load as load_safetensors

from medmo_trainer.config import ConfigModel, ModelSource, RLAlgorithm, load_stage_config
from medmo_trainer.fsio import export_storage_environment
from medmo_trainer.rl.http import READY, new_app, parse_body, read_run_token, serve
from medmo_trainer.rl.prompts import Prompt
from medmo_trainer.rl.rollout import BACKENDS, RolloutBackend, SamplingParams, read_weight_bytes
from medmo_trainer.webapi import json_error

log = logging.getLogger(__name__)

BACKEND = web.AppKey("backend", list)
"""One-element list holding the backend once loaded (empty while loading)."""
MODEL_SOURCE = web.AppKey("model_source", str)
LOADER = web.AppKey("loader", asyncio.Task)
WEIGHTS_LOCK = web.AppKey("weights_lock", asyncio.Lock)
STORAGE = web.AppKey("storage", str)
BACKEND_NAME = web.AppKey("backend_name", str)
TOTALS = web.AppKey("totals", dict)
"""Running totals /v1/policy reports: weightFetches, weightBytesFetched, generatedTokens, generationSeconds."""
"""The run's storage URI: the only place weights are read from ("" when none was given)."""
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024 * 1024
"""Pushed weights of a whole small model fit; larger policies are sent by URI."""
VERSION_HEADER = "X-Policy-Version"


class WeightsRequest(ConfigModel):
    version: Annotated[int, Field(ge=0)]
    uri: Annotated[str, Field(min_length=1)]
    """fsspec URI or path of a safetensors file with (a subset of) the policy's parameters."""


class GenerateRequest(ConfigModel):
    prompts: Annotated[list[Prompt], Field(min_length=1, max_length=1024)]
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    policy: WeightsRequest | None = None
    """The policy to sample from; a worker holding other weights loads these first. This is how a
    restarted worker, or one behind a Service that a push never reached, catches up."""


def _storage_location(uri: str) -> tuple[str, str, str]:
    """(scheme, bucket or host, normalised path) of a URI or local path; a plain path is `file`."""
    parts = urlsplit(uri)
    if not parts.scheme:
        return "file", "", posixpath.normpath(uri)
    return parts.scheme, parts.netloc, posixpath.normpath(parts.path or "/")


def outside_storage(uri: str, storage: str) -> str | None:
    """Why `uri` may not be read by a worker of the run with storage `storage`; None when it may."""
    if not storage:
        return ("this worker was started without the run's storage (--config or --storage-uri), "
                "so it takes only pushed weights")
    allowed = f"weights are read only from under the run's storage {storage.rstrip('/')}/"
    parts = urlsplit(uri)
    tricks = [what for what, found in (("a '..' segment", ".." in uri.split("/")), ("a query", parts.query),
                                       ("a fragment", parts.fragment), ("a %-escape", "%" in uri)) if found]
    if tricks:
        return f"{uri!r} has {' and '.join(tricks)}; {allowed}"
    scheme, bucket, path = _storage_location(uri)
    root_scheme, root_bucket, root = _storage_location(storage)
    if (scheme, bucket) != (root_scheme, root_bucket) or not (path == root or path.startswith(root.rstrip("/") + "/")):
        return f"{uri!r} is outside the run's storage; {allowed}"
    return None


def _backend(request: web.Request) -> RolloutBackend:
    held = request.app[BACKEND]
    if not held:
        raise web.HTTPServiceUnavailable(text='{"error": "model is still loading"}', content_type="application/json")
    return held[0]


async def handle_generate(request: web.Request) -> web.Response:
    backend = _backend(request)
    body = await parse_body(request, GenerateRequest)
    if body.policy is not None and (refusal := outside_storage(body.policy.uri, request.app[STORAGE])):
        return json_error(403, refusal)
    if body.policy is not None and body.policy.uri != backend.policy_uri:
        async with request.app[WEIGHTS_LOCK]:
            if body.policy.uri != backend.policy_uri:  # another request may have loaded it meanwhile
                failure = await _load_weights(backend, body.policy.version,
                                              _storage_reader(request.app, body.policy.uri), body.policy.uri)
                if failure is not None:
                    return failure
    started = time.monotonic()
    groups = await asyncio.to_thread(backend.generate, body.prompts, body.sampling)
    results = []
    for prompt, group in zip(body.prompts, groups):
        result = {"id": prompt.id, "completions": [c.to_wire() for c in group.completions]}
        if group.error is not None:
            result["error"] = group.error
        results.append(result)
    generated_tokens = sum(len(c.token_ids) for group in groups for c in group.completions)
    seconds = time.monotonic() - started
    totals = request.app[TOTALS]
    totals["generatedTokens"] += generated_tokens
    totals["generationSeconds"] += seconds
    # One line per request (the access log is off: probes would drown it), so `kubectl logs` shows the traffic.
    log.info("generate: %d prompts -> %d completions, %d tokens (%.1f tokens/s), policy version %d, %.1fs (from %s)",
             len(body.prompts), sum(len(group.completions) for group in groups), generated_tokens,
             generated_tokens / max(seconds, 1e-9), backend.policy_version, seconds, request.remote)
    return web.json_response(
        {
            "policyVersion": backend.policy_version,
            "results": results,
            "generatedTokens": generated_tokens,
            "seconds": seconds,
            "tokensPerSecond": generated_tokens / max(seconds, 1e-9),
        }
    )


def _storage_reader(app: web.Application, uri: str):
    """Reads a policy file from storage, counted in the worker's totals."""

    def read() -> dict[str, torch.Tensor]:
        payload = read_weight_bytes(uri)
        app[TOTALS]["weightFetches"] += 1
        app[TOTALS]["weightBytesFetched"] += len(payload)
        return load_safetensors(payload)

    return read


async def _load_weights(backend: RolloutBackend, version: int, read, uri: str | None) -> web.Response | None:
    """Loads weights in a thread; an error response when they cannot be read or do not fit the model."""
    try:
        state = await asyncio.to_thread(read)
        await asyncio.to_thread(backend.load_state_dict, state, version, uri)
    except Exception as error:  # unreadable storage, corrupt safetensors (its own error type), wrong names
        return json_error(422, f"cannot load weights of version {version}: {error}")
    log.info("loaded policy version %d from %s", version, uri or "pushed bytes")
    return None


async def handle_weights(request: web.Request) -> web.Response:
    backend = _backend(request)
    if request.content_type == "application/octet-stream":
        try:
            version = int(request.headers[VERSION_HEADER])
        except (KeyError, ValueError):
            return json_error(400, f"pushed weights need an integer {VERSION_HEADER} header")
        payload = await request.read()
        uri = None
        read = lambda: load_safetensors(payload)  # noqa: E731
    else:
        body = await parse_body(request, WeightsRequest)
        version, uri = body.version, body.uri
        if refusal := outside_storage(uri, request.app[STORAGE]):
            return json_error(403, refusal)
        read = _storage_reader(request.app, uri)
    if version < backend.policy_version:
        return json_error(409, f"policy version {version} is older than the held version {backend.policy_version}")
    async with request.app[WEIGHTS_LOCK]:
        failure = await _load_weights(backend, version, read, uri)
    return failure or web.json_response({"policyVersion": backend.policy_version})


async def handle_policy(request: web.Request) -> web.Response:
    backend = _backend(request)
    return web.json_response({"policyVersion": backend.policy_version, "model": request.app[MODEL_SOURCE],
                              "backend": request.app[BACKEND_NAME], **request.app[TOTALS]})


def build_app(model_source: str | ModelSource, token: str, storage: str = "", backend_name: str = "transformers", seed: int = 0,
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, algorithm: RLAlgorithm | None = None
              ) -> web.Application:
    if backend_name not in BACKENDS:
        raise SystemExit(f"unknown rollout backend {backend_name!r}; available: {sorted(BACKENDS)}")
    app = new_app(token, max_request_bytes)
    app[STORAGE] = storage
    app[BACKEND] = []
    app[MODEL_SOURCE] = model_source.base if isinstance(model_source, ModelSource) else model_source
    app[BACKEND_NAME] = backend_name
    app[TOTALS] = {"weightFetches": 0, "weightBytesFetched": 0, "generatedTokens": 0, "generationSeconds": 0.0}
    app[WEIGHTS_LOCK] = asyncio.Lock()
    app.router.add_post("/v1/generate", handle_generate)
    app.router.add_post("/v1/weights", handle_weights)
    app.router.add_get("/v1/policy", handle_policy)

    async def load_in_background(app: web.Application) -> None:
        # Loading can take minutes for real models; /healthz answers meanwhile and /readyz says why not.
        app[READY].update(ready=False, reason=f"loading {app[MODEL_SOURCE]}")

        async def load() -> None:
            try:
                app[BACKEND].append(await asyncio.to_thread(BACKENDS[backend_name], model_source, seed, algorithm))
                app[READY].update(ready=True, reason="")
            except Exception as error:  # the reason shows in /readyz; the pod's probe keeps it out of service
                log.exception("cannot load model %s", app[MODEL_SOURCE])
                app[READY].update(ready=False, reason=f"cannot load model {app[MODEL_SOURCE]!r}: {error}")

        app[LOADER] = asyncio.create_task(load())

    app.on_startup.append(load_in_background)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model source: preset:<name>, path, s3:// URI or HF id")
    parser.add_argument("--config", help="an rl stage config (file or URI): its model, storage and backend")
    parser.add_argument("--token-file", help="file holding the run's token (default: $MEDMO_PROGRESS_TOKEN_FILE)")
    parser.add_argument("--storage-uri", help="the run's storage: weights are read only from under it "
                        "(default: the config's storage.uri)")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--backend", choices=sorted(BACKENDS),
                        help="rollout backend (default: the config's rl.rolloutBackend, else transformers)")
    parser.add_argument("--seed", type=int, default=None, help="seed of a preset's random weights (default 0)")
    parser.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    model, seed, storage, backend, algorithm = args.model, args.seed, args.storage_uri, args.backend, None
    if args.config:
        config = load_stage_config(args.config)
        export_storage_environment(config.storage)
        # a model with extra vision encoders to attach is its whole source, not just its base
        model = model or (config.model if config.model.vision_encoders else config.model.base)
        storage = storage or config.storage.uri
        if config.rl is not None:
            backend, algorithm = backend or config.rl.rollout_backend, config.rl.algorithm
    if not model:
        parser.error("give --model or --config")
    try:
        token = read_run_token(args.token_file)
    except ValueError as error:
        parser.error(str(error))
    if args.threads:
        torch.set_num_threads(args.threads)
    serve(build_app(model, token, storage or "", backend or "transformers", seed or 0, args.max_request_bytes, algorithm),
          args.host, args.port, "rollout server")


if __name__ == "__main__":
    main()
