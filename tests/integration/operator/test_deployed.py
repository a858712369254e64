"""The operator as a cluster runs it: `kubectl apply -k manifests/base`, its Deployment's pod run by
the node agent with the ServiceAccount token a kubelet projects (TokenRequest, bound to the pod; the
pod uses in-cluster config, no kubeconfig), and a short sample run with the real trainer through it.

The API server's audit log (tests/controlplane/harness.py records the operator's ServiceAccount)
then shows that every request the operator made was allowed, and that the ClusterRole and Role of
manifests/base grant nothing the run did not use.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator

import pytest
import yaml
from medmo_cases import REPO, TRAINER_IMAGE, load_sample
from polling import wait_for

from controlplane.harness import AUDITED_USERS
from medmo_operator import render

pytestmark = [pytest.mark.slow, pytest.mark.controlplane]

OPERATOR_NAMESPACE = "medmo-system"
OPERATOR_USER = AUDITED_USERS[0]
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
"""The API server names the pod a bound token was issued for, in the requests it authenticates."""
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
"""Where in-cluster clients (the operator's) read the token, the cluster's CA and their namespace."""
RUN_TIMEOUT_S = 900
UNUSED_BY_A_SUCCESSFUL_RUN = {
    ("batch", "jobs", "patch"): "suspending and resuming a stage (tests/integration/operator/test_rl_suspend.py)",
    ("kueue.x-k8s.io", "workloads", "list"): "runs queued in Kueue (tests/integration/operator/test_kueue.py)",
    ("kueue.x-k8s.io", "workloads", "patch"): "suspending and resuming a run queued in Kueue (test_kueue.py)",
    ("scheduling.k8s.io", "workloads", "create"): "gang-scheduled stages (tests/integration/operator/test_scheduling.py)",
    ("scheduling.k8s.io", "podgroups", "create"): "gang-scheduled stages (test_scheduling.py)",
    ("scheduling.k8s.io", "workloads", "delete"): "a gang's restart (test_scheduling.py)",
    ("scheduling.k8s.io", "podgroups", "delete"): "a gang's restart (test_scheduling.py)",
    ("scheduling.x-k8s.io", "podgroups", "create"): "coscheduling gangs: rendering only (tests/unit/operator/test_render_gang.py), "
                                                    "scheduler-plugins is not built for the test control plane",
    ("scheduling.x-k8s.io", "podgroups", "delete"): "coscheduling gangs: tests/unit/operator/test_render_gang.py only",
    ("medmo.io", "medmotrainings", "get"): "a progress report arriving before the operator's watch has listed its run, "
                                           "just after a restart (test_progress_endpoint_at_startup.py)",
}
"""Granted verbs a run that succeeds at once never uses, and the test that exercises each."""


def _deployed_rules() -> list[tuple[str, dict]]:
    """(namespace or "" for cluster-wide, rule) of every Role and ClusterRole manifests/base binds to the operator."""
    documents = list(yaml.safe_load_all((REPO / "manifests" / "base" / "rbac.yaml").read_text()))
    return [(doc["metadata"].get("namespace", OPERATOR_NAMESPACE) if doc["kind"] == "Role" else "", rule)
            for doc in documents if doc["kind"] in ("Role", "ClusterRole") for rule in doc["rules"]]


def _audit_events(cp, pod: str) -> list[dict]:
    events = {}
    for line in cp.audit_log.read_text().splitlines():
        event = json.loads(line)
        if event["user"]["username"] == OPERATOR_USER and event["user"].get("extra", {}).get(POD_NAME_EXTRA) == [pod]:
            events[event["auditID"]] = event  # a watch is logged when its response starts and when it ends
    return list(events.values())


def _resource(event: dict) -> str:
    ref = event["objectRef"]
    return ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")


def _used(events: list[dict], namespace: str, rule: dict, resource: str, verb: str) -> bool:
    return any(e.get("objectRef") and e["objectRef"].get("apiGroup", "") in rule["apiGroups"]
               and _resource(e) == resource and e["verb"] == verb
               and (not namespace or e["objectRef"].get("namespace") == namespace)
               and (not rule.get("resourceNames") or e["objectRef"].get("name") in rule["resourceNames"])
               for e in events)


def _operator_pod(cp) -> dict:
    pods = json.loads(cp.kubectl("get", "pods", "-n", OPERATOR_NAMESPACE, "-l", "app.kubernetes.io/name=medmo-operator",
                                 "-o", "json").stdout)["items"]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    return pods[0]


@pytest.fixture(scope="module")
def deployed_operator(control_plane, node_agent) -> Iterator[dict]:
    """manifests/base applied as a whole; the operator's pod, once Ready. Deleted afterwards (the CRD
    and RBAC stay: other tests' runs and operators use them)."""
    node_agent.runner.entrypoints[TRAINER_IMAGE] = render.TRAINER_ENTRYPOINT
    # As on a fresh install, the operator creates the key its progress tokens derive from (its Role's
    # create verb); an operator of an earlier test may have left one.
    control_plane.kubectl("delete", "secret", "medmo-operator-token-key", "-n", OPERATOR_NAMESPACE, "--ignore-not-found")
    started = time.monotonic()
    control_plane.kubectl("apply", "-k", str(REPO / "manifests" / "base"))
    try:
        control_plane.kubectl("rollout", "status", "deployment/medmo-operator", "-n", OPERATOR_NAMESPACE,
                              "--timeout=180s", timeout_s=200)
        pod = _operator_pod(control_plane)
        print(f"operator Deployment ready {time.monotonic() - started:.0f} s after kubectl apply -k")
        yield pod
    finally:
        control_plane.kubectl("delete", "deployment", "medmo-operator", "-n", OPERATOR_NAMESPACE, "--wait=true")
        wait_for(lambda: not json.loads(control_plane.kubectl(
            "get", "pods", "-n", OPERATOR_NAMESPACE, "-o", "json").stdout)["items"], 60, "the operator's pod to be gone")


def _short_sample(storage) -> dict:
    """manifests/samples/medmo-tiny.yaml cut to its pretrain and rl stages, two steps each: every kind
    of child the operator makes. Finished stages' Jobs are deleted (cleanPodPolicy All), and the run
    once finished (ttlSecondsAfterFinished)."""
    obj = copy.deepcopy(load_sample("medmo-tiny.yaml"))
    spec = obj["spec"]
    spec["image"] = TRAINER_IMAGE
    spec["storage"]["uri"] = f"file://{storage}"
    spec["stages"] = [s for s in spec["stages"] if s["type"] in ("pretrain", "rl")]
    for stage in spec["stages"]:
        stage["datasets"] = [dict(d, uri=d["uri"].replace("n=512", "n=16").replace("n=256", "n=16")) for d in stage["datasets"]]
        stage["hyperparameters"].update(maxSteps=2, perDeviceBatchSize=2)
        stage["checkpoint"] = {"everySteps": 2, "keepLast": 1}
        if stage["type"] == "rl":
            stage["rl"]["algorithm"].update(groupSize=2, promptsPerStep=2, maxCompletionLength=8)
    spec["runPolicy"].update(ttlSecondsAfterFinished=5, cleanPodPolicy="All")
    return obj


def test_sample_run_through_the_deployed_operator_uses_exactly_its_rbac(control_plane, node_agent, deployed_operator,
                                                                        namespace, tmp_path):
    pod = deployed_operator
    name = pod["metadata"]["name"]
    mounted = node_agent.pod(OPERATOR_NAMESPACE, name).volumes
    projected = next(v for v in pod["spec"]["volumes"] if "projected" in v)
    account_dir = mounted.path(projected["name"])
    assert sorted(p.name for p in account_dir.iterdir()) == ["ca.crt", "namespace", "token"]
    assert {"name": projected["name"], "mountPath": SERVICE_ACCOUNT_DIR, "readOnly": True} in [
        {k: m.get(k) for k in ("name", "mountPath", "readOnly")} for m in pod["spec"]["containers"][0]["volumeMounts"]]
    assert not [e for e in pod["spec"]["containers"][0].get("env", []) if e["name"] == "KUBECONFIG"]

    started = time.monotonic()
    run = _short_sample(tmp_path)
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(run))
    seen: list[dict] = []

    def finished() -> bool:
        got = control_plane.kubectl("get", "mmt", "medmo-tiny", "-n", namespace, "-o", "json", check=False)
        if got.returncode != 0:
            return bool(seen)  # deleted by the operator after ttlSecondsAfterFinished
        seen.append(json.loads(got.stdout).get("status", {}))
        assert seen[-1].get("phase") != "Failed", seen[-1]
        return False

    try:
        wait_for(finished, RUN_TIMEOUT_S, "the run to succeed and be deleted after its TTL", interval_s=2)
    finally:
        print(node_agent.pod(OPERATOR_NAMESPACE, name).log_path("operator").read_text()[-3000:])
    print(f"run succeeded and was deleted {time.monotonic() - started:.0f} s after kubectl apply")
    status = seen[-1]
    assert status["phase"] == "Succeeded"
    assert [(s["name"], s["phase"], s["step"]) for s in status["stages"]] == [("align", "Succeeded", 2), ("grpo", "Succeeded", 2)]
    assert (tmp_path / "grpo" / "model" / "config.json").exists()

    events = _audit_events(control_plane, name)
    assert events, f"no audited request from pod {name}: the token is not bound to it, or audit is off"
    refused = sorted({f"{e['verb']} {e.get('requestURI')}: {e['annotations'].get('authorization.k8s.io/reason', '')}"
                      for e in events if e["annotations"].get("authorization.k8s.io/decision") != "allow"})
    assert not refused, f"the operator's requests refused: {refused}"
    unused = [f"{verb} {resource} ({', '.join(rule['apiGroups'])}){' in ' + ns if ns else ''}"
              for ns, rule in _deployed_rules() for resource in rule["resources"] for verb in rule["verbs"]
              if not _used(events, ns, rule, resource, verb)
              and (rule["apiGroups"][0], resource, verb) not in UNUSED_BY_A_SUCCESSFUL_RUN]
    assert not unused, f"granted but never used by the run (drop them from manifests/base/rbac.yaml): {unused}"
