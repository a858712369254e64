"""Reduces the Jobs and Pods of a run, as the API returns them, to what `plan` decides on."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from medmo_operator import render
from medmo_operator.plan import JobObservation, WorkloadObservation

Obj = Mapping[str, Any]


def _get(obj: Obj, *path: str, default: Any = None) -> Any:
    node: Any = obj
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return default
        node = node[key]
    return node


def _pods_by_job(pods: Iterable[Obj]) -> dict[str, list[Obj]]:
    pods_by_job: dict[str, list[Obj]] = {}
    for pod in pods:
        job_name = _get(pod, "metadata", "labels", "batch.kubernetes.io/job-name") or _get(pod, "metadata", "labels", "job-name")
        if job_name:
            pods_by_job.setdefault(job_name, []).append(pod)
    return pods_by_job


def model_initializer_job(jobs: Iterable[Obj], pods: Iterable[Obj]) -> JobObservation | None:
    """The run's model initializer Job, with what its pods say; None while there is none."""
    for job in jobs:
        role = (_get(job, "metadata", "labels", default={}) or {}).get(render.LABEL_ROLE)
        if role == render.MODEL_INITIALIZER and not _get(job, "metadata", "deletionTimestamp"):
            return observe_job(job, _pods_by_job(pods).get(_get(job, "metadata", "name"), []))
    return None


KUEUE_JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
"""Kueue labels the Workload it makes for a Job with the Job's uid."""


def latest_jobs(jobs: Iterable[Obj], pods: Iterable[Obj], workloads: Iterable[Obj] = ()) -> dict[str, JobObservation]:
    """The latest-attempt learner Job of each stage, with what its pods and its Kueue Workload say."""
    pods_by_job = _pods_by_job(pods)
    workload_by_job_uid = {_get(w, "metadata", "labels", KUEUE_JOB_UID_LABEL): w for w in workloads}
    latest: dict[str, JobObservation] = {}
    for job in jobs:
        labels = _get(job, "metadata", "labels", default={}) or {}
        if labels.get(render.LABEL_ROLE) != "learner" or render.LABEL_STAGE not in labels:
            continue
        if _get(job, "metadata", "deletionTimestamp"):
            continue
        observation = observe_job(job, pods_by_job.get(_get(job, "metadata", "name"), []))
        workload = workload_by_job_uid.get(_get(job, "metadata", "uid"))
        if workload is not None:
            observation = dataclasses.replace(observation, workload=observe_workload(workload))
        stage = labels[render.LABEL_STAGE]
        if stage not in latest or observation.attempt > latest[stage].attempt:
            latest[stage] = observation
    return latest


def observe_job(job: Obj, pods: list[Obj]) -> JobObservation:
    conditions = {c.get("type"): c for c in _get(job, "status", "conditions", default=[]) or []}
    failed = conditions.get("Failed", {})
    exit_code, message = first_failure(pods)
    return JobObservation(
        name=_get(job, "metadata", "name"),
        attempt=int(_get(job, "metadata", "labels", render.LABEL_ATTEMPT, default="0")),
        active=int(_get(job, "status", "active", default=0) or 0),
        succeeded=int(_get(job, "status", "succeeded", default=0) or 0),
        failed=int(_get(job, "status", "failed", default=0) or 0),
        complete=conditions.get("Complete", {}).get("status") == "True",
        failed_condition=failed.get("status") == "True",
        failure_reason=failed.get("reason"),
        failure_message=failed.get("message"),
        exit_code=exit_code,
        termination_message=message,
        suspended=bool(_get(job, "spec", "suspend", default=False)),
        unschedulable_message=_unschedulable(pods),
    )


def observe_workload(workload: Obj) -> WorkloadObservation:
    """Kueue's Workload (kueue.x-k8s.io/v1beta2) of a learner Job."""
    conditions = {c.get("type"): c for c in _get(workload, "status", "conditions", default=[]) or []}
    evictions = _get(workload, "status", "schedulingStats", "evictions", default=[]) or []
    pending = conditions.get("QuotaReserved", {})
    return WorkloadObservation(
        name=_get(workload, "metadata", "name"),
        admitted=conditions.get("Admitted", {}).get("status") == "True",
        active=_get(workload, "spec", "active", default=True) is not False,
        cluster_queue=_get(workload, "status", "admission", "clusterQueue"),
        pending_message=pending.get("message") if pending.get("status") == "False" else None,
        preemptions=sum(int(e.get("count", 0)) for e in evictions if e.get("reason") == "Preempted"),
    )


def first_failure(pods: list[Obj]) -> tuple[int | None, str | None]:
    """Exit code and termination message of the earliest failed trainer container."""
    found: list[tuple[str, int, str | None]] = []
    for pod in pods:
        for container in _get(pod, "status", "containerStatuses", default=[]) or []:
            terminated = _get(container, "state", "terminated") or _get(container, "lastState", "terminated")
            if terminated and terminated.get("exitCode", 0) != 0:
                message = (terminated.get("message") or "").strip().splitlines()
                found.append((terminated.get("finishedAt") or "", int(terminated["exitCode"]), message[-1] if message else None))
    if not found:
        return None, None
    _, code, message = min(found, key=lambda item: item[0])
    return code, message


def _unschedulable(pods: list[Obj]) -> str | None:
    for pod in pods:
        if _get(pod, "status", "phase") != "Pending":
            continue
        for condition in _get(pod, "status", "conditions", default=[]) or []:
            if condition.get("type") == "PodScheduled" and condition.get("status") == "False" and condition.get("reason") == "Unschedulable":
                return f"pod {_get(pod, 'metadata', 'name')} cannot be scheduled: {condition.get('message', '')}".strip()
    return None
