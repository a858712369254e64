"""Reduces the Jobs and Pods of a run, as the API returns them, to what `plan` decides on."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

from medmo_operator import render
from medmo_operator.plan import JobObservation, WorkloadObservation
from medmo_trainer.progress import final_step

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
    """The latest-attempt learner Job of each stage, with what its pods and its Kueue Workload say.

    `workloads` are Kueue's Workloads of the run's namespace (all of them: a pending one's place in
    its LocalQueue is counted among the others)."""
    pods_by_job = _pods_by_job(pods)
    workloads = list(workloads)
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
            observation = dataclasses.replace(observation, workload=observe_workload(workload, workloads))
        stage = labels[render.LABEL_STAGE]
        if stage not in latest or observation.attempt > latest[stage].attempt:
            latest[stage] = observation
    return latest


def observe_job(job: Obj, pods: list[Obj]) -> JobObservation:
    conditions = {c.get("type"): c for c in _get(job, "status", "conditions", default=[]) or []}
    failed = conditions.get("Failed", {})
    exit_code, message = first_failure(pods)
    if message is None:
        message = success_message(pods)
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
    )


def observe_workload(workload: Obj, neighbours: Iterable[Obj] = ()) -> WorkloadObservation:
    """Kueue's Workload (kueue.x-k8s.io/v1beta2) of a learner Job; `neighbours`, the namespace's
    Workloads, give a pending one its position in its LocalQueue."""
    conditions = {c.get("type"): c for c in _get(workload, "status", "conditions", default=[]) or []}
    evictions = _get(workload, "status", "schedulingStats", "evictions", default=[]) or []
    pending = conditions.get("QuotaReserved", {})
    position = queue_position(workload, neighbours) if _is_pending(workload) else None
    return WorkloadObservation(
        name=_get(workload, "metadata", "name"),
        admitted=conditions.get("Admitted", {}).get("status") == "True",
        active=_get(workload, "spec", "active", default=True) is not False,
        cluster_queue=_get(workload, "status", "admission", "clusterQueue"),
        pending_message=pending.get("message") if pending.get("status") == "False" else None,
        preemptions=sum(int(e.get("count", 0)) for e in evictions if e.get("reason") == "Preempted"),
        queue_position=position[0] if position else None,
        queue_length=position[1] if position else None,
    )


def _is_pending(workload: Obj) -> bool:
    """Waiting in its queue: active, not finished, and holding no quota."""
    conditions = {c.get("type"): c.get("status") for c in _get(workload, "status", "conditions", default=[]) or []}
    return (_get(workload, "spec", "active", default=True) is not False and conditions.get("Finished") != "True"
            and conditions.get("QuotaReserved") != "True" and conditions.get("Admitted") != "True")


def _queue_order(workload: Obj) -> tuple[int, str, str]:
    """Kueue's order within a ClusterQueue (its scheduler's comparison): higher priority first, then the
    earlier queue time, then the uid. The queue time is the creation time, except after an eviction
    for a PodsReady timeout or an admission check (then the eviction's); a preempted workload keeps
    its creation time, so it goes back ahead of younger ones of its priority."""
    evicted = next((c for c in _get(workload, "status", "conditions", default=[]) or []
                    if c.get("type") == "Evicted" and c.get("status") == "True"
                    and c.get("reason") in ("PodsReadyTimeout", "AdmissionCheck")), None)
    since = (evicted or {}).get("lastTransitionTime") or _get(workload, "metadata", "creationTimestamp", default="")
    return -int(_get(workload, "spec", "priority", default=0) or 0), since, _get(workload, "metadata", "uid", default="")


def queue_position(workload: Obj, neighbours: Iterable[Obj]) -> tuple[int, int]:
    """(position, pending workloads) of a pending Workload in its LocalQueue, 1 for the next to be
    admitted, by Kueue's queue order. Kueue itself reports positions only through its visibility API
    (an aggregated API server); this is the same order computed from the Workloads."""
    queue = _get(workload, "spec", "queueName")
    waiting = [w for w in neighbours if _get(w, "spec", "queueName") == queue and _is_pending(w)]
    if not any(_get(w, "metadata", "uid") == _get(workload, "metadata", "uid") for w in waiting):
        waiting.append(workload)
    mine = _queue_order(workload)
    return 1 + sum(1 for w in waiting if _queue_order(w) < mine), len(waiting)


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


def success_message(pods: list[Obj]) -> str | None:
    """The termination message of a trainer container that finished with exit code 0 (the final step
    is in it), the furthest one where several nodes wrote one; None when none has finished."""
    found = []
    for pod in pods:
        for container in _get(pod, "status", "containerStatuses", default=[]) or []:
            terminated = _get(container, "state", "terminated")
            if terminated and terminated.get("exitCode") == 0 and (terminated.get("message") or "").strip():
                found.append(terminated["message"].strip().splitlines()[-1])
    return max(found, key=lambda message: final_step(message) or -1, default=None)


_INSUFFICIENT = re.compile(r"Insufficient ([A-Za-z0-9./_-]*[A-Za-z0-9])")
"""How kube-scheduler names a resource no node has enough of (`2 Insufficient nvidia.com/gpu`)."""
_ROLE_ORDER = ("learner", *render.WORKER_ROLES)


def unschedulable_by_stage(pods: Iterable[Obj]) -> dict[str, str]:
    """By stage: how many of its pods (learner, rollout, reward) the scheduler cannot place, what
    each requests, which resources no node has enough of, and the scheduler's own words."""
    waiting: dict[str, list[Obj]] = {}
    for pod in pods:
        labels = _get(pod, "metadata", "labels", default={}) or {}
        if render.LABEL_STAGE in labels and _is_unschedulable(pod):
            waiting.setdefault(labels[render.LABEL_STAGE], []).append(pod)
    return {stage: _waiting_message(stage_pods) for stage, stage_pods in waiting.items()}


def _is_unschedulable(pod: Obj) -> bool:
    if _get(pod, "status", "phase") != "Pending" or _get(pod, "metadata", "deletionTimestamp"):
        return False
    return any(c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable"
               for c in _get(pod, "status", "conditions", default=[]) or [])


def _scheduler_message(pod: Obj) -> str:
    for condition in _get(pod, "status", "conditions", default=[]) or []:
        if condition.get("type") == "PodScheduled":
            return (condition.get("message") or "").strip()
    return ""


def pod_requests(pod: Obj) -> dict[str, str]:
    """What a pod asks the scheduler for: its containers' requests, a resource two containers both
    request written as `a+b`."""
    requests: dict[str, list[str]] = {}
    for container in _get(pod, "spec", "containers", default=[]) or []:
        for resource, quantity in (_get(container, "resources", "requests", default={}) or {}).items():
            requests.setdefault(resource, []).append(str(quantity))
    return {resource: "+".join(quantities) for resource, quantities in sorted(requests.items())}


def _waiting_message(pods: list[Obj]) -> str:
    by_role: dict[str, list[Obj]] = {}
    for pod in pods:
        by_role.setdefault(_get(pod, "metadata", "labels", render.LABEL_ROLE, default="other"), []).append(pod)
    roles = sorted(by_role, key=lambda r: _ROLE_ORDER.index(r) if r in _ROLE_ORDER else len(_ROLE_ORDER))
    groups = []
    for role in roles:
        requests = pod_requests(by_role[role][0])
        each = f" (each requests {', '.join(f'{k} {v}' for k, v in requests.items())})" if requests else ""
        groups.append(f"{len(by_role[role])} {role}{each}")
    messages = [_scheduler_message(pod) for pod in pods]
    short = sorted({resource for message in messages for resource in _INSUFFICIENT.findall(message)})
    plural = "s" if len(pods) > 1 else ""
    text = f"{len(pods)} pod{plural} cannot be scheduled"
    if short:
        text += f", short of {', '.join(short)}"
    text += f": {'; '.join(groups)}"
    said = next((m for m in messages if m), "")
    return f"{text}. Scheduler: {said}" if said else text
