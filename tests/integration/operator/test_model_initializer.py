"""A hub model fetched once, through the operator: `model.base` names a Hugging Face Hub model, one
initializer Job downloads it into the run's S3 storage (SeaweedFS) with a token from a Secret, and the
stage's pods load it from there with the real trainer. The hub is a stand-in (tests/hub_standin.py,
the `hub` fixture): no hub is reachable from this machine. A missing model and a gated one the token
cannot open fail their runs at once, naming the model and the hub's answer.
"""

from __future__ import annotations

import json

import pytest
import s3fs
import yaml
from hub_standin import HUB_GATED_MODEL, commit_of
from medmo_cases import TRAINER_IMAGE, load_sample
from polling import wait_for

from medmo_operator import render

pytestmark = [pytest.mark.slow]

STEPS = 2
TOKEN_SECRET = "hf-token"
WRONG_TOKEN_SECRET = "hf-token-of-someone-else"
RUN_TIMEOUT_S = 900


def _run(name: str, model: dict, storage: str, s3_server) -> dict:
    """A one-stage run of the tiny recipe's alignment stage, a few steps long, with the given model."""
    obj = load_sample("medmo-tiny.yaml")
    obj["metadata"]["name"] = name
    spec = obj["spec"]
    spec["image"] = TRAINER_IMAGE
    spec["model"] = model
    spec["storage"] = {"uri": storage, "secretRef": {"name": "s3-credentials"}, "endpoint": s3_server.endpoint,
                       "region": s3_server.region}
    align = spec["stages"][0]
    align["datasets"][0]["uri"] = "synthetic://train?n=16&seed=1"
    align["hyperparameters"].update(maxSteps=STEPS, perDeviceBatchSize=2)
    align["checkpoint"] = {"everySteps": STEPS, "keepLast": 1}
    spec["stages"] = [align]
    return obj


def _get(cp, namespace: str, *args: str) -> dict:
    return json.loads(cp.kubectl("get", *args, "-n", namespace, "-o", "json").stdout)


def _condition(run: dict, kind: str) -> dict:
    return next((c for c in run.get("status", {}).get("conditions", []) if c["type"] == kind), {})


@pytest.mark.timeout(RUN_TIMEOUT_S + 300)
def test_a_hub_model_is_fetched_once_into_s3_and_a_missing_or_refused_one_fails_at_once(
        control_plane, operator, node_agent, namespace, s3_server, s3_bucket, hub):
    secrets = [
        {"metadata": {"name": "s3-credentials"},
         "stringData": {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}},
        {"metadata": {"name": TOKEN_SECRET}, "stringData": {"HF_TOKEN": hub.token}},
        {"metadata": {"name": WRONG_TOKEN_SECRET}, "stringData": {"HF_TOKEN": "hf_not-the-right-token"}},
    ]
    for secret in secrets:
        control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "Secret", **secret}))
    endpoint = {"hubEndpoint": hub.endpoint}
    runs = {
        "from-hub": {"base": HUB_GATED_MODEL, "tokenSecretRef": {"name": TOKEN_SECRET}, **endpoint},
        "missing": {"base": "medmo-test/no-such-model", **endpoint},
        "refused": {"base": HUB_GATED_MODEL, "tokenSecretRef": {"name": WRONG_TOKEN_SECRET}, **endpoint},
    }
    storage = {name: f"{s3_bucket}/runs/{name}" for name in runs}
    manifests = [_run(name, model, storage[name], s3_server) for name, model in runs.items()]
    before = len(hub.requests())  # the stand-in serves the whole session: earlier tests fetched this model too
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(manifests))

    def finished() -> dict | None:
        found = {name: _get(control_plane, namespace, "mmt", name) for name in runs}
        phases = {name: run.get("status", {}).get("phase") for name, run in found.items()}
        return found if all(phase in ("Succeeded", "Failed") for phase in phases.values()) else None

    done = wait_for(finished, timeout_s=RUN_TIMEOUT_S, what="the three runs to finish", interval_s=2)

    from_hub = done["from-hub"]
    status = from_hub["status"]
    assert status["phase"] == "Succeeded", f"{json.dumps(status, indent=1)}\noperator log: {operator.log.read_text()[-4000:]}"
    initializer = status["initializers"][0]
    assert (initializer["name"], initializer["phase"]) == ("model-initializer", "Succeeded")
    assert initializer["output"] == f"{storage['from-hub']}/base_model"
    assert status["stages"][0]["phase"] == "Succeeded" and status["stages"][0]["step"] == STEPS
    fs = s3fs.S3FileSystem(**s3_server.storage_options(), skip_instance_cache=True)
    assert fs.cat_file(f"{initializer['output']}/config.json") == (hub.root / HUB_GATED_MODEL / "config.json").read_bytes()
    config = yaml.safe_load(_get(control_plane, namespace, "configmap", "from-hub-align-config")["data"][render.CONFIG_FILE])
    assert config["model"]["base"] == initializer["output"]
    # The initializer ran exactly once: one Job, one pod, which succeeded the first time.
    jobs = _get(control_plane, namespace, "jobs", "-l", f"{render.LABEL_RUN}=from-hub,{render.LABEL_ROLE}=model-initializer")
    assert [(j["status"].get("succeeded"), j["status"].get("failed", 0)) for j in jobs["items"]] == [(1, 0)]

    for name, reason, answer in (("missing", "ModelNotFound", "404"), ("refused", "ModelAccessDenied", "403")):
        run = done[name]
        failed = _condition(run, "Failed")
        assert run["status"]["phase"] == "Failed" and failed.get("reason") == reason, json.dumps(run["status"], indent=1)
        assert repr(runs[name]["base"]) in failed["message"] and f"answered {answer}" in failed["message"], failed
        # At once: the initializer's one pod failed and was not retried, and no stage started.
        job = _get(control_plane, namespace, "job", f"{name}-model-initializer")
        assert job["status"].get("failed") == 1 and job["spec"]["backoffLimit"] > 0, job["status"]
        assert run["status"]["stages"][0]["phase"] == "Pending"
        assert not _get(control_plane, namespace, "jobs", "-l", f"{render.LABEL_RUN}={name},{render.LABEL_ROLE}=learner")["items"]

    # The stand-in saw the model fetched once, with the token; the stage's pods, which know the hub's
    # endpoint but hold no token, never asked for it; the wrong token was refused once.
    asked = [r for r in hub.requests()[before:] if HUB_GATED_MODEL in r["path"]]
    with_token = [(r["method"], r["path"]) for r in asked if r["token"] == "right"]
    files = sorted(p.relative_to(hub.root / HUB_GATED_MODEL).as_posix() for p in (hub.root / HUB_GATED_MODEL).rglob("*") if p.is_file())
    assert sorted(path.rsplit("/", 1)[-1] for method, path in with_token if method == "GET" and "/resolve/" in path) == sorted(
        f.rsplit("/", 1)[-1] for f in files)
    commit = commit_of(hub.root / HUB_GATED_MODEL)
    assert [path for method, path in with_token if path.startswith("/api/")] == [
        f"/api/models/{HUB_GATED_MODEL}/revision/main", f"/api/models/{HUB_GATED_MODEL}/tree/{commit}"]
    assert [r for r in asked if r["token"] == "none"] == []
    assert [r["status"] for r in asked if r["token"] == "wrong"] == [403]

    # The token reached the hub and nothing a user or an operator reads.
    shown = {
        "runs": json.dumps(done),
        "events": json.dumps(_get(control_plane, namespace, "events")),
        "jobs and pods": json.dumps(_get(control_plane, namespace, "jobs,pods,configmaps")),
        "operator log": operator.log.read_text(errors="replace"),
        **{f"pod log {log.parent.parent.name}": log.read_text(errors="replace")
           for log in (node_agent.workdir / "pods").glob(f"{namespace}_*/logs/*.log")},
    }
    assert [where for where, text in shown.items() if hub.token in text] == []
