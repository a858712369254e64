"""The operator on the real control plane: stages in order, restarts from checkpoints, failures,
operator restarts, suspension, garbage collection, waiting for GPUs, and a real two-stage run.

Most runs use the stand-in trainer (standin_trainer.py, image STANDIN_IMAGE): it reports progress
and checkpoints as the trainer does, quickly, so the operator's behaviour is what is tested.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import time

import pytest
import yaml
from medmo_cases import STANDIN_IMAGE, TRAINER_IMAGE, load_sample, standin_run, standin_stage
from polling import wait_for

from controlplane.node_agent import NodeSpec

pytestmark = pytest.mark.controlplane

TIMEOUT_S = 240


def _apply(cp, obj: dict, namespace: str) -> None:
    cp.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))


def _get(cp, namespace: str, name: str) -> dict:
    return json.loads(cp.kubectl("get", "mmt", name, "-n", namespace, "-o", "json").stdout)


def _wait_for(predicate, what: str, timeout_s: float = TIMEOUT_S):
    return wait_for(predicate, timeout_s, what, interval_s=0.5)


def _wait_phase(cp, namespace, name, phase, operator, timeout_s=TIMEOUT_S) -> dict:
    try:
        return _wait_for(lambda: (obj := _get(cp, namespace, name)).get("status", {}).get("phase") == phase and obj,
                         f"{name} to be {phase}", timeout_s)
    except AssertionError:
        print(json.dumps(_get(cp, namespace, name).get("status"), indent=1))
        print(operator.log.read_text()[-4000:])
        raise


def _jobs(cp, namespace: str, run: str) -> list[dict]:
    return json.loads(cp.kubectl("get", "jobs", "-n", namespace, "-l", f"medmo.io/run={run}", "-o", "json").stdout)["items"]


def _pods(cp, namespace: str, run: str, phase: str | None = None) -> list[dict]:
    pods = json.loads(cp.kubectl("get", "pods", "-n", namespace, "-l", f"medmo.io/run={run}", "-o", "json").stdout)["items"]
    return [p for p in pods if phase is None or p["status"].get("phase") == phase]


def test_sample_runs_every_stage_in_order_to_succeeded(control_plane, operator, namespace, tmp_path):
    """The tiny sample, with the stand-in as its learner image; its RL workers are the real ones."""
    obj = load_sample("medmo-tiny.yaml")
    obj["spec"]["image"] = STANDIN_IMAGE
    obj["spec"]["storage"]["uri"] = f"file://{tmp_path}"
    for stage in obj["spec"]["stages"]:
        stage.setdefault("hyperparameters", {})["maxSteps"] = 4
        stage["checkpoint"] = {"everySteps": 2}
    grpo = next(s for s in obj["spec"]["stages"] if s["type"] == "rl")
    grpo["initFrom"] = "preset:tiny-qwen3-vl"  # the stand-in exports no real model for the workers to load
    _apply(control_plane, obj, namespace)

    control_plane.kubectl("wait", "--for=condition=Succeeded", f"--timeout={TIMEOUT_S * 2}s", "mmt/medmo-tiny", "-n", namespace,
                          timeout_s=TIMEOUT_S * 2 + 30)

    status = _get(control_plane, namespace, "medmo-tiny")["status"]
    stages = status["stages"]
    assert [s["name"] for s in stages] == ["align", "ground", "instruct", "grpo", "bench"]
    assert all(s["phase"] == "Succeeded" and s["step"] == 4 and s["totalSteps"] == 4 for s in stages)
    starts = [s["startTime"] for s in stages]
    assert starts == sorted(starts)
    assert all(a["completionTime"] <= b["startTime"] for a, b in zip(stages, stages[1:]))
    assert status["outputModel"] == f"file://{tmp_path}/grpo/model"
    assert json.loads((tmp_path / "ground" / "model" / "config.json").read_text())["from"] == f"file://{tmp_path}/align/model"
    events = control_plane.kubectl("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=medmo-tiny").stdout
    assert "StageStarted" in events and "Succeeded" in events
    table = control_plane.kubectl("get", "mmt", "-n", namespace).stdout
    assert "Succeeded" in table and "bench" in table
    # cleanPodPolicy Running: the finished RL stage's workers are gone.
    assert not [d for d in json.loads(control_plane.kubectl("get", "deployments", "-n", namespace, "-o", "json").stdout)["items"]]


def test_killed_rank_restarts_the_stage_from_its_checkpoint(control_plane, operator, node_agent, namespace, tmp_path):
    obj = standin_run("kill-rank", tmp_path, [standin_stage("train", steps=30, every=5, nodes=2, stepSeconds=0.25)])
    _apply(control_plane, obj, namespace)
    _wait_for(lambda: _get(control_plane, namespace, "kill-rank").get("status", {}).get("currentStep", 0) >= 12, "step 12")
    victim = next(p for p in _pods(control_plane, namespace, "kill-rank", "Running")
                  if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "1")
    checkpoint_before_kill = int((tmp_path / "train" / "checkpoints" / "latest").read_text())

    for pid in node_agent.pod(namespace, victim["metadata"]["name"]).pids().values():
        os.killpg(pid, signal.SIGKILL)

    seen_after_restart = []

    def restarted_and_done():
        status = _get(control_plane, namespace, "kill-rank").get("status", {})
        record = status.get("stages", [{}])[0]
        if record.get("restarts") == 1 and record.get("phase") in ("Running", "Succeeded"):
            seen_after_restart.append(record.get("step", 0))
        return status.get("phase") == "Succeeded" and status

    status = _wait_for(restarted_and_done, "the run to finish after the restart")
    record = status["stages"][0]
    assert record["restarts"] == 1
    assert record["step"] == 30
    assert min(seen_after_restart) >= checkpoint_before_kill, seen_after_restart
    assert sorted(j["metadata"]["name"] for j in _jobs(control_plane, namespace, "kill-rank")) == ["kill-rank-train-1"]
    new_pod = node_agent.pod(namespace, next(p["metadata"]["name"] for p in _pods(control_plane, namespace, "kill-rank")
                                             if p["metadata"]["labels"]["medmo.io/attempt"] == "1"
                                             and p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "0"))
    resumed_from = int(new_pod.log_path("trainer").read_text().split("resuming from step ")[1].split()[0])
    assert resumed_from >= checkpoint_before_kill


def test_non_retryable_exit_code_fails_the_run_with_the_trainers_reason(control_plane, operator, namespace, tmp_path):
    obj = standin_run("bad-data", tmp_path, [standin_stage("train", steps=10, exitCode=3, failAtStep=2)],
                    runPolicy={"backoffLimit": 3})
    _apply(control_plane, obj, namespace)

    obj = _wait_phase(control_plane, namespace, "bad-data", "Failed", operator)

    failed = next(c for c in obj["status"]["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "NonRetryableFailure"
    assert "exit code 3" in failed["message"]
    assert obj["status"]["stages"][0]["restarts"] == 0
    assert len(_jobs(control_plane, namespace, "bad-data")) == 1


def test_operator_killed_mid_run_creates_no_duplicates_and_the_run_finishes(control_plane, operator, namespace, tmp_path):
    obj = standin_run("survivor", tmp_path, [standin_stage("first", steps=20, stepSeconds=0.2), standin_stage("second", steps=4)])
    _apply(control_plane, obj, namespace)
    _wait_for(lambda: _get(control_plane, namespace, "survivor").get("status", {}).get("currentStep", 0) >= 5, "step 5")

    operator.kill()
    time.sleep(2)
    operator.start()

    _wait_phase(control_plane, namespace, "survivor", "Succeeded", operator)
    names = sorted(j["metadata"]["name"] for j in _jobs(control_plane, namespace, "survivor"))
    assert names == ["survivor-first-0", "survivor-second-0"]
    config_maps = control_plane.kubectl("get", "configmaps", "-n", namespace, "-l", "medmo.io/run=survivor", "-o", "name").stdout.split()
    assert len(config_maps) == 2


def test_suspend_stops_the_pods_and_resume_continues_from_the_checkpoint(control_plane, operator, node_agent, namespace, tmp_path):
    obj = standin_run("pausable", tmp_path, [standin_stage("train", steps=30, every=5, stepSeconds=0.25)])
    _apply(control_plane, obj, namespace)
    _wait_for(lambda: _get(control_plane, namespace, "pausable").get("status", {}).get("currentStep", 0) >= 11, "step 11")

    control_plane.kubectl("patch", "mmt", "pausable", "-n", namespace, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":true}}}')
    _wait_phase(control_plane, namespace, "pausable", "Suspended", operator)
    _wait_for(lambda: not _pods(control_plane, namespace, "pausable"), "the pods to be gone")
    checkpoint = int((tmp_path / "train" / "checkpoints" / "latest").read_text())
    assert checkpoint >= 10

    control_plane.kubectl("patch", "mmt", "pausable", "-n", namespace, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":false}}}')
    pod = _wait_for(lambda: _pods(control_plane, namespace, "pausable"), "the pods to come back")[0]
    obj = _wait_phase(control_plane, namespace, "pausable", "Succeeded", operator)

    suspended = next(c for c in obj["status"]["conditions"] if c["type"] == "Suspended")
    assert suspended["status"] == "False"
    log = node_agent.pod(namespace, pod["metadata"]["name"]).log_path("trainer").read_text()
    assert f"resuming from step {checkpoint}" in log


def test_deleting_the_run_garbage_collects_every_child(control_plane, operator, namespace, tmp_path):
    obj = standin_run("doomed", tmp_path, [standin_stage("train", steps=200, stepSeconds=0.2)])
    _apply(control_plane, obj, namespace)
    _wait_for(lambda: _pods(control_plane, namespace, "doomed", "Running"), "a running pod")

    control_plane.kubectl("delete", "mmt", "doomed", "-n", namespace, "--wait=true")

    def children():
        out = control_plane.kubectl("get", "jobs,pods,services,configmaps,secrets", "-n", namespace, "-l", "medmo.io/run=doomed", "-o", "name")
        return out.stdout.split()

    _wait_for(lambda: not children(), "the children to be collected", timeout_s=120)


def test_waiting_for_gpus_then_running_when_a_gpu_node_joins(control_plane, operator, node_agent, namespace, tmp_path):
    obj = standin_run("big", tmp_path, [standin_stage("train", steps=4)])
    obj["spec"]["nodePool"]["gpusPerNode"] = 4  # the agent's nodes have 2 GPUs each
    _apply(control_plane, obj, namespace)

    obj = _wait_for(lambda: (o := _get(control_plane, namespace, "big")) and any(
        c["type"] == "WaitingForResources" and c["status"] == "True" for c in o.get("status", {}).get("conditions", [])) and o,
        "the waiting-for-resources condition")
    waiting = next(c for c in obj["status"]["conditions"] if c["type"] == "WaitingForResources")
    assert "nvidia.com/gpu" in waiting["message"]

    node_agent.add_node(NodeSpec(name="gpu-big", gpus=4))  # what a cluster autoscaler does
    try:
        obj = _wait_phase(control_plane, namespace, "big", "Succeeded", operator)
    finally:
        node_agent.remove_node("gpu-big")
    waiting = next(c for c in obj["status"]["conditions"] if c["type"] == "WaitingForResources")
    assert waiting["status"] == "False"


@pytest.mark.slow
def test_real_trainer_two_stage_run(control_plane, operator, node_agent, namespace, tmp_path):
    """The real trainer image: a tiny alignment stage then a tiny SFT stage, model exported."""
    tiny = load_sample("medmo-tiny.yaml")
    stages = copy.deepcopy(tiny["spec"]["stages"][:2])
    for stage in stages:
        stage["hyperparameters"]["maxSteps"] = 4
        stage["checkpoint"] = {"everySteps": 2}
    obj = standin_run("real", tmp_path, stages)
    obj["spec"]["image"] = TRAINER_IMAGE
    _apply(control_plane, obj, namespace)

    obj = _wait_phase(control_plane, namespace, "real", "Succeeded", operator, timeout_s=600)

    align, ground = obj["status"]["stages"]
    assert align["step"] == ground["step"] == 4
    assert "loss" in ground["metrics"]
    assert align["lastCheckpoint"].endswith("step-4")
    exported = tmp_path / "ground" / "model"
    assert (exported / "config.json").exists()
    assert any(exported.glob("*.safetensors"))
    config = yaml.safe_load(control_plane.kubectl("get", "configmap", "real-ground-config", "-n", namespace, "-o", "jsonpath={.data.stage\\.yaml}").stdout)
    assert config["model"]["base"] == f"file://{tmp_path}/align/model"
