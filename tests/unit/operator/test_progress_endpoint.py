"""The operator's progress endpoint over real HTTP on loopback: tokens, bounds, bad input."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import ClientSession

from medmo_operator import render
from medmo_operator.progress import MAX_REPORT_BYTES, ProgressEndpoint, ProgressStore
from medmo_trainer.progress import Progress

KEY = b"operator-key"
RUN = render.RunRef(name="medmo-tiny", namespace="team-a", uid="uid-7")
URL_PATH = "/v1/namespaces/team-a/medmotrainings/medmo-tiny/progress"


async def _serve(store: ProgressStore):
    endpoint = ProgressEndpoint(store, KEY, lambda ns, name: RUN.uid if (ns, name) == ("team-a", "medmo-tiny") else None)
    runner = await endpoint.serve("127.0.0.1", 0)
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


async def _post(base: str, path: str, body, token: str | None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with ClientSession() as session, session.post(base + path, data=data, headers=headers) as response:
        return response.status, await response.json()


def _exchange(store: ProgressStore, path: str, body, token: str | None) -> tuple[int, dict]:
    async def go():
        runner, base = await _serve(store)
        try:
            return await _post(base, path, body, token)
        finally:
            await runner.cleanup()

    return asyncio.run(go())


GOOD = Progress(run="medmo-tiny", stage="align", step=7, total_steps=30, last_checkpoint="s3://b/c/step-5",
                metrics={"loss": 1.25}, counters={"recordsRead": 70}).to_json()


def test_a_report_with_the_runs_token_is_stored_for_the_reconcile_to_fold():
    store = ProgressStore()

    code, _ = _exchange(store, URL_PATH, GOOD, render.progress_token(RUN, KEY))

    assert code == 202
    report = store.latest("team-a", "medmo-tiny")["align"]
    assert report.to_json() == GOOD


@pytest.mark.parametrize(
    "token",
    [None, "not-the-token", render.progress_token(render.RunRef("other", "team-a", "uid-8"), KEY), render.progress_token(RUN, b"wrong")],
)
def test_a_report_without_this_runs_token_is_refused(token):
    store = ProgressStore()

    code, body = _exchange(store, URL_PATH, GOOD, token)

    assert code == 401 and "token" in body["error"]
    assert store.latest("team-a", "medmo-tiny") == {}


def test_unknown_runs_and_malformed_reports_get_clear_errors():
    token = render.progress_token(RUN, KEY)
    store = ProgressStore()

    assert _exchange(store, "/v1/namespaces/team-a/medmotrainings/ghost/progress", GOOD, token)[0] == 404
    code, body = _exchange(store, URL_PATH, b"{not json", token)
    assert code == 400 and "JSON" in body["error"]
    code, body = _exchange(store, URL_PATH, {"step": "seven"}, token)
    assert code == 400 and "stage" in body["error"]
    code, body = _exchange(store, URL_PATH, {**GOOD, "metrics": {"grad_norm": 1.0}}, token)
    assert code == 400 and "grad_norm" in body["error"] and "camelCase" in body["error"]
    code, _ = _exchange(store, URL_PATH, {**GOOD, "padding": "x" * MAX_REPORT_BYTES}, token)
    assert code == 413
    assert store.latest("team-a", "medmo-tiny") == {}
