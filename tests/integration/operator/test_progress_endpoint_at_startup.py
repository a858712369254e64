"""The operator's progress endpoint answers for every existing run from the moment it starts.

After an operator restart, trainers that outlived the old operator report at once, before the new
one's watch has listed the runs and before any reconcile. The state the startup handler builds
must already know those runs (a direct lookup while kopf's index is still empty), or their
reports are refused as if the runs did not exist.
"""

from __future__ import annotations

import asyncio
import json

import kubernetes
import pytest
from aiohttp import ClientSession
from medmo_cases import load_sample

from medmo_operator import crd, handlers, render
from medmo_trainer.progress import Progress

pytestmark = pytest.mark.controlplane


async def _post(url: str, body: dict, token: str) -> tuple[int, dict]:
    async with ClientSession() as session, session.post(url, json=body, headers={"Authorization": f"Bearer {token}"}) as response:
        return response.status, await response.json()


def test_a_report_for_an_existing_run_is_accepted_before_any_reconcile(control_plane, kubeconfig, namespace):
    control_plane.kubectl("apply", "-f", str(crd.CRD_PATH))
    control_plane.wait_established("medmotrainings.medmo.io")
    training = load_sample("medmo-tiny.yaml")
    training["metadata"]["name"] = "early"
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(training))
    uid = control_plane.kubectl("get", "mmt", "early", "-n", namespace, "-o", "jsonpath={.metadata.uid}").stdout.strip()
    kubernetes.config.load_kube_config(config_file=str(kubeconfig))
    settings = handlers.OperatorSettings(progress_bind_host="127.0.0.1", progress_port=0, namespace=namespace)
    report = Progress(run="early", stage="align", step=3, total_steps=30, metrics={"loss": 2.5}).to_json()

    async def start_and_report():
        # No operator runs and no reconcile happens here: the state is what the startup handler
        # builds, with kopf's index as kopf hands it to startup handlers (empty until the watch lists runs).
        state = await handlers.OperatorState.start(settings, run_uids={})
        try:
            token = render.progress_token(render.RunRef("early", namespace, uid), state.endpoints.token_key)
            host, port = state.server.addresses[0][:2]
            base = f"http://{host}:{port}/v1/namespaces/{namespace}/medmotrainings"
            accepted = await _post(f"{base}/early/progress", report, token)
            unknown = await _post(f"{base}/ghost/progress", {**report, "run": "ghost"}, token)
            return state, accepted, unknown
        finally:
            await state.stop()

    state, (code, _), (unknown_code, unknown_body) = asyncio.run(start_and_report())

    assert code == 202
    assert state.store.latest(namespace, "early")["align"].to_json() == report
    assert unknown_code == 401 and "token" in unknown_body["error"]
