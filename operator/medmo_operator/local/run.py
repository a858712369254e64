"""`medmo run FILE`: a MedMOTraining on this machine, with no cluster.

The same plan and the same rendered children as on Kubernetes: each Job is expanded into its
indexed pods and each Deployment into its replicas, and the pod runner runs them as processes on
loopback addresses. The local loop stands in for the Job controller (a failed pod fails the Job;
a non-retryable exit code is a podFailurePolicy failure), for DNS (pod and Service names resolve
to pod addresses) and for the operator (progress endpoint, status). The status is saved after each
step, so running the same command again carries on: finished stages are skipped and the running
one resumes from its last checkpoint.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import secrets
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import yaml
from aiohttp import web

from medmo_operator import api, plan, render
from medmo_operator.local import network
from medmo_operator.local.podspec import StaticObjects
from medmo_operator.local.runner import PodRunner, RunningPod
from medmo_operator.progress import ProgressEndpoint, ProgressStore
from medmo_trainer.exit_codes import NON_RETRYABLE

NAMESPACE = "local"
STOP_GRACE_S = 10.0


@dataclass
class LocalJob:
    """A Job expanded into its indexed pods."""

    name: str
    stage: str
    attempt: int
    pods: list[RunningPod]
    failed_at: float | None = None


@dataclass
class LocalDeployment:
    name: str
    pods: list[RunningPod] = field(default_factory=list)
    service: dict | None = None


class LocalRun:
    """Runs one MedMOTraining to the end (or until interrupted) on this machine."""

    def __init__(self, training: api.MedMOTraining, workdir: Path, *, out: TextIO = sys.stdout, interval_s: float = 1.0):
        self.training = training
        self.spec = _local_spec(training.spec)
        self.name = training.metadata.name
        # Absolute: pods get paths under it (their hosts file, volumes) and run in other directories.
        self.state_dir = Path(workdir).resolve() / self.name
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.interval_s = interval_s
        identity = self._identity()
        self.run = render.RunRef(name=self.name, namespace=NAMESPACE, uid=identity["uid"])
        self.token_key = identity["key"].encode()
        self.store = ProgressStore()
        self.objects = StaticObjects()
        self.services: dict[str, dict] = {}
        self.jobs: dict[str, LocalJob] = {}
        self.deployments: dict[str, LocalDeployment] = {}
        self.runner = PodRunner(
            self.state_dir / "pods",
            self.objects,
            cluster_records=self._dns_records,
            entrypoints={self.spec.image: render.TRAINER_ENTRYPOINT},
            extra_env=_passed_through_env(),
        )
        self.display = ProgressDisplay(out)
        self._stop = threading.Event()
        self._log_offsets: dict[Path, int] = {}

    # -- state kept between invocations ------------------------------------------------------

    def _identity(self) -> dict[str, str]:
        """A stable uid and token key for this run, so a rerun finds the same names and tokens."""
        path = self.state_dir / "identity.json"
        if path.exists():
            return json.loads(path.read_text())
        identity = {"uid": str(uuid.uuid4()), "key": secrets.token_hex(32)}
        path.write_text(json.dumps(identity))
        path.chmod(0o600)
        return identity

    @property
    def status_path(self) -> Path:
        return self.state_dir / "status.json"

    def load_status(self) -> api.MedMOTrainingStatus | None:
        if not self.status_path.exists():
            return None
        status = api.MedMOTrainingStatus.model_validate_json(self.status_path.read_text())
        if status.phase.finished:
            return status
        # Processes do not survive the command: whatever ran is resumed from its checkpoint.
        for record in status.stages:
            if record.phase in (api.Phase.RESTARTING, api.Phase.SUSPENDED):
                record.phase = api.Phase.RUNNING
        return status

    def save_status(self, status: api.MedMOTrainingStatus) -> None:
        tmp = self.status_path.with_suffix(".tmp")
        tmp.write_text(status.model_dump_json(by_alias=True, indent=2))
        os.replace(tmp, self.status_path)

    # -- the loop ----------------------------------------------------------------------------

    def execute(self) -> api.MedMOTrainingStatus:
        """Runs until the run succeeds or fails, or `stop()` is called; returns the last status."""
        status = self.load_status()
        if status is not None and not status.phase.finished and status.current_stage:
            record = next(r for r in status.stages if r.name == status.current_stage)
            where = record.last_checkpoint or "none yet"
            self.out.write(
                f"resuming {self.name} at stage {status.current_stage} from its latest committed checkpoint "
                f"(last reported: {where})\n"
            )
            self.out.flush()
        loop = asyncio.new_event_loop()
        server = threading.Thread(target=loop.run_forever, name="progress-endpoint", daemon=True)
        port = _free_port()
        endpoint = ProgressEndpoint(self.store, self.token_key, lambda ns, n: self.run.uid if (ns, n) == (NAMESPACE, self.name) else None)
        runner = web.AppRunner(endpoint.app(), access_log=None)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        server.start()
        self.endpoints = render.OperatorEndpoints(f"http://127.0.0.1:{port}", self.token_key)
        if self.spec.storage.secret_ref:
            self._add_storage_secret()
        try:
            while not self._stop.is_set():
                result = plan.plan(self.spec, status, self._observe(), datetime.now(UTC), generation=1)
                for action in result.actions:
                    self._carry_out(action)
                status = result.status
                self.save_status(status)
                self.display.update(status, self.spec)
                self._echo_resumes()
                if status.phase.finished:
                    break
                self._stop.wait(self.interval_s)
        finally:
            self.runner.stop(grace_s=STOP_GRACE_S)
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
            server.join(timeout=5)
            if status is not None:
                self.save_status(status)
            self.display.finish()
        return status

    def stop(self) -> None:
        self._stop.set()

    def _echo_resumes(self) -> None:
        """Shows the trainers' own word on where they resumed (from which checkpoint and step)."""
        offsets = self._log_offsets
        for job in self.jobs.values():
            for pod in job.pods[:1]:
                path = pod.log_path(pod.containers[0].name)
                if not path.exists():
                    continue
                with path.open("rb") as log:
                    log.seek(offsets.get(path, 0))
                    text = log.read()
                    offsets[path] = log.tell()
                for line in text.decode(errors="replace").splitlines():
                    if "resumed from" in line:
                        where = line.split("resumed from", 1)[1].strip()
                        self.display.event("Resumed", f"from {where}")

    # -- what the Job and Deployment controllers would do ------------------------------------

    def _observe(self) -> plan.Observed:
        jobs = {}
        for job in self.jobs.values():
            observation = self._observe_job(job)
            current = jobs.get(job.stage)
            if current is None or observation.attempt > current.attempt:
                jobs[job.stage] = observation
        return plan.Observed(jobs=jobs, progress=self.store.latest(NAMESPACE, self.name))

    def _observe_job(self, job: LocalJob) -> plan.JobObservation:
        statuses = [pod.status() for pod in job.pods]
        phases = [s["phase"] for s in statuses]
        failures = [_terminated(s) for s in statuses if s["phase"] == "Failed"]
        failures = [f for f in failures if f is not None]
        if failures and job.failed_at is None:
            # One failed rank fails the Job (backoffLimit 0): the other ranks are stopped, as the
            # Job controller deletes a failed Job's active pods.
            job.failed_at = time.monotonic()
            for pod in job.pods:
                if pod.phase not in ("Succeeded", "Failed"):
                    threading.Thread(target=pod.stop, args=(STOP_GRACE_S,), daemon=True).start()
        finished = all(p in ("Succeeded", "Failed") for p in phases)
        exit_code, message = (failures[0] if failures else (None, None))
        return plan.JobObservation(
            name=job.name,
            attempt=job.attempt,
            active=sum(p in ("Pending", "Running") for p in phases),
            succeeded=phases.count("Succeeded"),
            failed=phases.count("Failed"),
            complete=bool(phases) and all(p == "Succeeded" for p in phases),
            failed_condition=bool(failures) and finished,
            failure_reason="PodFailurePolicy" if exit_code in NON_RETRYABLE else "BackoffLimitExceeded",
            failure_message=message,
            exit_code=exit_code,
            termination_message=message,
        )

    def _carry_out(self, action: plan.Action) -> None:
        match action:
            case plan.EnsureStage(stage=stage_name, attempt=attempt):
                stage = next(s for s in self.spec.stages if s.name == stage_name)
                for child in render.build_stage_children(self.run, self.spec, stage, attempt, self.endpoints):
                    self._create(child, stage_name, attempt)
            case plan.DeleteJob(name=name):
                job = self.jobs.pop(name, None)
                if job:
                    for pod in job.pods:
                        self.runner.forget(pod.uid)
            case plan.DeleteWorkers(stage=stage_name):
                for role in ("rollout", "reward"):
                    name = f"{self.name}-{stage_name}-{role}"
                    deployment = self.deployments.pop(name, None)
                    if deployment:
                        for pod in deployment.pods:
                            self.runner.forget(pod.uid)
                    self.services.pop(name, None)
            case plan.Event(reason=reason, message=message):
                self.display.event(reason, message)
            case plan.SuspendJob() | plan.DeleteRun():
                pass  # suspension and TTLs are cluster features; locally Ctrl-C stops a run

    def _create(self, child: dict, stage: str, attempt: int) -> None:
        kind, name = child["kind"], child["metadata"]["name"]
        if kind in ("ConfigMap", "Secret"):
            self.objects.add(child)
        elif kind == "Service":
            self.services[name] = child
        elif kind == "Job" and name not in self.jobs:
            pods = [self.runner.start(_indexed_pod(child, index)) for index in range(child["spec"]["completions"])]
            self.jobs[name] = LocalJob(name=name, stage=stage, attempt=attempt, pods=pods)
        elif kind == "Deployment" and name not in self.deployments:
            pods = [self.runner.start(_replica_pod(child, replica)) for replica in range(child["spec"]["replicas"])]
            self.deployments[name] = LocalDeployment(name=name, pods=pods)
        if kind in ("Job", "Deployment", "Service"):
            self.runner.refresh_hosts()

    def _add_storage_secret(self) -> None:
        """Locally, the storage Secret the spec names is made from this shell's AWS_* variables."""
        ref = self.spec.storage.secret_ref
        values = {ref.access_key_id_key: os.environ.get("AWS_ACCESS_KEY_ID"), ref.secret_access_key_key: os.environ.get("AWS_SECRET_ACCESS_KEY")}
        missing = [k for k, v in values.items() if not v]
        if missing:
            raise SystemExit(
                f"storage.secretRef {ref.name!r}: locally the credentials come from AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY in the environment; set them"
            )
        self.objects.add({"kind": "Secret", "metadata": {"name": ref.name, "namespace": NAMESPACE}, "stringData": values})

    def _dns_records(self, pod: RunningPod) -> list[tuple[str, list[str]]]:
        running = [p for job in self.jobs.values() for p in job.pods] + [p for d in self.deployments.values() for p in d.pods]
        pods = [{"metadata": p.pod["metadata"], "spec": p.pod.get("spec", {}), "status": p.status()} for p in running]
        return network.dns_records(NAMESPACE, pods, list(self.services.values()))


def _indexed_pod(job: dict, index: int) -> dict:
    """Pod `index` of an Indexed Job, with what the Job controller would add."""
    template = copy.deepcopy(job["spec"]["template"])
    meta = template.setdefault("metadata", {})
    name = f"{job['metadata']['name']}-{index}"
    meta.update(name=name, namespace=job["metadata"]["namespace"], uid=f"{name}-{uuid.uuid4().hex[:8]}")
    meta.setdefault("labels", {}).update({"batch.kubernetes.io/job-name": job["metadata"]["name"], "batch.kubernetes.io/job-completion-index": str(index)})
    meta.setdefault("annotations", {})[render.COMPLETION_INDEX_ANNOTATION] = str(index)
    template["spec"]["hostname"] = name
    for container in template["spec"]["containers"]:
        container.setdefault("env", []).append({"name": "JOB_COMPLETION_INDEX", "value": str(index)})
    return {"apiVersion": "v1", "kind": "Pod", **template}


def _replica_pod(deployment: dict, replica: int) -> dict:
    template = copy.deepcopy(deployment["spec"]["template"])
    meta = template.setdefault("metadata", {})
    name = f"{deployment['metadata']['name']}-{replica}"
    meta.update(name=name, namespace=deployment["metadata"]["namespace"], uid=f"{name}-{uuid.uuid4().hex[:8]}")
    template["spec"].setdefault("restartPolicy", "Always")
    return {"apiVersion": "v1", "kind": "Pod", **template}


def _terminated(status: dict) -> tuple[int, str | None] | None:
    for container in status.get("containerStatuses", []):
        terminated = (container.get("state") or {}).get("terminated")
        if terminated and terminated.get("exitCode", 0) != 0:
            lines = (terminated.get("message") or "").strip().splitlines()
            return int(terminated["exitCode"]), (lines[-1] if lines else None)
    return None


def _passed_through_env() -> dict[str, str]:
    """What the node adds to every pod: CPU-only settings of this machine (caches are the spec's)."""
    names = ("DS_ACCELERATOR", "OMP_NUM_THREADS", "HF_HUB_OFFLINE", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
             "CUDA_VISIBLE_DEVICES", "AWS_ENDPOINT_URL")
    return {name: os.environ[name] for name in names if name in os.environ}


def _local_spec(spec: api.MedMOTrainingSpec) -> api.MedMOTrainingSpec:
    """The spec as this machine runs it: pods keep caches under the user's cache directory (so a
    second run reuses the tokenizer, data and compiled kernels), and file:// storage, a hostPath
    in the pods, is handed to the pods' user."""
    storage = render.file_storage_path(spec)
    if storage is not None:
        _hand_to_trainer(Path(storage), recursive=True)
    if spec.cache is not None:
        return spec
    cache = network.cache_dir() / "pod-cache"
    _hand_to_trainer(cache)
    return spec.model_copy(update={"cache": api.CacheSpec(host_path=api.HostPathCache(path=str(cache)))})


def _hand_to_trainer(path: Path, recursive: bool = False) -> None:
    """Create ``path`` owned by the pods' user, as a cluster admin prepares a hostPath for them."""
    path.mkdir(parents=True, exist_ok=True)
    for directory, _, files in os.walk(path) if recursive else [(str(path), [], [])]:
        for entry in (directory, *(os.path.join(directory, name) for name in files)):
            os.chown(entry, render.TRAINER_UID, render.TRAINER_UID, follow_symlinks=False)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ProgressDisplay:
    """One line per stage: a bar with step/total, loss or reward, and an ETA."""

    WIDTH = 24

    def __init__(self, out: TextIO):
        self.out = out
        self.tty = out.isatty() if hasattr(out, "isatty") else False
        self.last_line = ""
        self.last_print = 0.0
        self.started: dict[str, tuple[float, int]] = {}

    def event(self, reason: str, message: str) -> None:
        self._clear()
        self.out.write(f"[{reason}] {message}\n")
        self.out.flush()

    def update(self, status: api.MedMOTrainingStatus, spec: api.MedMOTrainingSpec) -> None:
        record = next((r for r in status.stages if r.name == status.current_stage), None)
        if record is None or status.phase.finished:
            return
        line = self._line(record)
        now = time.monotonic()
        if self.tty:
            self.out.write("\r" + line.ljust(len(self.last_line)))
            self.out.flush()
        elif line != self.last_line and now - self.last_print >= 5:
            self.out.write(line + "\n")
            self.out.flush()
            self.last_print = now
        self.last_line = line

    def _line(self, record: api.StageStatus) -> str:
        total = record.total_steps or 0
        first = self.started.setdefault(record.name, (time.monotonic(), record.step))
        filled = int(self.WIDTH * record.step / total) if total else 0
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        metric = next((f"{k} {record.metrics[k]:.4g}" for k in ("loss", "reward/total", "reward") if k in record.metrics), "")
        eta = ""
        done = record.step - first[1]
        if total and done > 0:
            remaining = (time.monotonic() - first[0]) / done * (total - record.step)
            eta = f"ETA {int(remaining) // 60}:{int(remaining) % 60:02d}"
        return f"{record.name:<10} [{bar}] {record.step}/{total or '?'} {metric} {eta}".rstrip()

    def _clear(self) -> None:
        if self.tty and self.last_line:
            self.out.write("\r" + " " * len(self.last_line) + "\r")

    def finish(self) -> None:
        if self.tty and self.last_line:
            self.out.write("\n")
            self.out.flush()


def resource_yaml(training: api.MedMOTraining, status: api.MedMOTrainingStatus) -> str:
    """The run as `kubectl get mmt NAME -o yaml` shows it."""
    obj: dict[str, Any] = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": training.metadata.model_dump(exclude_none=True),
        "spec": training.spec.to_wire(),
        "status": json.loads(status.model_dump_json(by_alias=True, exclude_none=True)),
    }
    return yaml.safe_dump(obj, sort_keys=False)


def run_locally(training: api.MedMOTraining, workdir: Path, out: TextIO = sys.stdout) -> api.MedMOTrainingStatus:
    """`medmo run`: runs with Ctrl-C stopping every process cleanly; returns the final status."""
    local = LocalRun(training, workdir, out=out)

    def interrupt(signum, frame):
        out.write("\ninterrupted: stopping every process; run the same command again to resume\n")
        local.stop()

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        return local.execute()
    finally:
        signal.signal(signal.SIGINT, previous)
