"""The fault matrix: what clusters do to a run, with the real trainer in every pod (the tiny preset,
storage on SeaweedFS S3, the operator and node agent on the real control plane).

Each test breaks one thing mid-stage, then checks that the run still reaches Succeeded, that
`status.stages[].restarts` counts what happened, and that at most one checkpoint interval of steps
was computed twice. It prints the steps recomputed and the time from the fault to recovery (the
first step trained after it); the README's "Faults" table quotes these figures.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from medmo_cases import TRAINER_IMAGE, progress_lines
from polling import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.controlplane, pytest.mark.s3]

SECRET = "s3-credentials"
TIMEOUT_S = 420
EVERY = 2
"""Checkpoint interval of every faulted stage: the most steps a fault may cost."""
RESUMED = "resumed from "


def _stage(name: str, steps: int, nodes: int = 1, kind: str = "pretrain") -> dict:
    return {
        "name": name, "type": kind, "nodes": nodes, "trainable": ["projector"],
        "datasets": [{"name": "synth", "uri": "synthetic://train?n=64&seed=1", "tasks": ["caption"]}],
        "hyperparameters": {"learningRate": 1e-3, "maxSteps": steps, "imageSize": 80, "perDeviceBatchSize": 2},
        "strategy": {"name": "ddp"},
        "checkpoint": {"everySteps": EVERY, "keepLast": 2},
    }


def _run(name: str, storage: dict, stages: list[dict]) -> dict:
    """The real trainer, the tiny preset, restarts after 1 s (the default 10 s backoff would only
    make the tests wait)."""
    return {
        "apiVersion": "medmo.io/v1alpha1", "kind": "MedMOTraining", "metadata": {"name": name},
        "spec": {
            "image": TRAINER_IMAGE,
            "model": {"base": "preset:tiny-qwen3-vl"},
            "storage": storage,
            "nodePool": {"gpusPerNode": 0, "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}},
            "stages": stages,
            "runPolicy": {"backoffLimit": 3, "restartBackoffSeconds": 1, "maxRestartBackoffSeconds": 2},
        },
    }


def _s3_storage(cp, namespace: str, s3_server, bucket: str, run: str, endpoint: str | None = None) -> dict:
    """The run's S3 storage, its credentials in a Secret; `endpoint` replaces the server's own."""
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET}, "type": "Opaque",
              "stringData": {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}}
    cp.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(secret))
    return {"uri": f"{bucket}/runs/{run}", "secretRef": {"name": SECRET},
            "endpoint": endpoint or s3_server.endpoint, "region": s3_server.region}


def _apply(cp, namespace: str, obj: dict) -> None:
    cp.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))


def _status(cp, namespace: str, run: str) -> dict:
    return json.loads(cp.kubectl("get", "mmt", run, "-n", namespace, "-o", "json").stdout).get("status", {})


def _items(cp, namespace: str, kind: str, run: str) -> list[dict]:
    return json.loads(cp.kubectl("get", kind, "-n", namespace, "-l", f"medmo.io/run={run}", "-o", "json").stdout)["items"]


@dataclass(frozen=True)
class PodLog:
    pod: str
    text: str

    @property
    def steps(self) -> list[dict]:
        """The progress reports of training steps in this log."""
        return [p for p in progress_lines(self.text) if p["phase"] == "Running" and p["step"] > 0]

    @property
    def resumed_at(self) -> int | None:
        """The step the trainer resumed from, from its resume line."""
        line = next((line for line in self.text.splitlines() if RESUMED in line), None)
        return None if line is None else int(line.rsplit(" at step ", 1)[1].split()[0])


def _pod_logs(node_agent, namespace: str, prefix: str, container: str = "trainer") -> list[PodLog]:
    """Logs of every pod whose name starts with `prefix` that the node agent ran (deleted ones
    included), oldest first."""
    dirs = sorted((node_agent.workdir / "pods").glob(f"{namespace}_{prefix}*"), key=lambda d: d.stat().st_mtime)
    logs = []
    for pod_dir in dirs:
        log = pod_dir / "logs" / f"{container}.log"
        if log.exists():
            logs.append(PodLog(pod_dir.name.removeprefix(f"{namespace}_").rsplit("_", 1)[0], log.read_text(errors="replace")))
    return logs


def _last_step(logs: list[PodLog]) -> int:
    return max((p["step"] for log in logs for p in log.steps), default=0)


def _wait_step(node_agent, namespace: str, prefix: str, step: int) -> None:
    wait_for(lambda: _last_step(_pod_logs(node_agent, namespace, prefix)) >= step, TIMEOUT_S,
             f"{prefix} to train step {step}", interval_s=0.2)


def _wait_succeeded(cp, namespace: str, run: str, operator) -> dict:
    def done():
        status = _status(cp, namespace, run)
        assert status.get("phase") != "Failed", json.dumps(status, indent=1)
        return status.get("phase") == "Succeeded" and status

    try:
        return wait_for(done, TIMEOUT_S, f"{run} to succeed", interval_s=1)
    except AssertionError:
        print(json.dumps(_status(cp, namespace, run), indent=1))
        print(operator.log.read_text()[-4000:])
        raise


def _recovery(fault_at: float, step_at_fault: int, after: list[PodLog], fault: str) -> tuple[int, float]:
    """Steps recomputed (trained before the fault, trained again after it) and seconds from the
    fault to the first step trained after it; both printed for the README's table."""
    resumed = [log.resumed_at for log in after if log.resumed_at is not None]
    resumed_at = resumed[0] if resumed else 0
    first = min((p for log in after for p in log.steps), key=lambda p: p["timestamp"])
    recomputed = max(0, step_at_fault - resumed_at)
    seconds = first["timestamp"] - fault_at
    print(f"\nFAULT {fault}: step {step_at_fault} reached, resumed from step {resumed_at}, "
          f"{recomputed} steps recomputed, recovered (step {first['step']} trained) {seconds:.1f} s after the fault")
    return recomputed, seconds


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return found


def test_kill_9_of_one_rank_of_a_two_node_stage_restarts_it_from_its_checkpoint(
        control_plane, operator, node_agent, namespace, s3_server, s3_bucket):
    """A real torchrun rendezvous across two pods (node rank from the completion index); rank 1's
    trainer process is killed with SIGKILL mid-training."""
    cp, run, steps = control_plane, "kill-rank", 10
    storage = _s3_storage(cp, namespace, s3_server, s3_bucket, run)
    _apply(cp, namespace, _run(run, storage, [_stage("align", steps, nodes=2)]))
    first_attempt = f"{run}-align-0-"
    _wait_step(node_agent, namespace, first_attempt, EVERY + 1)

    victim = next(p for p in _items(cp, namespace, "pods", run)
                  if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "1")
    launcher = node_agent.pod(namespace, victim["metadata"]["name"]).pids()["trainer"]
    ranks = _children(launcher)
    assert len(ranks) == 1, f"torchrun on node 1 runs one trainer process, found {ranks}"
    step_at_fault = _last_step(_pod_logs(node_agent, namespace, first_attempt))
    fault_at = time.time()
    os.kill(ranks[0], signal.SIGKILL)

    status = _wait_succeeded(cp, namespace, run, operator)
    record = status["stages"][0]
    assert (record["phase"], record["step"], record["restarts"]) == ("Succeeded", steps, 1), record
    assert sorted(j["metadata"]["name"] for j in _items(cp, namespace, "jobs", run)) == [f"{run}-align-1"]
    first = _pod_logs(node_agent, namespace, first_attempt)
    assert len(first) == 2 and any(log.steps for log in first)  # rank 0 reports the steps
    after = _pod_logs(node_agent, namespace, f"{run}-align-1-")
    assert len(after) == 2, [log.pod for log in after]
    # Both ranks of the new attempt resumed from the same checkpoint, the last one before the fault.
    assert len({log.resumed_at for log in after}) == 1 and after[0].resumed_at is not None
    step_at_fault = max(step_at_fault, _last_step(first))
    recomputed, _ = _recovery(fault_at, step_at_fault, after, "kill -9 of rank 1 of 2")
    assert recomputed <= EVERY
