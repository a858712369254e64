"""The WaitingForResources condition's message, from pods as the API server returns them: every pod of
a stage the scheduler cannot place (learner, rollout, reward), what each asks for, and what is short."""

from __future__ import annotations

from medmo_operator import observe, render


def _pod(name: str, role: str, stage: str = "grpo", requests: dict | None = None, message: str = "",
         phase: str = "Pending", scheduled: bool = False, deleting: bool = False) -> dict:
    condition = {"type": "PodScheduled", "status": "True"} if scheduled else {
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
    metadata = {"name": name, "labels": {render.LABEL_RUN: "r", render.LABEL_STAGE: stage, render.LABEL_ROLE: role}}
    if deleting:
        metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": metadata,
            "spec": {"containers": [{"name": "c", "resources": {"requests": requests or {}}}]},
            "status": {"phase": phase, "conditions": [condition]}}


GPU_SHORT = "0/2 nodes are available: 2 Insufficient nvidia.com/gpu. preemption: 0/2 nodes are available."


def test_every_waiting_pod_of_a_stage_is_counted_by_role_with_its_requests_and_what_is_short():
    pods = [
        _pod("r-grpo-0-0", "learner", requests={"nvidia.com/gpu": "4", "cpu": "8"}, message=GPU_SHORT),
        _pod("r-grpo-0-1", "learner", requests={"nvidia.com/gpu": "4", "cpu": "8"}, message=GPU_SHORT),
        _pod("r-grpo-rollout-x", "rollout", requests={"nvidia.com/gpu": "1"}, message=GPU_SHORT),
        _pod("r-grpo-reward-y", "reward", requests={"cpu": "64"}, message="0/2 nodes are available: 2 Insufficient cpu."),
        _pod("r-grpo-reward-z", "reward", requests={"cpu": "1"}, scheduled=True, phase="Running"),
        _pod("r-grpo-rollout-old", "rollout", message=GPU_SHORT, deleting=True),
    ]

    (stage, message), = observe.unschedulable_by_stage(pods).items()

    assert stage == "grpo"
    assert message.startswith("4 pods cannot be scheduled, short of cpu, nvidia.com/gpu: "
                              "2 learner (each requests cpu 8, nvidia.com/gpu 4); 1 rollout (each requests nvidia.com/gpu 1); "
                              "1 reward (each requests cpu 64).")
    assert message.endswith(f"Scheduler: {GPU_SHORT}")


def test_stages_whose_pods_are_all_placed_are_not_waiting():
    pods = [_pod("r-a-0-0", "learner", stage="a", scheduled=True, phase="Running"),
            _pod("r-b-0-0", "learner", stage="b", message="0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector.")]

    waiting = observe.unschedulable_by_stage(pods)

    assert list(waiting) == ["b"]
    assert waiting["b"] == ("1 pod cannot be scheduled: 1 learner. "
                            "Scheduler: 0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector.")
