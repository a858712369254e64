"""Scheduling on the real control plane, by the real kube-scheduler: a gang-scheduled multi-node
stage (Kubernetes 1.36's Workload API: tests/controlplane/harness.py turns on its feature gates) binds
all of its pods or none, and a run whose pods fit no node says which pods wait for what, then starts
when a matching node joins, as a cluster autoscaler or Karpenter would add one.

Each test gives its run a node pool of its own (a node label no other node has), adds that pool's
nodes itself and removes them afterwards. The learner runs the stand-in trainer (standin_trainer.py).
scheduler-plugins' Coscheduling (scheduling.gangScheduler: coscheduling) is not here: its Go module
cannot be fetched to build it for the test control plane; tests/unit/operator/test_render_gang.py
checks what the operator renders for it.
"""

from __future__ import annotations

import json
import time

import pytest
from medmo_cases import load_sample, standin_run, standin_stage
from polling import wait_for

from controlplane.node_agent import NodeSpec

pytestmark = pytest.mark.controlplane

POOL_LABEL = "medmo.io/test-pool"
TIMEOUT_S = 120


def _run(name: str, storage, pool: str, stages: list[dict], gang: bool = False) -> dict:
    return standin_run(name, storage, stages, gpus_per_node=1, node_pool={"nodeSelector": {POOL_LABEL: pool}},
                       scheduling={"gang": gang})


def _learner_stage(name: str, nodes: int, steps: int = 4, **knobs) -> dict:
    return standin_stage(name, steps=steps, nodes=nodes, **knobs)


def _pods(cp, namespace: str, run: str) -> list[dict]:
    out = cp.kubectl("get", "pods", "-n", namespace, "-l", f"medmo.io/run={run}", "-o", "json").stdout
    return [p for p in json.loads(out)["items"] if not p["metadata"].get("deletionTimestamp")]


def _status(cp, namespace: str, run: str) -> dict:
    return json.loads(cp.kubectl("get", "mmt", run, "-n", namespace, "-o", "json").stdout).get("status", {})


def _condition(status: dict, kind: str) -> dict | None:
    return next((c for c in status.get("conditions", []) if c["type"] == kind), None)


def _waiting(cp, namespace: str, run: str) -> dict | None:
    condition = _condition(_status(cp, namespace, run), "WaitingForResources")
    return condition if condition and condition["status"] == "True" else None


def _unschedulable(pod: dict) -> bool:
    return any(c["type"] == "PodScheduled" and c["status"] == "False" and c.get("reason") == "Unschedulable"
               for c in pod.get("status", {}).get("conditions", []))


def _nodes(pool: str, count: int, start: int = 0, **resources) -> list[NodeSpec]:
    return [NodeSpec(name=f"{pool}-{i}", labels={POOL_LABEL: pool}, **resources) for i in range(start, start + count)]


def test_gang_of_two_binds_no_pod_while_one_fits_and_both_once_a_second_node_joins(
        control_plane, operator, node_agent, namespace, tmp_path):
    pool = f"gang-{namespace[-6:]}"
    first, second = _nodes(pool, 2, gpus=1)  # one learner pod (1 GPU) per node
    node_agent.add_node(first)
    try:
        # Attempt 0 fails at step 2 (a retryable exit code): attempt 1 is a new gang, and attempt 0's goes with its Job.
        run = _run("gang", tmp_path, pool, [_learner_stage("train", nodes=2, exitCode=1, failAtStep=2, failOnAttempt=0)], gang=True)
        run["spec"]["runPolicy"] = {"restartBackoffSeconds": 1}
        _apply(control_plane, run, namespace)

        # Both pods were tried and refused by the scheduler: a pod-by-pod scheduler would have bound one.
        pods = wait_for(lambda: (p := _pods(control_plane, namespace, "gang")) and len(p) == 2 and all(map(_unschedulable, p)) and p,
                        TIMEOUT_S, "both learner pods to be found unschedulable", interval_s=0.5)
        assert [p["spec"].get("nodeName") for p in pods] == [None, None]
        assert all(p["spec"]["schedulingGroup"] == {"podGroupName": "gang-train-0"} for p in pods)
        group = json.loads(control_plane.kubectl("get", "podgroups.scheduling.k8s.io", "gang-train-0", "-n", namespace, "-o", "json").stdout)
        assert group["spec"]["schedulingPolicy"] == {"gang": {"minCount": 2}}
        waiting = wait_for(lambda: _waiting(control_plane, namespace, "gang"), TIMEOUT_S, "WaitingForResources")
        assert waiting["message"].startswith("2 pods cannot be scheduled")
        assert "2 learner (each requests cpu 100m, memory 64Mi, nvidia.com/gpu 1)" in waiting["message"]
        assert [p["spec"].get("nodeName") for p in _pods(control_plane, namespace, "gang")] == [None, None]

        node_agent.add_node(second)
        joined = time.monotonic()
        bound = wait_for(lambda: (p := _pods(control_plane, namespace, "gang")) and all(x["spec"].get("nodeName") for x in p) and p,
                         TIMEOUT_S, "both learner pods to be bound", interval_s=0.2)
        print(f"both pods bound {time.monotonic() - joined:.1f} s after the second node joined")
        assert sorted(p["spec"]["nodeName"] for p in bound) == [first.name, second.name]

        status = wait_for(lambda: (s := _status(control_plane, namespace, "gang")).get("phase") == "Succeeded" and s,
                          TIMEOUT_S, "the gang's run to succeed", interval_s=0.5)
        assert _condition(status, "WaitingForResources")["status"] == "False"
        assert status["stages"][0]["restarts"] == 1
        kinds = "workloads.scheduling.k8s.io,podgroups.scheduling.k8s.io"
        gangs = json.loads(control_plane.kubectl("get", kinds, "-n", namespace, "-o", "json").stdout)["items"]
        assert sorted((g["kind"], g["metadata"]["name"]) for g in gangs) == [("PodGroup", "gang-train-1"), ("Workload", "gang-train-1")]
    finally:
        _delete_run_and_nodes(control_plane, node_agent, namespace, "gang", [first.name, second.name])


def test_every_waiting_pod_of_an_rl_stage_is_named_with_its_requests_and_the_run_starts_when_a_matching_node_joins(
        control_plane, operator, node_agent, namespace, tmp_path):
    pool = f"as-{namespace[-6:]}"
    grpo = next(s for s in load_sample("medmo-tiny.yaml")["spec"]["stages"] if s["type"] == "rl")
    grpo.update(_learner_stage("grpo", nodes=1, steps=200), type="rl", initFrom="preset:tiny-qwen3-vl")
    grpo["rl"]["rollout"] = {"replicas": 1, "gpus": 1}  # on the run's GPU pool, as its learner
    grpo["rl"]["reward"] = {"replicas": 1, "nodeSelector": {POOL_LABEL: pool}, "resources": {"requests": {"cpu": "2"}}}
    _apply(control_plane, _run("scaled", tmp_path, pool, [grpo]), namespace)
    (node,) = _nodes(pool, 1, gpus=2, cpu="4")
    try:
        waiting = wait_for(lambda: (w := _waiting(control_plane, namespace, "scaled")) and w["message"].startswith("3 pods") and w,
                           TIMEOUT_S, "WaitingForResources naming the learner, rollout and reward pods", interval_s=0.5)
        message = waiting["message"]
        assert ("3 pods cannot be scheduled: 1 learner (each requests cpu 100m, memory 64Mi, nvidia.com/gpu 1); "
                "1 rollout (each requests nvidia.com/gpu 1); 1 reward (each requests cpu 2).") in message
        assert "node affinity/selector" in message  # the scheduler's reason: no node of the pool yet
        pods = _pods(control_plane, namespace, "scaled")
        # What an autoscaler reads to pick a node group: each pending pod's selector and requests.
        assert {p["metadata"]["labels"]["medmo.io/role"]: p["spec"]["nodeSelector"] for p in pods} == {
            role: {POOL_LABEL: pool} for role in ("learner", "rollout", "reward")}

        node_agent.add_node(node)  # what a cluster autoscaler or Karpenter does for such pods
        wait_for(lambda: (p := _pods(control_plane, namespace, "scaled")) and len(p) == 3
                 and all(x["spec"].get("nodeName") == node.name for x in p), TIMEOUT_S, "all three pods bound to the new node")
        status = wait_for(lambda: (s := _status(control_plane, namespace, "scaled"))
                          and _condition(s, "WaitingForResources")["status"] == "False" and s["stages"][0].get("step", 0) > 0 and s,
                          TIMEOUT_S, "the stage to run and WaitingForResources to clear", interval_s=0.5)
        assert _condition(status, "WaitingForResources")["reason"] == "Scheduled"
    finally:
        _delete_run_and_nodes(control_plane, node_agent, namespace, "scaled", [node.name])


def _apply(cp, obj: dict, namespace: str) -> None:
    cp.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))


def _delete_run_and_nodes(cp, node_agent, namespace: str, run: str, nodes: list[str]) -> None:
    """The run's pods go before their nodes do, so no later test sees them or the pool."""
    cp.kubectl("delete", "mmt", run, "-n", namespace, "--wait=true", "--ignore-not-found", timeout_s=120)
    wait_for(lambda: not _pods(cp, namespace, run), 120, f"{run}'s pods to be gone", interval_s=0.5)
    for name in nodes:
        node_agent.remove_node(name)  # one never added is fine
