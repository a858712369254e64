"""Suspending an `rl` stage and resuming it, on the real control plane.

The learner is the stand-in trainer (standin_trainer.py): it resumes from its last committed
checkpoint and reports progress as the trainer does, in seconds, so what is tested is the
operator's handling of the stage's children. The rollout and reward workers are the real ones: their
pod spec names its own command (`python -m medmo_trainer.rl.rollout_server` / `reward_server`),
which the stand-in image cannot replace, and they load the tiny preset model and pass their
readiness probes as in a real run. The real trainer as learner would add a GRPO stage on CPU to
the same assertions and was left to the full-recipe test.
"""

from __future__ import annotations

import json

import pytest
from medmo_cases import STANDIN_IMAGE, load_sample
from polling import wait_for

pytestmark = pytest.mark.controlplane

RUN = "rl-pause"
TIMEOUT_S = 300
WORKERS = [f"{RUN}-grpo-rollout", f"{RUN}-grpo-reward"]


def _rl_run(storage) -> dict:
    """The tiny sample's rl stage alone: the stand-in learner (40 steps, a checkpoint every 5) and
    the real workers, which start from the tiny preset (the stand-in exports no model to load).
    cleanPodPolicy None keeps the workers after the stage, so their readiness is checked whenever
    they come up, however fast the learner finishes."""
    obj = load_sample("medmo-tiny.yaml")
    grpo = next(s for s in obj["spec"]["stages"] if s["type"] == "rl")
    grpo.update(
        initFrom="preset:tiny-qwen3-vl",
        datasets=[{"name": "d", "uri": "standin://x?stepSeconds=0.25"}],
        hyperparameters={"maxSteps": 40},
        checkpoint={"everySteps": 5},
    )
    obj["metadata"]["name"] = RUN
    obj["spec"].update(image=STANDIN_IMAGE, storage={"uri": f"file://{storage}"}, stages=[grpo])
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
    _wait(lambda: _status(cp, namespace).get("currentStep", 0) >= 11, "step 11")
    before = _deployments(cp, namespace)
    assert sorted(before) == sorted(WORKERS)

    _patch_suspend(cp, namespace, True)
    _wait(lambda: _status(cp, namespace).get("phase") == "Suspended", "the run to be Suspended")
    _wait(lambda: not _deployments(cp, namespace), "the worker Deployments to be deleted")
    _wait(lambda: not _items(cp, namespace, "pods"), "every pod (learner and workers) to be gone")
    checkpoint = int((tmp_path / "grpo" / "checkpoints" / "latest").read_text())
    assert checkpoint >= 10

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
    assert (record["phase"], record["step"], record.get("restarts", 0)) == ("Succeeded", 40, 0)
    assert [j["metadata"]["name"] for j in _items(cp, namespace, "jobs")] == [f"{RUN}-grpo-0"]
    learner = next(p for p in _items(cp, namespace, "pods") if p["metadata"]["labels"].get("medmo.io/role") == "learner")
    log = node_agent.pod(namespace, learner["metadata"]["name"]).log_path("trainer").read_text()
    assert f"resuming from step {checkpoint}" in log
    # The recreated workers serve: each passes its readiness probe (the real servers' /readyz).
    _wait(lambda: all(d.get("status", {}).get("readyReplicas") == d["spec"]["replicas"] for d in _deployments(cp, namespace).values()),
          "the recreated workers to be ready")
