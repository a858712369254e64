"""Runs queued in Kueue (scheduling.queueName), on the real control plane with Kueue's manager and
webhooks running (built from sigs.k8s.io/kueue by tests/kueue/build.sh; tests/controlplane/kueue.py).

The quota is on nvidia.com/gpu: the node agent's nodes advertise 2 GPUs each (4 in all), and each
test's ClusterQueue holds fewer, so Kueue, not the scheduler, decides who runs. The learners are
the stand-in trainer (it checkpoints and resumes as the trainer does); an rl stage's rollout and
reward workers are the real servers.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import pytest
from medmo_cases import standin_run, standin_stage
from polling import wait_for

from medmo_operator import render

pytestmark = pytest.mark.controlplane

TIMEOUT_S = 180
FLAVOR = "medmo-default"
"""The ResourceFlavor the kueue fixture makes (conftest.KUEUE_FLAVOR)."""
KUEUE_API = "kueue.x-k8s.io/v1beta2"


def _apply(cp, obj: dict, namespace: str | None = None) -> None:
    cp.kubectl("apply", *(["-n", namespace] if namespace else []), "-f", "-", input=json.dumps(obj))


def _queue(cp, namespace: str, gpus: int) -> str:
    """A ClusterQueue with `gpus` nvidia.com/gpu (cpu and memory aplenty) that preempts lower
    priorities, and a LocalQueue for it in `namespace`; returns the LocalQueue's name."""
    cluster_queue = f"gpus-{secrets.token_hex(3)}"
    quota = {"cpu": "32", "memory": "128Gi", "nvidia.com/gpu": str(gpus)}
    _apply(cp, {
        "apiVersion": KUEUE_API, "kind": "ClusterQueue", "metadata": {"name": cluster_queue},
        "spec": {
            "namespaceSelector": {},
            "preemption": {"withinClusterQueue": "LowerPriority"},
            "resourceGroups": [{"coveredResources": list(quota), "flavors": [
                {"name": FLAVOR, "resources": [{"name": k, "nominalQuota": v} for k, v in quota.items()]}]}],
        },
    })
    _apply(cp, {"apiVersion": KUEUE_API, "kind": "LocalQueue", "metadata": {"name": "team-gpus"},
                "spec": {"clusterQueue": cluster_queue}}, namespace)
    return "team-gpus"


def _storage(tmp_path: Path, name: str) -> Path:
    """A run's file:// storage, owned by the pods' non-root user (as a cluster admin prepares a hostPath)."""
    path = tmp_path / name
    path.mkdir()
    os.chown(path, render.TRAINER_UID, render.TRAINER_UID)
    return path


def _run(name: str, storage: Path, queue: str, steps: int = 6, every: int = 2, step_seconds: float = 0.2, priority: str | None = None,
         stage_type: str = "sft", **stage_extra) -> dict:
    scheduling = {"queueName": queue, **({"workloadPriorityClassName": priority} if priority else {})}
    stage = {**standin_stage("train", stage_type, steps=steps, every=every, stepSeconds=step_seconds), **stage_extra}
    return standin_run(name, _storage(storage, name), [stage], gpus_per_node=1, scheduling=scheduling)


def _status(cp, namespace: str, name: str) -> dict:
    return json.loads(cp.kubectl("get", "mmt", name, "-n", namespace, "-o", "json").stdout).get("status", {})


def _admitted(status: dict) -> dict:
    return next((c for c in status.get("conditions", []) if c["type"] == "Admitted"), {})


def _pods(cp, namespace: str, run: str) -> list[dict]:
    return json.loads(cp.kubectl("get", "pods", "-n", namespace, "-l", f"medmo.io/run={run}", "-o", "json").stdout)["items"]


def _wait(cp, namespace, predicate, what: str, operator) -> dict:
    try:
        return wait_for(predicate, TIMEOUT_S, what, interval_s=0.5)
    except AssertionError:
        print(cp.kubectl("get", "mmt,jobs,pods,workloads.kueue.x-k8s.io", "-n", namespace, "-o", "wide", check=False).stdout)
        print(cp.kubectl("get", "deployments,pods", "-n", namespace, "-o",
                         "custom-columns=NAME:.metadata.name,LABELS:.metadata.labels,GATES:.spec.schedulingGates", check=False).stdout)
        for run in json.loads(cp.kubectl("get", "mmt", "-n", namespace, "-o", "json").stdout)["items"]:
            print(run["metadata"]["name"], json.dumps(run.get("status", {}).get("conditions"), indent=1))
        print(operator.log.read_text()[-3000:])
        raise


def _phase(cp, namespace, name, phase, operator) -> dict:
    return _wait(cp, namespace, lambda: (s := _status(cp, namespace, name)).get("phase") == phase and s, f"{name} to be {phase}", operator)


def _reason(cp, namespace, name, reason, operator) -> dict:
    return _wait(cp, namespace, lambda: _admitted(s := _status(cp, namespace, name)).get("reason") == reason and s,
                 f"{name}'s Admitted condition to say {reason}", operator)


def test_a_run_beyond_the_gpu_quota_stays_queued_until_the_first_finishes(control_plane, operator, kueue, node_agent, namespace, tmp_path):
    cp = control_plane
    queue = _queue(cp, namespace, gpus=1)
    _apply(cp, _run("first", tmp_path, queue, steps=40, step_seconds=0.5), namespace)
    first = _reason(cp, namespace, "first", "Admitted", operator)
    assert _admitted(first)["status"] == "True"

    _apply(cp, _run("second", tmp_path, queue, steps=4), namespace)
    second = _reason(cp, namespace, "second", "Queued", operator)
    assert "nvidia.com/gpu" in _admitted(second)["message"], _admitted(second)
    assert not _pods(cp, namespace, "second")  # its Job stays suspended: no pod holds a GPU

    # A third waits behind the second (same priority: Kueue takes the older first); each says where it is.
    _apply(cp, _run("third", tmp_path, queue, steps=4), namespace)
    for name, place in (("third", "position 2 of 2"), ("second", "position 1 of 2")):
        _wait(cp, namespace, lambda name=name, place=place: place in _admitted(_status(cp, namespace, name)).get("message", ""),
              f"{name}'s Admitted condition to say {place}", operator)
    assert _status(cp, namespace, "first")["phase"] == "Running"

    _phase(cp, namespace, "first", "Succeeded", operator)
    second = _phase(cp, namespace, "second", "Succeeded", operator)
    assert (_admitted(second)["status"], _admitted(second)["reason"]) == ("True", "Admitted")
    assert second["stages"][0]["restarts"] == 0
    _phase(cp, namespace, "third", "Succeeded", operator)


def test_a_higher_priority_run_preempts_a_lower_one_which_resumes_from_its_checkpoint(
        control_plane, operator, kueue, node_agent, namespace, tmp_path):
    cp = control_plane
    queue = _queue(cp, namespace, gpus=1)
    _apply(cp, _run("low", tmp_path, queue, steps=30, every=5, step_seconds=0.25, priority="research-low"), namespace)
    _wait(cp, namespace, lambda: _status(cp, namespace, "low").get("currentStep", 0) >= 11, "low to pass step 11", operator)

    _apply(cp, _run("high", tmp_path, queue, steps=4, priority="research-high"), namespace)
    low = _reason(cp, namespace, "low", "Preempted", operator)
    assert _admitted(low)["status"] == "False"
    checkpoint = int((tmp_path / "low" / "train" / "checkpoints" / "latest").read_text())
    assert checkpoint >= 10

    _phase(cp, namespace, "high", "Succeeded", operator)
    _reason(cp, namespace, "low", "Admitted", operator)
    pod = _wait(cp, namespace, lambda: _pods(cp, namespace, "low"), "low's pod to come back", operator)[0]
    low = _phase(cp, namespace, "low", "Succeeded", operator)

    # Preemption is no failure: no restart counted, the same attempt resumed from its checkpoint.
    assert low["stages"][0]["restarts"] == 0
    assert not [c for c in low["conditions"] if c["type"] in ("Failed", "Restarting") and c["status"] == "True"]
    assert pod["metadata"]["labels"]["medmo.io/attempt"] == "0"
    log = node_agent.pod(namespace, pod["metadata"]["name"]).log_path("trainer").read_text()
    assert f"resuming from step {checkpoint}" in log


def test_rl_workers_count_against_the_queues_quota(control_plane, operator, kueue, node_agent, namespace, tmp_path):
    """The rl stage's learner (1 GPU) and rollout worker (1 GPU) fill a 2-GPU queue between them, so
    a 1-GPU run waits; without the workers counted it would run at once."""
    cp = control_plane
    queue = _queue(cp, namespace, gpus=2)
    rl = {"rollout": {"replicas": 1, "gpus": 1}, "reward": {"replicas": 1}}
    _apply(cp, _run("rl", tmp_path, queue, steps=40, step_seconds=0.5, stage_type="rl", rl=rl), namespace)
    _reason(cp, namespace, "rl", "Admitted", operator)

    def rollout_workload_admitted():
        workloads = json.loads(cp.kubectl("get", "workloads.kueue.x-k8s.io", "-n", namespace, "-o", "json").stdout)["items"]
        return [w for w in workloads if w["metadata"]["name"].startswith("pod-rl-train-rollout")
                and any(c["type"] == "Admitted" and c["status"] == "True" for c in w.get("status", {}).get("conditions", []))]

    _wait(cp, namespace, rollout_workload_admitted, "the rollout worker pod's Workload to be admitted", operator)
    _apply(cp, _run("sft", tmp_path, queue, steps=4), namespace)
    sft = _reason(cp, namespace, "sft", "Queued", operator)
    assert "nvidia.com/gpu" in _admitted(sft)["message"], _admitted(sft)
    assert _status(cp, namespace, "rl")["phase"] == "Running"

    _phase(cp, namespace, "rl", "Succeeded", operator)  # the stage's end deletes its workers: their GPU is freed
    _phase(cp, namespace, "sft", "Succeeded", operator)


def test_suspending_a_queued_run_goes_through_kueue_and_resuming_continues_from_its_checkpoint(
        control_plane, operator, kueue, node_agent, namespace, tmp_path):
    """runPolicy.suspend on a run Kueue admitted: the operator deactivates the stage's Workload (an
    unsuspend of its own would bypass the queue, and a suspend Kueue would undo), Kueue stops the Job
    and frees the quota; resuming reactivates it and Kueue admits it again."""
    cp = control_plane
    queue = _queue(cp, namespace, gpus=1)
    _apply(cp, _run("paused", tmp_path, queue, steps=30, every=5, step_seconds=0.25), namespace)
    _wait(cp, namespace, lambda: _status(cp, namespace, "paused").get("currentStep", 0) >= 11, "step 11", operator)

    cp.kubectl("patch", "mmt", "paused", "-n", namespace, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":true}}}')
    _phase(cp, namespace, "paused", "Suspended", operator)
    _wait(cp, namespace, lambda: not _pods(cp, namespace, "paused"), "the pods to be gone", operator)
    workload = json.loads(cp.kubectl("get", "workloads.kueue.x-k8s.io", "-n", namespace, "-o", "json").stdout)["items"][0]
    assert workload["spec"]["active"] is False
    job = json.loads(cp.kubectl("get", "job", "paused-train-0", "-n", namespace, "-o", "json").stdout)
    assert job["spec"]["suspend"] is True
    checkpoint = int((tmp_path / "paused" / "train" / "checkpoints" / "latest").read_text())
    assert checkpoint >= 10

    cp.kubectl("patch", "mmt", "paused", "-n", namespace, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":false}}}')
    pod = _wait(cp, namespace, lambda: _pods(cp, namespace, "paused"), "the pod to come back", operator)[0]
    run = _phase(cp, namespace, "paused", "Succeeded", operator)
    assert run["stages"][0]["restarts"] == 0
    assert (_admitted(run)["status"], _admitted(run)["reason"]) == ("True", "Admitted")
    log = node_agent.pod(namespace, pod["metadata"]["name"]).log_path("trainer").read_text()
    assert f"resuming from step {checkpoint}" in log
