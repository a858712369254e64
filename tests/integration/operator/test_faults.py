"""The fault matrix: what clusters do to a run, with the real trainer in every pod (the tiny preset,
storage on SeaweedFS S3, the operator and node agent on the real control plane).

Each test breaks one thing mid-stage, then checks that the run still reaches Succeeded, that
`status.stages[].restarts` counts what happened, and that at most one checkpoint interval of steps
was computed twice. It prints the steps recomputed and the time from the fault to recovery (the
first step trained beyond what was reached before it); the README's "Faults" table quotes them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pytest
import s3fs
from medmo_cases import TRAINER_IMAGE, progress_lines
from polling import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.controlplane, pytest.mark.s3]

SECRET = "s3-credentials"
TIMEOUT_S = 420
EVERY = 2
"""Checkpoint interval of every faulted stage: the most steps a fault may cost."""
RESUMED = "resumed from "
OUTAGE_S = 30


def _stage(name: str, steps: int, nodes: int = 1) -> dict:
    """An alignment stage of the tiny preset (the projector trains: the fastest real steps)."""
    return {
        "name": name, "type": "pretrain", "nodes": nodes, "trainable": ["projector"],
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


def _recovery(fault_at: float, attempts: list[list[PodLog]], fault: str) -> tuple[int, float]:
    """Steps recomputed (trained in more than one attempt) and seconds from the fault to the first
    step the last attempt trained beyond what earlier ones reached; printed for the README's table."""
    trained = Counter(p["step"] for attempt in attempts for log in attempt for p in log.steps)
    recomputed = sum(times - 1 for times in trained.values())
    reached = max((p["step"] for attempt in attempts[:-1] for log in attempt for p in log.steps), default=0)
    first = min((p for log in attempts[-1] for p in log.steps if p["timestamp"] > fault_at and p["step"] > reached),
                key=lambda p: p["timestamp"])
    resumed = next((log.resumed_at for log in attempts[-1] if log.resumed_at is not None), None)
    seconds = first["timestamp"] - fault_at
    print(f"\nFAULT {fault}: {len(attempts) - 1} restart(s), "
          + (f"resumed from step {resumed}, " if resumed is not None else "")
          + f"{recomputed} steps recomputed, step {first['step']} trained {seconds:.1f} s after the fault")
    return recomputed, seconds


def _children(pid: int) -> list[int]:
    """The processes `pid` started (torchrun's are its ranks)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return found


def test_kill_9_of_one_rank_of_a_two_node_stage_mid_save_restarts_it_from_its_last_whole_checkpoint(
        control_plane, operator, node_agent, namespace, s3_server, s3_bucket, storage_link):
    """A real torchrun rendezvous across two pods (node rank from the completion index); rank 1's
    trainer process is killed with SIGKILL in the middle of the checkpoint of step 4 (its model
    and optimizer state written, its per-rank trainer state being written, not yet committed):
    the stage resumes from step 2's, the last whole one."""
    cp, run, steps, struck = control_plane, "kill-rank", 8, 2 * EVERY
    storage = _s3_storage(cp, namespace, s3_server, s3_bucket, run, endpoint=storage_link.endpoint)
    _apply(cp, namespace, _run(run, storage, [_stage("align", steps, nodes=2)]))
    first_attempt = f"{run}-align-0-"
    _wait_step(node_agent, namespace, first_attempt, 1)

    victim = next(p for p in _items(cp, namespace, "pods", run)
                  if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "1")
    launcher = node_agent.pod(namespace, victim["metadata"]["name"]).pids()["trainer"]
    ranks = _children(launcher)
    assert len(ranks) == 1, f"torchrun on node 1 runs one trainer process, found {ranks}"
    checkpoints = f"{storage['uri']}/align/checkpoints"
    storage_link.when(f"{checkpoints.removeprefix('s3:/')}/step-{struck}/trainer/".encode(),
                      lambda: os.kill(ranks[0], signal.SIGKILL))

    # Once the operator has started the second attempt, the first is over, and the second has not
    # reached its own save of that step yet.
    wait_for(lambda: f"{run}-align-1" in {j["metadata"]["name"] for j in _items(cp, namespace, "jobs", run)},
             TIMEOUT_S, "the operator to restart the stage", interval_s=0.5)
    assert storage_link.triggered_at is not None, "rank 1 was not killed during the save"
    fs = s3fs.S3FileSystem(**s3_server.storage_options(), skip_instance_cache=True)
    half_written = f"{checkpoints.removeprefix('s3://')}/step-{struck}"
    assert fs.find(half_written) and not fs.exists(f"{half_written}/COMMITTED"), fs.find(half_written)

    status = _wait_succeeded(cp, namespace, run, operator)
    record = status["stages"][0]
    assert (record["phase"], record["step"], record["restarts"]) == ("Succeeded", steps, 1), record
    assert sorted(j["metadata"]["name"] for j in _items(cp, namespace, "jobs", run)) == [f"{run}-align-1"]
    first = _pod_logs(node_agent, namespace, first_attempt)
    after = _pod_logs(node_agent, namespace, f"{run}-align-1-")
    assert len(first) == 2 and len(after) == 2, [log.pod for log in first + after]
    # Both ranks of the new attempt resumed from the last whole checkpoint, not the half-written one.
    assert [log.resumed_at for log in after] == [struck - EVERY] * 2
    recomputed, _ = _recovery(storage_link.triggered_at, [first, after], "kill -9 of rank 1 of 2, mid-save")
    assert recomputed <= EVERY


class StorageLink:
    """A loopback TCP proxy in front of the session's SeaweedFS that a test can cut, so the server
    other tests use stays up. While cut, each connection is reset as soon as it is accepted (the
    pods see storage unreachable), and the attempts are counted. A test can also act the moment a
    given request passes (a checkpoint's first write, to strike mid-save)."""

    def __init__(self, endpoint: str):
        target = urlparse(endpoint)
        self.target = (target.hostname, target.port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.trigger: tuple[bytes, Callable[[], None]] | None = None
        self.triggered_at: float | None = None
        self.outage_s = 0.0
        self.cut_at: float | None = None
        self.restored_at: float | None = None
        self.refused: list[float] = []
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._timer: threading.Timer | None = None
        threading.Thread(target=self._accept, daemon=True).start()

    def when(self, request_part: bytes, action: Callable[[], None]) -> None:
        """Run `action` (once) when a request containing `request_part` passes, then forward it."""
        self.trigger = (request_part, action)

    def cut_on(self, request_part: bytes, seconds: float) -> None:
        """Cut the link for `seconds` when a request containing `request_part` passes through it
        (that request is dropped with its connection)."""
        self.outage_s = seconds
        self.when(request_part, self._cut)

    @property
    def is_cut(self) -> bool:
        return self.cut_at is not None and self.restored_at is None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.server.close()
        with self._lock:
            for sock in list(self._open):
                _reset(sock)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.is_cut:
                self.refused.append(time.time())
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._open |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                if from_client and self._fire(data) and self.is_cut:
                    return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                for sock in (source, sink):
                    if sock in self._open:
                        self._open.discard(sock)
                        _reset(sock)

    def _fire(self, data: bytes) -> bool:
        with self._lock:
            trigger = self.trigger
            if trigger is None or trigger[0] not in data:
                return False
            self.trigger, self.triggered_at = None, time.time()
        trigger[1]()
        return True

    def _cut(self) -> None:
        with self._lock:
            self.cut_at = time.time()
            for sock in list(self._open):
                _reset(sock)
            self._open.clear()
        self._timer = threading.Timer(self.outage_s, self._restore)
        self._timer.start()

    def _restore(self) -> None:
        self.restored_at = time.time()


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset, as a dead network path or a crashed server looks to a client."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    sock.close()


@pytest.fixture
def storage_link(s3_server):
    link = StorageLink(s3_server.endpoint)
    yield link
    link.close()



def test_storage_unreachable_for_30_s_during_a_checkpoint_save_is_ridden_out_with_retries(
        control_plane, operator, node_agent, namespace, s3_server, s3_bucket, storage_link):
    """The run's S3 endpoint goes dark for 30 s from the first write of a checkpoint: the trainer's
    storage requests retry with backoff, the save completes when storage comes back, and the stage
    carries on without a restart."""
    cp, run, steps, cut_step = control_plane, "s3-outage", 6, 2 * EVERY
    storage = _s3_storage(cp, namespace, s3_server, s3_bucket, run, endpoint=storage_link.endpoint)
    storage_link.cut_on(f"{storage['uri'].removeprefix('s3:/')}/align/checkpoints/step-{cut_step}/state/".encode(), OUTAGE_S)
    _apply(cp, namespace, _run(run, storage, [_stage("align", steps)]))

    status = _wait_succeeded(cp, namespace, run, operator)
    assert storage_link.cut_at is not None, "the checkpoint save never went through the link"
    record = status["stages"][0]
    assert (record["phase"], record["step"], record["restarts"]) == ("Succeeded", steps, 0), record
    # The pod kept trying through the outage, each attempt reset, and its save went through after.
    during = [t for t in storage_link.refused if storage_link.cut_at <= t <= storage_link.restored_at]
    assert len(during) >= 2, storage_link.refused
    logs = _pod_logs(node_agent, namespace, f"{run}-align-0-")
    assert len(logs) == 1 and logs[0].resumed_at is None
    fs = s3fs.S3FileSystem(**s3_server.storage_options(), skip_instance_cache=True)
    checkpoints = f"{storage['uri'].removeprefix('s3://')}/align/checkpoints"
    assert fs.exists(f"{checkpoints}/step-{steps}/COMMITTED")
    print(f"\nFAULT storage outage: {len(during)} attempts reset during the {OUTAGE_S} s outage")
    recomputed, _ = _recovery(storage_link.cut_at, [logs], f"S3 unreachable for {OUTAGE_S} s during a save")
    assert recomputed == 0


def test_operator_killed_mid_stage_and_started_again_creates_no_duplicates_and_the_run_carries_on(
        control_plane, operator, node_agent, namespace, s3_server, s3_bucket):
    cp, run, steps = control_plane, "op-kill", 10
    storage = _s3_storage(cp, namespace, s3_server, s3_bucket, run)
    _apply(cp, namespace, _run(run, storage, [_stage("align", steps)]))
    attempt = f"{run}-align-0-"
    _wait_step(node_agent, namespace, attempt, 2)

    step_at_fault = _last_step(_pod_logs(node_agent, namespace, attempt))
    fault_at = time.time()
    operator.kill()
    try:
        time.sleep(5)  # the trainer reports into the void meanwhile
    finally:
        operator.start()
    # The stage may even have finished while the operator was away: the record says so either way.
    def current_again() -> bool:
        status = _status(cp, namespace, run)
        assert status.get("phase") != "Failed", json.dumps(status, indent=1)
        return status.get("stages", [{}])[0].get("step", 0) > step_at_fault

    try:
        wait_for(current_again, TIMEOUT_S, "the restarted operator to show a step trained after the fault", interval_s=0.2)
    except AssertionError:
        print(json.dumps(_status(cp, namespace, run), indent=1))
        print(operator.log.read_text()[-6000:])
        print("\n".join(log.text[-3000:] for log in _pod_logs(node_agent, namespace, attempt)))
        raise
    seconds = time.time() - fault_at

    status = _wait_succeeded(cp, namespace, run, operator)
    record = status["stages"][0]
    assert (record["phase"], record["step"], record["restarts"]) == ("Succeeded", steps, 0), record
    assert [j["metadata"]["name"] for j in _items(cp, namespace, "jobs", run)] == [f"{run}-align-0"]
    assert len(_items(cp, namespace, "configmaps", run)) == 1
    assert len(_items(cp, namespace, "services", run)) == 1
    logs = _pod_logs(node_agent, namespace, f"{run}-align-")
    assert len(logs) == 1 and logs[0].resumed_at is None  # one pod, never restarted
    print(f"\nFAULT operator killed: step {step_at_fault} reached, 0 steps recomputed, status current again "
          f"{seconds:.1f} s after the kill (5 s of it with no operator)")


def _rl_stage(steps: int) -> dict:
    """The sample's GRPO stage from the tiny preset, shrunk: 2 prompts of 2 completions a step."""
    return {
        "name": "grpo", "type": "rl", "initFrom": "preset:tiny-qwen3-vl",
        "datasets": [{"name": "synth-rl", "uri": "synthetic://train?n=32&seed=4", "tasks": ["grounding"]}],
        "hyperparameters": {"learningRate": 1e-4, "lrScheduler": "constant", "maxSteps": steps, "imageSize": 80},
        "strategy": {"name": "ddp"},
        "checkpoint": {"everySteps": EVERY, "keepLast": 2},
        "rl": {"rollout": {"replicas": 1}, "reward": {"replicas": 1},
               "algorithm": {"groupSize": 2, "promptsPerStep": 2, "maxCompletionLength": 8, "maxPromptLength": 256},
               "rewards": {"accuracy": 0.0, "bbox": 1.0, "format": 0.0, "overlong": 0.0}},
    }


def test_rollout_and_reward_worker_pods_killed_mid_rl_stage(
        control_plane, operator, node_agent, namespace, s3_server, s3_bucket):
    """Both worker pods of an rl stage are deleted at once (as when their node dies); their
    Deployments bring new ones, and the learner either fails over to them or its stage restarts
    from its checkpoint: the run succeeds either way, and the restarts say which."""
    cp, run, steps = control_plane, "rl-kill", 6
    storage = _s3_storage(cp, namespace, s3_server, s3_bucket, run)
    _apply(cp, namespace, _run(run, storage, [_rl_stage(steps)]))
    learner = f"{run}-grpo-[0-9]-"
    _wait_step(node_agent, namespace, learner, EVERY + 1)

    workers = [p for p in _items(cp, namespace, "pods", run) if p["metadata"]["labels"].get("medmo.io/role") in ("rollout", "reward")]
    assert sorted(p["metadata"]["labels"]["medmo.io/role"] for p in workers) == ["reward", "rollout"]
    fault_at = time.time()
    cp.kubectl("delete", "pod", "-n", namespace, "--grace-period=0", "--force", *(p["metadata"]["name"] for p in workers))

    status = _wait_succeeded(cp, namespace, run, operator)
    record = status["stages"][0]
    learners = _pod_logs(node_agent, namespace, learner)
    assert (record["phase"], record["step"]) == ("Succeeded", steps), record
    assert record.get("restarts", 0) == len(learners) - 1 <= 1, (record, [log.pod for log in learners])
    recomputed, _ = _recovery(fault_at, [[log] for log in learners], "rollout and reward worker pods killed")
    assert recomputed <= EVERY
    # The Deployments' new workers served the steps after the fault.
    killed = {p["metadata"]["name"] for p in workers}
    for role, request in (("rollout", "generate: "), ("reward", "score: ")):
        new = [log for log in _pod_logs(node_agent, namespace, f"{run}-grpo-{role}-", role) if log.pod not in killed]
        assert any(request in log.text for log in new), f"no new {role} worker served a request: {[log.pod for log in new]}"
