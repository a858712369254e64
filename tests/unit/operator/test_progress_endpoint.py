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

    # An unknown run is answered exactly as a wrong token is: no probing for run names.
    assert _exchange(store, "/v1/namespaces/team-a/medmotrainings/ghost/progress", GOOD, token) == _exchange(
        store, URL_PATH, GOOD, "not-the-token"
    )
    code, body = _exchange(store, URL_PATH, b"{not json", token)
    assert code == 400 and "JSON" in body["error"]
    code, body = _exchange(store, URL_PATH, {"step": "seven"}, token)
    assert code == 400 and "stage" in body["error"]
    code, body = _exchange(store, URL_PATH, {**GOOD, "metrics": {"grad_norm": 1.0}}, token)
    assert code == 400 and "grad_norm" in body["error"] and "camelCase" in body["error"]
    code, _ = _exchange(store, URL_PATH, {**GOOD, "padding": "x" * MAX_REPORT_BYTES}, token)
    assert code == 413
    assert store.latest("team-a", "medmo-tiny") == {}


def test_hostile_requests_get_a_4xx_with_a_message_and_change_nothing():
    """One server takes every kind of bad request in turn, then still stores a good report."""
    token = render.progress_token(RUN, KEY)
    auth = {"Authorization": f"Bearer {token}"}
    hostile = [
        ("no token, oversized", "POST", URL_PATH, b"x" * (MAX_REPORT_BYTES + 1), {}, 401, "token"),
        ("a token that is not text", "POST", URL_PATH, json.dumps(GOOD).encode(),
         {"Authorization": "Bearer \u00e9\u00e9"}, 401, "token"),
        ("unknown path", "POST", "/v1/namespaces/team-a/medmotrainings/medmo-tiny/admin", b"{}", auth, 404, "admin"),
        ("wrong method", "GET", URL_PATH, b"", auth, 405, "POST"),
        ("deleting", "DELETE", URL_PATH, b"", auth, 405, "POST"),
        ("not UTF-8", "POST", URL_PATH, b"\xff\xfe{}", auth, 400, "JSON"),
        ("nested too deep", "POST", URL_PATH, b"[" * 20000, auth, 400, "JSON"),
        ("a list", "POST", URL_PATH, json.dumps([GOOD]).encode(), auth, 400, "not a progress report"),
        ("null", "POST", URL_PATH, b"null", auth, 400, "not a progress report"),
        ("the token without its scheme", "POST", URL_PATH, json.dumps(GOOD).encode(), {"Authorization": token}, 401,
         "Bearer"),
        ("another run's report", "POST", URL_PATH, json.dumps({**GOOD, "run": "someone-else"}).encode(), auth, 400,
         "someone-else"),
        ("a word for a step", "POST", URL_PATH, json.dumps({**GOOD, "step": "seven"}).encode(), auth, 400, "step"),
        ("a word for a metric", "POST", URL_PATH, json.dumps({**GOOD, "metrics": {"loss": "low"}}).encode(), auth, 400,
         "loss"),
        ("oversized", "POST", URL_PATH, json.dumps({**GOOD, "padding": "x" * MAX_REPORT_BYTES}).encode(), auth, 413,
         f"{MAX_REPORT_BYTES} bytes"),
    ]

    async def go():
        store = ProgressStore()
        runner, base = await _serve(store)
        answers = []
        try:
            async with ClientSession() as session:
                for case, method, path, data, headers, *_ in hostile:
                    async with session.request(method, base + path, data=data, headers=headers) as response:
                        answers.append((case, response.status, await response.json()))
                reports_after_bad_requests = store.latest("team-a", "medmo-tiny")
                async with session.post(base + URL_PATH, data=json.dumps(GOOD).encode(), headers=auth) as response:
                    answers.append(("good", response.status, await response.json()))
        finally:
            await runner.cleanup()
        return answers, reports_after_bad_requests, store

    answers, reports_after_bad_requests, store = asyncio.run(go())

    for (case, status, body), (_, _, _, _, _, expected, message) in zip(answers, hostile):
        assert status == expected and message in body["error"], (case, status, body)
    assert reports_after_bad_requests == {}
    assert answers[-1][1:] == (202, {"accepted": True})
    assert store.latest("team-a", "medmo-tiny")["align"].to_json() == GOOD
