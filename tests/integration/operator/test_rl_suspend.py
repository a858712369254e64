"""Suspending an `rl` stage and resuming it, on the real control plane, with the real trainer in
every pod: the GRPO learner (the tiny preset, a few small steps) and the rollout and reward workers,
which load the tiny preset and pass their readiness probes as in a real run.
"""

from __future__ import annotations

import json

import pytest
from medmo_cases import TRAINER_IMAGE, load_sample
from polling import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.controlplane]

RUN = "rl-pause"
TIMEOUT_S = 300
WORKERS = [f"{RUN}-grpo-rollout", f"{RUN}-grpo-reward"]
STEPS = 12


def _rl_run(storage) -> dict:
    """The tiny sample's rl stage alone, from the tiny preset, shrunk (12 steps of 2 prompts of 2
    short completions, a checkpoint every 2). cleanPodPolicy None keeps the workers after the
    stage, so their readiness is checked whenever they come up, however fast the learner finishes."""
    obj = load_sample("medmo-tiny.yaml")
    grpo = next(s for s in obj["spec"]["stages"] if s["type"] == "rl")
    grpo.update(
        initFrom="preset:tiny-qwen3-vl",
        datasets=[{"name": "d", "uri": "synthetic://train?n=32&seed=4", "tasks": ["grounding"]}],
        checkpoint={"everySteps": 2},
    )
    grpo["hyperparameters"]["maxSteps"] = STEPS
    grpo["rl"]["algorithm"].update(groupSize=2, promptsPerStep=2, maxCompletionLength=8)
    obj["metadata"]["name"] = RUN
    obj["spec"].update(image=TRAINER_IMAGE, storage={"uri": f"file://{storage}"}, stages=[grpo])
    obj["spec"]["runPolicy"]["cleanPodPolicy"] = "None"
    return obj


def _status(cp, namespace) -> dict:
    return json.loads(cp.kubectl("get", "mmt", RUN, "-n", namespace, "-o", "json").stdout).get("status", {})


def _items(cp, namespace, kind) -> list[dict]:
    return json.loads(cp.kubectl("get", kind, "-n", namespace, "-l", f"medmo.io/run={RUN}", "-o", "json").stdout)["items"]


def _deployments(cp, namespace) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in _items(cp, namespace, "deployments")}


def _patch_suspend(cp, namespace, suspend: bool) -> None:
    body = json.dumps({"spec": {"runPolicy": {"suspend": suspend}}})
    cp.kubectl("patch", "mmt", RUN, "-n", namespace, "--type=merge", "-p", body)


def _wait(predicate, what: str):
    return wait_for(predicate, TIMEOUT_S, what, interval_s=0.5)


def test_suspended_rl_stage_gets_its_workers_back_and_resumes_from_its_checkpoint(control_plane, operator, node_agent, namespace, tmp_path):
    cp = control_plane
    cp.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(_rl_run(tmp_path)))
    _wait(lambda: _status(cp, namespace).get("currentStep", 0) >= 3, "step 3")
    before = _deployments(cp, namespace)
    assert sorted(before) == sorted(WORKERS)

    _patch_suspend(cp, namespace, True)
    _wait(lambda: _status(cp, namespace).get("phase") == "Suspended", "the run to be Suspended")
    _wait(lambda: not _deployments(cp, namespace), "the worker Deployments to be deleted")
    _wait(lambda: not _items(cp, namespace, "pods"), "every pod (learner and workers) to be gone")
    checkpoint = int((tmp_path / "grpo" / "checkpoints" / "latest").read_text().removeprefix("step-"))
    assert checkpoint >= 2

    _patch_suspend(cp, namespace, False)
    after = _wait(lambda: len(d := _deployments(cp, namespace)) == len(WORKERS) and d, "the worker Deployments to come back")
    assert all(after[name]["metadata"]["uid"] != before[name]["metadata"]["uid"] for name in WORKERS)
    try:
        _wait(lambda: _status(cp, namespace).get("phase") == "Succeeded", "the run to succeed")
    except AssertionError:
        print(json.dumps(_status(cp, namespace), indent=1))
        print(operator.log.read_text()[-4000:])
        raise

    record = _status(cp, namespace)["stages"][0]
    assert (record["phase"], record["step"], record.get("restarts", 0)) == ("Succeeded", STEPS, 0)
    assert [j["metadata"]["name"] for j in _items(cp, namespace, "jobs")] == [f"{RUN}-grpo-0"]
    learner = next(p for p in _items(cp, namespace, "pods") if p["metadata"]["labels"].get("medmo.io/role") == "learner")
    log = node_agent.pod(namespace, learner["metadata"]["name"]).log_path("trainer").read_text()
    assert f"/grpo/checkpoints/step-{checkpoint} at step {checkpoint}" in log  # the trainer's resume line
    # The recreated workers serve: each passes its readiness probe (the real servers' /readyz).
    _wait(lambda: all(d.get("status", {}).get("readyReplicas") == d["spec"]["replicas"] for d in _deployments(cp, namespace).values()),
          "the recreated workers to be ready")
