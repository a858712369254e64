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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import yaml

from medmo_operator import api, observe, plan, render
from medmo_operator.execute import carry_out
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

    job: dict
    """The Job as rendered."""
    pods: list[RunningPod]
    failing: bool = False
    """A rank failed: the Job fails and its other ranks are being stopped."""

    @property
    def stage(self) -> str:
        return self.job["metadata"]["labels"][render.LABEL_STAGE]


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
        self.deployments: dict[str, list[RunningPod]] = {}
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
        endpoint = ProgressEndpoint(self.store, self.token_key, lambda ns, n: self.run.uid if (ns, n) == (NAMESPACE, self.name) else None)
        runner = loop.run_until_complete(endpoint.serve("127.0.0.1", 0))
        server.start()
        host, port = runner.addresses[0][:2]
        self.endpoints = render.OperatorEndpoints(f"http://{host}:{port}", self.token_key)
        if self.spec.storage.secret_ref:
            self._add_storage_secret()
        if self.spec.model.token_secret_ref:
            self._add_hub_token_secret()
        try:
            while not self._stop.is_set():
                result = plan.plan(self.spec, status, self._observe(), datetime.now(UTC), generation=1)
                carry_out(result.actions, self.run, self.spec, self.endpoints, self)
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
                        self.display.event(plan.Event("Resumed", f"from {where}", stage=job.stage))

    # -- what the Job controller would report ----------------------------------------------

    def _observe(self) -> plan.Observed:
        """The run's Jobs and pods as the API would show them, reduced the way the operator does."""
        jobs, pods = [], []
        for job in self.jobs.values():
            job_object, pod_objects = self._job_controller(job)
            jobs.append(job_object)
            pods += pod_objects
        return plan.Observed(jobs=observe.latest_jobs(jobs, pods), progress=self.store.latest(NAMESPACE, self.name),
                             initializer=observe.model_initializer_job(jobs, pods))

    def _job_controller(self, job: LocalJob) -> tuple[dict, list[dict]]:
        """A Job with the status its controller would give it, and its pods. One failed rank fails
        the Job (backoffLimit 0) and its other ranks are stopped, as the Job controller deletes a
        failed Job's active pods; a non-retryable exit code fails it through its podFailurePolicy."""
        pods = [{"metadata": pod.pod["metadata"], "status": pod.status()} for pod in job.pods]
        phases = [pod["status"]["phase"] for pod in pods]
        exit_code, message = observe.first_failure(pods)
        if exit_code is not None and not job.failing:
            job.failing = True
            for pod in job.pods:
                if pod.phase not in ("Succeeded", "Failed"):
                    threading.Thread(target=pod.stop, args=(STOP_GRACE_S,), daemon=True).start()
        status: dict[str, Any] = {
            "active": sum(p in ("Pending", "Running") for p in phases),
            "succeeded": phases.count("Succeeded"),
            "failed": phases.count("Failed"),
            "conditions": [],
        }
        if phases and all(p == "Succeeded" for p in phases):
            status["conditions"].append({"type": "Complete", "status": "True"})
        elif exit_code is not None and all(p in ("Succeeded", "Failed") for p in phases):
            reason = "PodFailurePolicy" if exit_code in NON_RETRYABLE else "BackoffLimitExceeded"
            status["conditions"].append({"type": "Failed", "status": "True", "reason": reason, "message": message})
        return {**job.job, "status": status}, pods

    # -- execute.Executor: the children as local objects and processes -----------------------

    def create(self, obj: dict) -> None:
        kind, name = obj["kind"], obj["metadata"]["name"]
        if kind in ("ConfigMap", "Secret"):
            self.objects.add(obj)
        elif kind == "Service":
            self.services[name] = obj
        elif kind == "Job" and name not in self.jobs:
            # No Kueue admits a queued Job here: it runs at once, and says so.
            job = {**obj, "spec": {**obj["spec"], "suspend": False}}
            self.jobs[name] = LocalJob(job, [self.runner.start(_indexed_pod(job, index)) for index in range(job["spec"]["completions"])])
        elif kind == "Deployment" and name not in self.deployments:
            self.deployments[name] = [self.runner.start(_replica_pod(obj, replica)) for replica in range(obj["spec"]["replicas"])]
        if kind in ("Job", "Deployment", "Service"):
            self.runner.refresh_hosts()

    def delete(self, kind: str, name: str, api_version: str | None = None) -> None:
        if kind == "Service":
            self.services.pop(name, None)
            return
        if kind == "Job":
            job = self.jobs.pop(name, None)
            pods = job.pods if job else []
        elif kind == "Deployment":
            pods = self.deployments.pop(name, [])
        else:
            return  # kinds this machine does not run (a NetworkPolicy): nothing to stop
        for pod in pods:
            self.runner.forget(pod.uid)

    def suspend_job(self, name: str, suspend: bool) -> None:
        """Suspension is a cluster feature: locally a signal stops the run and the same command resumes it."""

    def set_workload_active(self, name: str, active: bool) -> None:
        """Kueue is a cluster's: a local run has no Workloads (and never observes one to act on)."""

    def delete_run(self) -> None:
        """A TTL deletes a resource from a cluster; a local run's state stays for the report and reruns."""

    def emit(self, event: plan.Event) -> None:
        self.display.event(event)

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

    def _add_hub_token_secret(self) -> None:
        """Locally, the hub token Secret the spec names is made from this shell's HF_TOKEN."""
        ref = self.spec.model.token_secret_ref
        if not os.environ.get("HF_TOKEN"):
            raise SystemExit(f"model.tokenSecretRef {ref.name!r}: locally the token comes from HF_TOKEN in the environment; set it")
        self.objects.add({"kind": "Secret", "metadata": {"name": ref.name, "namespace": NAMESPACE},
                          "stringData": {ref.key: os.environ["HF_TOKEN"]}})

    def _dns_records(self, pod: RunningPod) -> list[tuple[str, list[str]]]:
        running = [p for job in self.jobs.values() for p in job.pods] + [p for pods in self.deployments.values() for p in pods]
        pods = [{"metadata": p.pod["metadata"], "spec": p.pod.get("spec", {}), "status": p.status()} for p in running]
        return network.dns_records(NAMESPACE, pods, list(self.services.values()))


def _pod_from_template(owner: dict, number: int) -> dict:
    """Pod `number` of a Job or Deployment, named as its controller names it, with a fresh uid."""
    pod = copy.deepcopy(owner["spec"]["template"])
    name = f"{owner['metadata']['name']}-{number}"
    pod.setdefault("metadata", {}).update(name=name, namespace=owner["metadata"]["namespace"], uid=f"{name}-{uuid.uuid4().hex[:8]}")
    return {"apiVersion": "v1", "kind": "Pod", **pod}


def _indexed_pod(job: dict, index: int) -> dict:
    """Pod `index` of an Indexed Job, with what the Job controller would add."""
    pod = _pod_from_template(job, index)
    meta = pod["metadata"]
    meta.setdefault("labels", {}).update({"batch.kubernetes.io/job-name": job["metadata"]["name"], "batch.kubernetes.io/job-completion-index": str(index)})
    meta.setdefault("annotations", {})[render.COMPLETION_INDEX_ANNOTATION] = str(index)
    pod["spec"]["hostname"] = meta["name"]
    for container in pod["spec"]["containers"]:
        container.setdefault("env", []).append({"name": "JOB_COMPLETION_INDEX", "value": str(index)})
    return pod


def _replica_pod(deployment: dict, replica: int) -> dict:
    pod = _pod_from_template(deployment, replica)
    pod["spec"].setdefault("restartPolicy", "Always")
    return pod


def _passed_through_env() -> dict[str, str]:
    """What this machine adds to every pod, as a node's runtime would: its accelerator, thread and BLAS
    settings and the GPUs it gives (caches and storage endpoints come from the spec)."""
    names = ("DS_ACCELERATOR", "OMP_NUM_THREADS", "HF_HUB_OFFLINE", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
             "CUDA_VISIBLE_DEVICES")
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


class ProgressDisplay:
    """One line per stage: a bar with step/total, the loss and (RL) the mean reward, and an ETA."""

    WIDTH = 24
    SHOWN_METRICS = (("loss", "loss"), ("reward/total", "reward"))
    """(status metric, label) shown after the bar when the stage reports it: an RL stage's loss alone
    says little (it can fall while rewards collapse), its mean reward says whether it is learning."""

    def __init__(self, out: TextIO):
        self.out = out
        self.tty = out.isatty() if hasattr(out, "isatty") else False
        self.last_line = ""
        self.last_print = 0.0
        self.started: dict[str, tuple[float, int]] = {}

    def event(self, event: plan.Event) -> None:
        self._clear()
        self.out.write(f"[{event.reason}] {event.message}\n")
        self.out.flush()
        if event.reason in ("StageRestarting", "Resumed"):
            # The attempt starts again from a checkpoint: its ETA is measured from there.
            self.started.pop(event.stage, None)

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
        metric = " ".join(f"{label} {record.metrics[key]:.4g}" for key, label in self.SHOWN_METRICS if key in record.metrics)
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


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Ctrl-C, `kill` or a CI timeout, and a closed terminal: each stops every pod of the run."""


@dataclass
class LocalOutcome:
    status: api.MedMOTrainingStatus | None
    interrupted_by: signal.Signals | None = None
    """The signal that stopped the run before it finished, if one did."""


def run_locally(training: api.MedMOTraining, workdir: Path, out: TextIO = sys.stdout) -> LocalOutcome:
    """`medmo run`: runs until the run finishes or one of `STOP_SIGNALS` arrives, which stops every
    process cleanly (the next run of the same command resumes)."""
    local = LocalRun(training, workdir, out=out)
    outcome = LocalOutcome(status=None)

    def interrupt(signum: int, frame: Any) -> None:
        local.stop()  # first: after SIGHUP the terminal may be gone and the write below fail
        outcome.interrupted_by = signal.Signals(signum)
        try:
            out.write(f"\ninterrupted ({outcome.interrupted_by.name}): stopping every process; run the same command again to resume\n")
            out.flush()
        except OSError:
            pass

    previous = {signum: signal.signal(signum, interrupt) for signum in STOP_SIGNALS}
    try:
        outcome.status = local.execute()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return outcome
