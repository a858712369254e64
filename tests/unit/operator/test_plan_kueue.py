"""Runs queued in Kueue (scheduling.queueName), without a cluster: what is rendered, what Kueue's
Workload reduces to, and what the state machine decides (Kueue alone unsuspends the Jobs it manages)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from medmo_cases import load_sample

from medmo_operator import api, observe, render
from medmo_operator.api import Phase
from medmo_operator.plan import (
    DeleteJob,
    EnsureStage,
    Event,
    JobObservation,
    Observed,
    SetWorkloadActive,
    SuspendJob,
    WorkloadObservation,
    plan,
)

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
RUN = render.RunRef(name="medmo-tiny", namespace="team", uid="uid-1")
ENDPOINTS = render.OperatorEndpoints(progress_url="http://medmo-operator.medmo-system:8080", token_key=b"k" * 32)
WORKLOAD = "job-medmo-tiny-align-0-1a2b3"


def _spec(suspend: bool = False, **scheduling) -> api.MedMOTrainingSpec:
    obj = load_sample("medmo-tiny.yaml")
    obj["spec"]["scheduling"] = {"queueName": "team-gpus", **scheduling}
    obj["spec"]["runPolicy"]["suspend"] = suspend
    return api.parse_training(obj).spec


def _job(**kw) -> JobObservation:
    return JobObservation(name="medmo-tiny-align-0", attempt=0, **kw)


def _admitted(status) -> api.Condition | None:
    return next((c for c in status.conditions if c.type == "Admitted"), None)


def _stage(spec, name):
    return next(s for s in spec.stages if s.name == name)


def test_queued_jobs_and_rl_workers_carry_the_queue_and_its_priority():
    spec = _spec(workloadPriorityClassName="research-high")
    job = render.build_learner_job(RUN, spec, spec.stages[0], 0, ENDPOINTS)
    workers = [c for c in render.build_stage_children(RUN, spec, _stage(spec, "grpo"), 0, ENDPOINTS) if c["kind"] == "Deployment"]

    assert job["spec"]["suspend"] is True
    assert len(workers) == 2
    for child in (job, *workers):
        assert child["metadata"]["labels"][render.KUEUE_QUEUE_LABEL] == "team-gpus"
        assert child["metadata"]["labels"][render.KUEUE_PRIORITY_LABEL] == "research-high"


def test_a_workload_priority_without_a_queue_is_refused():
    obj = load_sample("medmo-tiny.yaml")
    obj["spec"]["scheduling"] = {"workloadPriorityClassName": "research-high"}
    with pytest.raises(ValueError, match="needs scheduling.queueName"):
        api.parse_training(obj)


def test_kueues_workload_reduces_to_admission_queue_message_and_preemptions():
    pending = {
        "metadata": {"name": WORKLOAD, "labels": {observe.KUEUE_JOB_UID_LABEL: "job-uid"}},
        "spec": {"active": True, "queueName": "team-gpus"},
        "status": {
            "conditions": [
                {"type": "QuotaReserved", "status": "False", "reason": "Pending",
                 "message": "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in flavor gpu, 1 more needed"},
                {"type": "Evicted", "status": "True", "reason": "Preempted", "message": "Preempted to accommodate a workload"},
            ],
            "schedulingStats": {"evictions": [{"reason": "Preempted", "underlyingCause": "", "count": 1}]},
        },
    }
    admitted = {
        "metadata": {"name": WORKLOAD},
        "spec": {"active": False},
        "status": {"admission": {"clusterQueue": "gpus"}, "conditions": [
            {"type": "QuotaReserved", "status": "True", "reason": "QuotaReserved", "message": "Quota reserved in ClusterQueue gpus"},
            {"type": "Admitted", "status": "True", "reason": "Admitted", "message": "The workload is admitted"}]},
    }

    assert observe.observe_workload(pending) == WorkloadObservation(
        name=WORKLOAD, admitted=False, active=True, cluster_queue=None, preemptions=1, queue_position=1, queue_length=1,
        pending_message="couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in flavor gpu, 1 more needed")
    assert observe.observe_workload(admitted) == WorkloadObservation(name=WORKLOAD, admitted=True, active=False, cluster_queue="gpus")

    job = {"metadata": {"name": "medmo-tiny-align-0", "uid": "job-uid", "labels": {
        render.LABEL_ROLE: "learner", render.LABEL_STAGE: "align", render.LABEL_ATTEMPT: "0"}}, "spec": {"suspend": True}}
    assert observe.latest_jobs([job], [], [pending])["align"].workload.preemptions == 1
    assert observe.latest_jobs([job], [])["align"].workload is None


def _workload(name: str, created: str, priority: int = 0, queue: str = "team-gpus", *conditions: dict,
              active: bool = True) -> dict:
    return {"metadata": {"name": name, "uid": f"uid-{name}", "creationTimestamp": created},
            "spec": {"active": active, "queueName": queue, "priority": priority},
            "status": {"conditions": list(conditions)}}


def test_a_pending_workloads_queue_position_follows_kueues_order_priority_then_age():
    reserved = {"type": "QuotaReserved", "status": "True", "reason": "QuotaReserved"}
    finished = {"type": "Finished", "status": "True", "reason": "Succeeded"}
    mine = _workload("mine", "2026-12-03T10:00:05Z")
    namespace = [
        mine,
        _workload("older", "2026-12-03T10:00:01Z"),
        _workload("urgent", "2026-12-03T10:00:09Z", 100),  # younger, but of a higher priority
        _workload("younger", "2026-12-03T10:00:07Z"),
        _workload("running", "2026-12-03T09:00:00Z", 0, "team-gpus", reserved),  # holds quota: not waiting
        _workload("done", "2026-12-03T09:00:00Z", 0, "team-gpus", finished),
        _workload("suspended", "2026-12-03T09:00:00Z", active=False),  # deactivated: not waiting
        _workload("elsewhere", "2026-12-03T09:00:00Z", 0, "other-queue"),
        # evicted for a PodsReady timeout: queued again from the eviction time, behind mine
        _workload("timed-out", "2026-12-03T09:00:00Z", 0, "team-gpus",
                  {"type": "Evicted", "status": "True", "reason": "PodsReadyTimeout",
                   "lastTransitionTime": "2026-12-03T10:00:06Z"}),
        # preempted: keeps its creation time, ahead of mine
        _workload("preempted", "2026-12-03T09:30:00Z", 0, "team-gpus",
                  {"type": "Evicted", "status": "True", "reason": "Preempted", "lastTransitionTime": "2026-12-03T10:00:08Z"}),
    ]
    assert observe.queue_position(mine, namespace) == (4, 6)  # after urgent, preempted and older
    observed = observe.observe_workload(mine, namespace)
    assert (observed.queue_position, observed.queue_length) == (4, 6)
    assert observe.observe_workload(namespace[4], namespace).queue_position is None  # holding quota


def test_a_queued_stages_condition_says_its_position_in_the_queue():
    spec = _spec()
    status = plan(spec, None, Observed(), T0).status
    waiting = WorkloadObservation(WORKLOAD, pending_message="insufficient unused quota", queue_position=2, queue_length=3)
    queued = plan(spec, status, Observed(jobs={"align": _job(suspended=True, workload=waiting)}), T0)
    assert "queued in team-gpus (position 2 of 3): insufficient unused quota" in _admitted(queued.status).message


def test_a_queued_stage_shows_queued_with_kueues_reason_then_admitted_and_is_never_unsuspended_by_the_operator():
    spec = _spec()
    status = plan(spec, None, Observed(), T0).status
    quota = "insufficient unused quota for nvidia.com/gpu in flavor gpu, 1 more needed"

    queued = plan(spec, status, Observed(jobs={"align": _job(suspended=True, workload=WorkloadObservation(WORKLOAD, pending_message=quota))}), T0)
    condition = _admitted(queued.status)
    assert (condition.status, condition.reason) == ("False", "Queued")
    assert "team-gpus" in condition.message and quota in condition.message
    assert Event("Queued", condition.message, stage="align") in queued.actions
    assert not [a for a in queued.actions if isinstance(a, SuspendJob | SetWorkloadActive)]

    workload = WorkloadObservation(WORKLOAD, admitted=True, cluster_queue="gpus")
    admitted = plan(spec, queued.status, Observed(jobs={"align": _job(active=1, workload=workload)}), T0 + timedelta(seconds=30))
    condition = _admitted(admitted.status)
    assert (condition.status, condition.reason) == ("True", "Admitted")
    assert "ClusterQueue gpus" in condition.message
    assert any(isinstance(a, Event) and a.reason == "Admitted" for a in admitted.actions)


def test_a_preempted_stage_waits_to_be_readmitted_without_a_restart_or_a_failure():
    spec = _spec()
    status = plan(spec, None, Observed(), T0).status
    running = Observed(jobs={"align": _job(active=1, workload=WorkloadObservation(WORKLOAD, admitted=True))})
    status = plan(spec, status, running, T0).status

    # Kueue evicted the Workload and suspended the Job: its pods are gone, nothing failed.
    evicted = WorkloadObservation(WORKLOAD, preemptions=1, pending_message="insufficient unused quota")
    preempted = plan(spec, status, Observed(jobs={"align": _job(suspended=True, workload=evicted)}), T0 + timedelta(minutes=1))

    condition = _admitted(preempted.status)
    assert (condition.status, condition.reason) == ("False", "Preempted")
    assert "resume from its last checkpoint" in condition.message
    assert any(isinstance(a, Event) and a.reason == "Preempted" and a.warning for a in preempted.actions)
    assert not [a for a in preempted.actions if isinstance(a, DeleteJob | EnsureStage | SuspendJob | SetWorkloadActive)]
    record = preempted.status.stages[0]
    assert (record.restarts, record.phase, preempted.status.phase) == (0, Phase.RUNNING, Phase.RUNNING)

    readmitted = WorkloadObservation(WORKLOAD, admitted=True, preemptions=1)
    again = plan(spec, preempted.status, Observed(jobs={"align": _job(active=1, workload=readmitted)}), T0 + timedelta(minutes=2))
    assert _admitted(again.status).reason == "Admitted"
    assert again.status.stages[0].restarts == 0


def test_suspending_and_resuming_a_queued_run_goes_through_its_workload_never_the_job():
    spec = _spec()
    status = plan(spec, None, Observed(), T0).status
    running = Observed(jobs={"align": _job(active=1, workload=WorkloadObservation(WORKLOAD, admitted=True))})

    suspended = plan(_spec(suspend=True), status, running, T0)
    assert SetWorkloadActive(WORKLOAD, False) in suspended.actions
    assert not [a for a in suspended.actions if isinstance(a, SuspendJob)]
    assert suspended.status.phase == Phase.SUSPENDED

    paused = Observed(jobs={"align": _job(suspended=True, workload=WorkloadObservation(WORKLOAD, active=False))})
    assert not [a for a in plan(_spec(suspend=True), suspended.status, paused, T0).actions if isinstance(a, SetWorkloadActive)]

    resumed = plan(spec, suspended.status, paused, T0 + timedelta(minutes=1))
    assert SetWorkloadActive(WORKLOAD, True) in resumed.actions
    assert not [a for a in resumed.actions if isinstance(a, SuspendJob)]
    assert resumed.status.phase == Phase.RUNNING
