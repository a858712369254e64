"""manifests/overlays: each builds with `kubectl kustomize` and the API server accepts it
(`--dry-run=server`: schemas, RBAC objects, Pod Security admission of the restricted namespace);
production's two operator replicas, run as pods by the node agent, take turns: one acts, and when it
is killed the other takes over, with nothing reconciled twice.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import yaml
from medmo_cases import REPO, STANDIN_IMAGE
from polling import wait_for

from controlplane.harness import AUDITED_USERS
from medmo_operator.peering import ACTING_LABEL

pytestmark = pytest.mark.controlplane

OVERLAYS = REPO / "manifests" / "overlays"
OPERATOR_NAMESPACE = "medmo-system"
DEV_NAMESPACE = "medmo-dev"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
TIMEOUT_S = 240


@pytest.mark.parametrize("overlay", ["base", "overlays/dev", "overlays/production"])
def test_overlay_builds_and_the_api_server_accepts_it(control_plane, overlay):
    built = control_plane.kubectl("kustomize", str(REPO / "manifests" / overlay)).stdout
    namespaces = [doc for doc in yaml.safe_load_all(built) if doc and doc["kind"] == "Namespace"]
    assert len(namespaces) == 1
    name = namespaces[0]["metadata"]["name"]
    existed = control_plane.kubectl("get", "namespace", name, check=False).returncode == 0
    # A dry run creates nothing, so the namespaced objects need their namespace for real.
    control_plane.kubectl("apply", "-f", "-", input=yaml.safe_dump(namespaces[0]))
    try:
        result = control_plane.kubectl("apply", "--dry-run=server", "-f", "-", input=built)
    finally:
        if not existed:
            control_plane.kubectl("delete", "namespace", name, "--wait=true")  # gone before a later test applies it
    assert "(server dry run)" in result.stdout
    kinds = {line.split("/")[0] for line in result.stdout.splitlines()}
    assert {"deployment.apps", "customresourcedefinition.apiextensions.k8s.io", "clusterrole.rbac.authorization.k8s.io"} <= kinds


def _operator_pods(cp, namespace: str = OPERATOR_NAMESPACE) -> list[dict]:
    return json.loads(cp.kubectl("get", "pods", "-n", namespace, "-l", "app.kubernetes.io/name=medmo-operator",
                                 "-o", "json").stdout)["items"]


def _acting(cp) -> list[str]:
    return [p["metadata"]["name"] for p in _operator_pods(cp) if p["metadata"]["labels"].get(ACTING_LABEL) == "true"]


@pytest.fixture
def production_operator(control_plane, node_agent, operator_ns):
    control_plane.kubectl("apply", "-k", str(OVERLAYS / "production"))
    try:
        control_plane.kubectl("rollout", "status", "deployment/medmo-operator", "-n", OPERATOR_NAMESPACE,
                              "--timeout=180s", timeout_s=200)
        yield
    finally:
        control_plane.kubectl("delete", "deployment,poddisruptionbudget", "medmo-operator", "-n", OPERATOR_NAMESPACE)
        wait_for(lambda: not _operator_pods(control_plane), 60, "the operator's pods to be gone")


def _status(cp, namespace: str, name: str) -> dict:
    return json.loads(cp.kubectl("get", "mmt", name, "-n", namespace, "-o", "json").stdout).get("status", {})


def test_dev_overlay_operator_runs_the_runs_of_its_namespace_only(control_plane, node_agent, operator_ns, namespace, tmp_path):
    control_plane.kubectl("apply", "-k", str(OVERLAYS / "dev"))
    try:
        control_plane.kubectl("rollout", "status", "deployment/medmo-operator", "-n", DEV_NAMESPACE, "--timeout=180s", timeout_s=200)
        # The stand-in trainer stores to file:// (a hostPath, which Pod Security "restricted" refuses;
        # dev runs store to the overlay's SeaweedFS): the namespace lets it, for this test only.
        control_plane.kubectl("label", "namespace", DEV_NAMESPACE, "pod-security.kubernetes.io/enforce=privileged", "--overwrite")
        for where in (DEV_NAMESPACE, namespace):
            control_plane.kubectl("apply", "-n", where, "-f", "-", input=json.dumps(_run(tmp_path, steps=(4, 2))))
        finished = wait_for(lambda: (s := _status(control_plane, DEV_NAMESPACE, "ha")).get("phase") in ("Succeeded", "Failed") and s,
                            TIMEOUT_S, "the run in medmo-dev to finish")
        assert finished["phase"] == "Succeeded"
        assert _status(control_plane, namespace, "ha") == {}, "the dev operator touched a run outside medmo-dev"
        log = node_agent.pod(DEV_NAMESPACE, _operator_pods(control_plane, DEV_NAMESPACE)[0]["metadata"]["name"]).log_path("operator")
        assert "forbidden" not in log.read_text().lower()
    finally:
        # Runs first, while their operator can still take its finalizer off them.
        control_plane.kubectl("delete", "mmt", "--all", "-n", DEV_NAMESPACE, "--timeout=60s", check=False)
        control_plane.kubectl("delete", "namespace", DEV_NAMESPACE, "--wait=true", timeout_s=180)
        control_plane.kubectl("delete", "clusterrolebinding,clusterrole", "medmo-operator-dev-cluster")


def _run(storage, steps: tuple[int, int] = (40, 4)) -> dict:
    def stage(name: str, steps: int) -> dict:
        return {"name": name, "type": "sft", "datasets": [{"name": "d", "uri": "standin://x?stepSeconds=0.25"}],
                "hyperparameters": {"maxSteps": steps}, "strategy": {"name": "ddp"}, "checkpoint": {"everySteps": 5}}

    return {"apiVersion": "medmo.io/v1alpha1", "kind": "MedMOTraining", "metadata": {"name": "ha"},
            "spec": {"image": STANDIN_IMAGE, "model": {"base": "preset:tiny-qwen3-vl"}, "storage": {"uri": f"file://{storage}"},
                     "nodePool": {"gpusPerNode": 0, "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}},
                     "stages": [stage("first", steps[0]), stage("second", steps[1])]}}


def _writes_by_pod(cp, namespace: str) -> list[tuple[str, str, int]]:
    """(operator pod, "verb resource/name", response code) of each write the operator made in ``namespace``, in order."""
    writes = {}
    for line in cp.audit_log.read_text().splitlines():
        event = json.loads(line)
        ref = event.get("objectRef") or {}
        if (event["user"]["username"] == AUDITED_USERS[0] and ref.get("namespace") == namespace
                and event["verb"] in ("create", "update", "patch", "delete")):
            pod = event["user"].get("extra", {}).get(POD_NAME_EXTRA, ["?"])[0]
            what = f"{event['verb']} {ref['resource']}{'/' + ref['subresource'] if ref.get('subresource') else ''}/{ref.get('name', '')}"
            writes[event["auditID"]] = (event["requestReceivedTimestamp"], pod, what, event["responseStatus"]["code"])
    return [entry[1:] for entry in sorted(writes.values())]


def test_production_replicas_one_acts_and_the_other_takes_over_when_it_is_killed(
        control_plane, node_agent, production_operator, namespace, tmp_path):
    active = wait_for(lambda: len(acting := _acting(control_plane)) == 1 and acting[0], 60, "one acting replica")
    standby = next(p["metadata"]["name"] for p in _operator_pods(control_plane) if p["metadata"]["name"] != active)
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(_run(tmp_path)))

    def status() -> dict:
        return json.loads(control_plane.kubectl("get", "mmt", "ha", "-n", namespace, "-o", "json").stdout).get("status", {})

    # Progress reaches the status: the Service leads the trainer's reports to the acting replica.
    wait_for(lambda: status().get("currentStep", 0) >= 5, TIMEOUT_S, "progress from the first stage")
    for pid in node_agent.pod(OPERATOR_NAMESPACE, active).pids().values():
        os.killpg(pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: _acting(control_plane) == [standby], TIMEOUT_S, f"{standby} to act")
    print(f"the standby replica acted {time.monotonic() - killed:.1f} s after the active one was killed")

    final = wait_for(lambda: (s := status()).get("phase") in ("Succeeded", "Failed") and s, TIMEOUT_S, "the run to finish")
    assert final["phase"] == "Succeeded"
    assert [(s["name"], s["step"]) for s in final["stages"]] == [("first", 40), ("second", 4)]
    jobs = control_plane.kubectl("get", "jobs", "-n", namespace, "-o", "name").stdout.split()
    assert sorted(jobs) == ["job.batch/ha-first-0", "job.batch/ha-second-0"]

    writes = _writes_by_pod(control_plane, namespace)
    turns = [pod for i, (pod, _, _) in enumerate(writes) if i == 0 or writes[i - 1][0] != pod]
    assert turns == [active, standby], f"the replicas' writes interleave: {writes}"
    assert ("create jobs/ha-second-0" in [what for pod, what, _ in writes if pod == standby])
    # Every stage's children are created once (the run's progress-token Secret is ensured with each stage: a 409 is its norm).
    twice = [w for w in writes if w[1].split("/")[0] in ("create jobs", "create configmaps", "create services") and w[2] == 409]
    assert not twice, f"children created twice: {twice}"
