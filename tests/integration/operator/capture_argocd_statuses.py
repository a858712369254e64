"""Captures MedMOTraining objects in every phase and condition the operator writes, from real runs,
for the Argo CD health check's tests (tests/unit/operator/argocd_statuses.json).

Not collected by default (its name does not start with `test_`): run it by path when the operator
gains a phase, a condition or a reason, and commit the file it rewrites:

    scripts/test.sh tests/integration/operator/capture_argocd_statuses.py

Runs on the real control plane with the real operator (as its ServiceAccount), Kueue (for two runs
sharing a one-GPU queue) and the stand-in trainer, all scenarios at once in one namespace; every distinct (phase, conditions) an object passes
through is kept, as `kubectl get -o json` shows it, less managedFields and kopf's annotations.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from medmo_cases import REPO, STANDIN_IMAGE

from medmo_operator import api, render

OUTPUT = REPO / "tests" / "unit" / "operator" / "argocd_statuses.json"
KUEUE_FLAVOR = "medmo-default"
"""The ResourceFlavor the kueue fixture makes (conftest.KUEUE_FLAVOR)."""
FINISHED = {api.Phase.SUCCEEDED.value, api.Phase.FAILED.value}


def _run(name: str, storage: Path, steps: int = 6, knobs: str = "", **spec_extra) -> dict:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name},
        "spec": {
            "image": STANDIN_IMAGE,
            "model": {"base": "preset:tiny-qwen3-vl"},
            "storage": {"uri": f"file://{storage}/{name}"},
            "nodePool": {"gpusPerNode": 0, "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}},
            "stages": [
                {"name": stage, "type": "sft", "datasets": [{"name": "d", "uri": f"standin://x?stepSeconds=0.3{knobs}"}],
                 "hyperparameters": {"maxSteps": steps}, "checkpoint": {"everySteps": 2}}
                for stage in ("first", "second")
            ],
            **spec_extra,
        },
    }


def _scenarios(storage: Path) -> list[dict]:
    quick_restarts = {"restartBackoffSeconds": 2, "maxRestartBackoffSeconds": 2}
    big = _run("no-gpus", storage)
    big["spec"]["nodePool"]["gpusPerNode"] = 16  # no node has as many (the test nodes have 2): unschedulable
    return [
        _run("succeeds", storage),
        _run("recovers", storage, knobs="&exitCode=1&failAtStep=3&failOnAttempt=0", runPolicy=quick_restarts),
        _run("retries-out", storage, knobs="&exitCode=1&failAtStep=2&failOnAttempt=0,1",
             runPolicy={"backoffLimit": 1, **quick_restarts}),
        _run("bad-data", storage, knobs="&exitCode=3&failAtStep=2"),
        _run("deadline", storage, steps=200, runPolicy={"activeDeadlineSeconds": 6}),
        _run("suspended", storage, runPolicy={"suspend": True}),
        big,
        *[_queued(name, storage) for name in QUEUED],
    ]


QUEUED = ("queue-first", "queue-second")
"""Two runs in a Kueue queue with room for one: the first is admitted, the second queued behind it."""


def _queued(name: str, storage: Path) -> dict:
    obj = _run(name, storage, scheduling={"queueName": "one-gpu"})
    obj["spec"]["nodePool"]["gpusPerNode"] = 1
    return obj


def _one_gpu_queue(control_plane, namespace: str) -> None:
    quota = {"cpu": "32", "memory": "128Gi", "nvidia.com/gpu": "1"}
    cluster_queue = {
        "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": f"one-gpu-{namespace}"},
        "spec": {"namespaceSelector": {}, "resourceGroups": [{"coveredResources": list(quota), "flavors": [
            {"name": KUEUE_FLAVOR, "resources": [{"name": k, "nominalQuota": v} for k, v in quota.items()]}]}]},
    }
    local_queue = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue", "metadata": {"name": "one-gpu"},
                   "spec": {"clusterQueue": f"one-gpu-{namespace}"}}
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(cluster_queue))
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(local_queue))


def _signature(obj: dict) -> tuple:
    status = obj.get("status") or {}
    conditions = tuple(sorted((c["type"], c["status"], c.get("reason", "")) for c in status.get("conditions", [])))
    return status.get("phase"), conditions, status.get("observedGeneration") == obj["metadata"].get("generation")


def _trimmed(obj: dict, scenario: str) -> dict:
    metadata = obj["metadata"]
    kept = {key: metadata[key] for key in ("name", "namespace", "uid", "generation", "creationTimestamp") if key in metadata}
    return {"scenario": scenario, "object": {**obj, "metadata": kept}}


def test_capture_statuses(control_plane, operator, kueue, namespace, tmp_path):
    _one_gpu_queue(control_plane, namespace)
    for obj in _scenarios(tmp_path):
        storage = tmp_path / obj["metadata"]["name"]
        storage.mkdir()
        os.chown(storage, render.TRAINER_UID, render.TRAINER_UID)  # the pods' non-root user writes there
        control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))
    captured: dict[tuple, dict] = {}
    resumed = False
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        items = json.loads(control_plane.kubectl("get", "mmt", "-n", namespace, "-o", "json").stdout)["items"]
        for obj in items:
            name = obj["metadata"]["name"]
            captured.setdefault((name, _signature(obj)), _trimmed(obj, name))
        phases = {obj["metadata"]["name"]: (obj.get("status") or {}).get("phase") for obj in items}
        if phases["suspended"] == api.Phase.SUSPENDED.value and not resumed:
            # Resuming is part of the lifecycle too (Suspended turns False, reason Resumed).
            control_plane.kubectl("patch", "mmt", "suspended", "-n", namespace, "--type=merge",
                                  "-p", '{"spec":{"runPolicy":{"suspend":false}}}')
            resumed = True
        waiting = any(entry["object"]["metadata"]["name"] == "no-gpus" and any(
            c["type"] == "WaitingForResources" and c["status"] == "True"
            for c in entry["object"].get("status", {}).get("conditions", [])) for entry in captured.values())
        if waiting and all(phase in FINISHED for name, phase in phases.items() if name != "no-gpus"):
            break
        time.sleep(0.25)
    else:
        raise AssertionError(f"scenarios did not all finish: {phases}")
    entries = sorted(captured.values(), key=lambda e: (e["scenario"], e["object"]["metadata"].get("creationTimestamp", "")))
    OUTPUT.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(entries)} objects to {OUTPUT}")
