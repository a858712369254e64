"""The stage state machine: (spec, status, observed children, now) -> (actions, new status).

Pure functions, readable in one place. The kopf handlers observe the cluster, call `plan`, carry
out the actions and patch the status; `medmo run` does the same against local processes. Because
the decision depends only on the status and what is observed, a restarted operator carries on
where the last one stopped and never creates a child twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from medmo_operator import api, initializer, render
from medmo_operator.api import ConditionType, Phase
from medmo_trainer.exit_codes import NON_RETRYABLE
from medmo_trainer.progress import Progress, final_step

# -- what was observed ------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadObservation:
    """Kueue's Workload of a queued learner Job (scheduling.queueName), reduced to what the plan decides on."""

    name: str
    admitted: bool = False
    """Kueue admitted the Job: it unsuspends it (or has) and its pods may run."""
    active: bool = True
    """`spec.active`: false while the run is suspended (a deactivated Workload is never admitted)."""
    cluster_queue: str | None = None
    """The ClusterQueue whose quota it holds, once admitted."""
    pending_message: str | None = None
    """Why it waits, in Kueue's words (e.g. insufficient unused quota for nvidia.com/gpu)."""
    preemptions: int = 0
    """Times Kueue evicted it to make room for a higher-priority workload."""
    queue_position: int | None = None
    """While pending: its place in its LocalQueue, 1 for the next to be admitted (Kueue's order)."""
    queue_length: int | None = None
    """While pending: the workloads pending in that LocalQueue, this one included."""


@dataclass(frozen=True)
class JobObservation:
    """The learner Job of a stage's latest attempt, reduced to what the plan decides on."""

    name: str
    attempt: int
    active: int = 0
    succeeded: int = 0
    failed: int = 0
    complete: bool = False
    failed_condition: bool = False
    failure_reason: str | None = None
    """The Job's Failed condition reason: `PodFailurePolicy` for a non-retryable exit code."""
    failure_message: str | None = None
    exit_code: int | None = None
    """Exit code of the first failed trainer container, when one was seen."""
    termination_message: str | None = None
    """The trainer's one-line termination message, when one was seen."""
    suspended: bool = False
    workload: WorkloadObservation | None = None
    """Kueue's Workload of the Job, for a queued run once Kueue has made it."""


@dataclass(frozen=True)
class Observed:
    """Children and progress of one run, as seen now."""

    jobs: dict[str, JobObservation] = field(default_factory=dict)
    """Latest-attempt learner Job by stage name."""
    progress: dict[str, Progress] = field(default_factory=dict)
    """Latest progress report by stage name."""
    initializer: JobObservation | None = None
    """The run's model initializer Job, when there is one."""
    unschedulable: dict[str, str] = field(default_factory=dict)
    """By stage name: what its pods (learner, rollout, reward) that the scheduler cannot place are,
    and which resources they wait for; stages whose pods are all placed are absent."""


# -- what to do -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnsureStage:
    """Create (if absent) every child of a stage's attempt."""

    stage: str
    attempt: int


@dataclass(frozen=True)
class EnsureModelInitializer:
    """Create (if absent) the Job that downloads a hub model into the run's storage."""


@dataclass(frozen=True)
class DeleteJob:
    """Delete a learner Job and its pods (a failed attempt, or a finished stage's pods)."""

    name: str


@dataclass(frozen=True)
class SuspendJob:
    name: str
    suspend: bool


@dataclass(frozen=True)
class SetWorkloadActive:
    """Deactivate (suspend) or reactivate (resume) a queued Job's Kueue Workload: Kueue, not the
    operator, suspends and unsuspends the Jobs it manages."""

    name: str
    active: bool


@dataclass(frozen=True)
class DeleteWorkers:
    """Delete an RL stage's rollout and reward Deployments (and their Services)."""

    stage: str


@dataclass(frozen=True)
class DeleteRun:
    """ttlSecondsAfterFinished has passed: delete the resource (children are garbage-collected)."""


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event on the run."""

    reason: str
    message: str
    """For people (`kubectl describe`): names the stage too; code reads `stage`, never this."""
    warning: bool = False
    stage: str | None = None
    """The stage the event is about; None for events about the whole run."""


Action = EnsureStage | EnsureModelInitializer | DeleteJob | SuspendJob | SetWorkloadActive | DeleteWorkers | DeleteRun | Event


@dataclass
class Plan:
    """What to do now and the status to write. Time-based decisions (deadline, TTL, restart
    backoff) need no wake-up of their own: the caller plans every few seconds, and each plan
    compares against `now`."""

    actions: list[Action]
    status: api.MedMOTrainingStatus


# -- the state machine ------------------------------------------------------------------------


def plan(
    spec: api.MedMOTrainingSpec,
    status: api.MedMOTrainingStatus | None,
    observed: Observed,
    now: datetime,
    generation: int | None = None,
) -> Plan:
    """Decides the next actions and the new status of a run."""
    status = _with_stage_records(spec, status.model_copy(deep=True) if status else api.MedMOTrainingStatus())
    actions: list[Action] = []
    status.observed_generation = generation
    if not _condition(status, ConditionType.CREATED):
        _set_condition(status, ConditionType.CREATED, True, "RunCreated", f"{len(spec.stages)} stages", now)
        actions.append(Event("Created", f"run created with stages {', '.join(s.name for s in spec.stages)}"))
    if status.start_time is None:
        status.start_time = now

    if status.phase.finished:
        return _after_finish(spec, status, now, actions)

    _fold_progress(status, observed)

    if _deadline_passed(spec, status, now):
        stage = _current_stage(spec, status)
        if stage and stage.name in observed.jobs:
            actions.append(DeleteJob(observed.jobs[stage.name].name))
        deadline = spec.run_policy.active_deadline_seconds
        return _fail(
            status, now, actions, "DeadlineExceeded", f"the run exceeded activeDeadlineSeconds ({deadline}s)", stage.name if stage else None
        )

    if spec.run_policy.suspend:
        return _suspend(spec, status, observed, now, actions)
    resuming = status.phase == Phase.SUSPENDED
    if resuming:
        _set_condition(status, ConditionType.SUSPENDED, False, "Resumed", "the run was resumed", now)
        actions.append(Event("Resumed", "resuming from the last checkpoints"))
        status.phase = Phase.RUNNING
        # A stage suspended while restarting (its backoff, or its new attempt not yet running) goes
        # on restarting: the Restarting condition is cleared only once that attempt runs.
        restarting = (condition := _condition(status, ConditionType.RESTARTING)) is not None and condition.status == "True"
        for stage_status in status.stages:
            if stage_status.phase == Phase.SUSPENDED:
                stage_status.phase = Phase.RESTARTING if restarting else Phase.RUNNING

    waiting = _initialize_model(spec, status, observed, now, actions)
    if waiting is not None:
        return waiting

    # Advance through as many stages as the observations allow (a finished stage starts the next).
    while True:
        stage = _current_stage(spec, status)
        if stage is None:
            return _succeed(spec, status, now, actions)
        record = _record(status, stage.name)
        job = observed.jobs.get(stage.name)
        if job is not None and job.attempt < record.restarts:
            job = None  # the previous attempt's Job, not yet deleted
        elif job is not None and job.attempt > record.restarts:
            record.restarts = job.attempt  # a restart whose status patch was lost: the Job is the truth
        if job is None:
            _start_attempt_when_due(spec, status, record, stage, now, actions)
            break
        record.next_attempt_time = None  # the attempt exists: no backoff is pending
        if job.complete:
            _stage_succeeded(spec, status, record, stage, job, now, actions)
            continue
        if job.failed_condition:
            _stage_failed_attempt(spec, status, record, stage, job, now, actions)
            if status.phase == Phase.FAILED:
                return _after_finish(spec, status, now, actions)
            break
        if resuming:
            _resume_attempt(spec, stage, job, actions)
        _stage_running(status, record, stage, job, now, actions, observed.unschedulable.get(stage.name))
        if spec.scheduling.queue_name:
            _stage_queue(spec, status, stage, job, now, actions)
        break

    return Plan(actions, status)


def _initialize_model(spec, status, observed: Observed, now, actions) -> Plan | None:
    """Runs the model initializer before the first stage (see `medmo_operator.initializer`); returns
    the plan while the stages must wait, None once they may run."""
    step = initializer.advance(spec, status, observed.initializer, now)
    if step.succeeded:
        actions.append(Event("ModelInitialized", step.message))
    if step.ready:
        return None
    if step.failure:
        _fail(status, now, actions, step.failure, step.message, None)
        return _after_finish(spec, status, now, actions)
    if step.ensure:
        actions.append(EnsureModelInitializer())
    if step.started:
        actions.append(Event("ModelInitializing", step.message))
    if observed.initializer is not None and observed.initializer.suspended:
        actions.append(SuspendJob(observed.initializer.name, False))  # resumed after a suspension
    status.phase = Phase.RUNNING
    _set_condition(status, ConditionType.RUNNING, True, "Initializing", step.message, now)
    return Plan(actions, status)


def _with_stage_records(spec: api.MedMOTrainingSpec, status: api.MedMOTrainingStatus) -> api.MedMOTrainingStatus:
    """One record per spec stage, in spec order: new stages are Pending, removed Pending ones go."""
    existing = {record.name: record for record in status.stages}
    records = [existing.pop(stage.name, None) or api.StageStatus(name=stage.name) for stage in spec.stages]
    # Records of started stages that left the spec are kept (the API server refuses such edits,
    # but a record of work done is never thrown away).
    records += [record for record in existing.values() if record.phase != Phase.PENDING]
    status.stages = records
    return status


def _record(status: api.MedMOTrainingStatus, name: str) -> api.StageStatus:
    return next(record for record in status.stages if record.name == name)


def _current_stage(spec: api.MedMOTrainingSpec, status: api.MedMOTrainingStatus) -> api.Stage | None:
    for stage in spec.stages:
        if _record(status, stage.name).phase != Phase.SUCCEEDED:
            return stage
    return None


def restart_delay(policy: api.RunPolicy, restart: int) -> timedelta:
    """The wait before restart number `restart` (1 for the first): the base, doubled for each
    restart before it, capped (the Job controller's back-off, with the run's own base and cap)."""
    doublings = min(restart - 1, 32)  # past 32 doublings every base is over any cap
    return timedelta(seconds=min(policy.max_restart_backoff_seconds, policy.restart_backoff_seconds * 2**doublings))


def _start_attempt_when_due(spec, status, record, stage, now, actions) -> None:
    """Starts the stage's current attempt, unless it is a restart still waiting out its backoff."""
    if record.next_attempt_time is not None and now < record.next_attempt_time:
        status.phase = Phase.RESTARTING
        status.current_stage = stage.name
        status.current_step = record.step
        return  # the Restarting condition already says when (set when the attempt failed)
    record.next_attempt_time = None
    _start_attempt(spec, status, record, stage, now, actions)


def _start_attempt(spec, status, record, stage, now, actions) -> None:
    first = record.phase == Phase.PENDING
    actions.append(EnsureStage(stage.name, record.restarts))
    if first:
        record.phase = Phase.RUNNING
        record.start_time = record.start_time or now
        actions.append(Event("StageStarted", f"stage {stage.name} ({stage.type}) started", stage=stage.name))
    if record.phase == Phase.RESTARTING:
        where = record.last_checkpoint or "the start"
        _set_condition(status, ConditionType.RESTARTING, True, "GangRestart", f"stage {stage.name} restarts from {where} (restart {record.restarts})", now)
    status.phase = Phase.RESTARTING if record.phase == Phase.RESTARTING else Phase.RUNNING
    status.current_stage = stage.name
    status.current_step = record.step
    _set_condition(status, ConditionType.RUNNING, True, "StageRunning", f"stage {stage.name} is running", now)


def _resume_attempt(spec, stage, job: JobObservation, actions) -> None:
    """Suspension stopped the attempt's pods and deleted an rl stage's workers: every child of the
    attempt is ensured again (those still there are left as they are, names being deterministic),
    workers before the learner, and then the learner Job is let go: by unsuspending it, or, when
    Kueue manages it, by reactivating its Workload so that Kueue admits it again."""
    actions.append(EnsureStage(stage.name, job.attempt))
    if spec.scheduling.queue_name:
        if job.workload is not None and not job.workload.active:
            actions.append(SetWorkloadActive(job.workload.name, True))
    elif job.suspended:
        actions.append(SuspendJob(job.name, False))


def _stage_queue(spec, status, stage, job: JobObservation, now, actions) -> None:
    """The Admitted condition of a queued run's current stage: Queued (with Kueue's reason),
    Preempted (evicted for a higher-priority workload: the stage resumes from its last checkpoint
    when admitted again, and no restart is counted), or Admitted."""
    queue = spec.scheduling.queue_name
    workload = job.workload
    if workload is not None and workload.admitted:
        where = f" by ClusterQueue {workload.cluster_queue}" if workload.cluster_queue else ""
        if _set_condition(status, ConditionType.ADMITTED, True, "Admitted", f"stage {stage.name} admitted{where}", now):
            actions.append(Event("Admitted", f"stage {stage.name} admitted by Kueue{where}", stage=stage.name))
        return
    why = (workload.pending_message if workload else None) or "waiting for Kueue to admit it"
    if workload is not None and workload.queue_position is not None:
        queue = f"{queue} (position {workload.queue_position} of {workload.queue_length})"
    if workload is not None and workload.preemptions:
        reason, message = "Preempted", f"stage {stage.name} was preempted; queued in {queue} to resume from its last checkpoint: {why}"
    else:
        reason, message = "Queued", f"stage {stage.name} is queued in {queue}: {why}"
    current = _condition(status, ConditionType.ADMITTED)
    flipped = _set_condition(status, ConditionType.ADMITTED, False, reason, message, now)
    if flipped or (current is not None and current.reason != reason):
        actions.append(Event(reason, message, warning=reason == "Preempted", stage=stage.name))


def _stage_running(status, record, stage, job: JobObservation, now, actions, unschedulable: str | None) -> None:
    status.current_stage = stage.name
    status.current_step = record.step
    if job.active > 0 and record.phase == Phase.RESTARTING:
        record.phase = Phase.RUNNING
        _set_condition(status, ConditionType.RESTARTING, False, "Restarted", f"stage {stage.name} is running again", now)
    status.phase = Phase.RESTARTING if record.phase == Phase.RESTARTING else Phase.RUNNING
    if unschedulable:
        # The message follows what still waits (one of two pods placed); an Event only when waiting starts.
        if _set_condition(status, ConditionType.WAITING_FOR_RESOURCES, True, "Unschedulable", unschedulable, now):
            actions.append(Event("WaitingForResources", unschedulable, warning=True, stage=stage.name))
    elif _condition(status, ConditionType.WAITING_FOR_RESOURCES):
        _set_condition(status, ConditionType.WAITING_FOR_RESOURCES, False, "Scheduled", "all pods are scheduled", now)


def _stage_succeeded(spec, status, record, stage, job: JobObservation, now, actions) -> None:
    record.phase = Phase.SUCCEEDED
    record.completion_time = now
    record.message = job.termination_message or record.message
    if stage.trains:
        record.output_model = render.stage_output_uri(spec, stage)
    # The trainer's last reports may never have arrived (the operator was down when the stage ended):
    # its termination message states the final step.
    final = final_step(job.termination_message)
    if final is not None:
        record.step = max(record.step or 0, final)
        record.total_steps = record.total_steps or final
    if record.total_steps and record.step < record.total_steps:
        record.step = record.total_steps
    detail = f": {job.termination_message}" if job.termination_message else ""
    actions.append(Event("StageSucceeded", f"stage {stage.name} succeeded{detail}", stage=stage.name))
    # cleanPodPolicy: a finished Job has no running pods left, but an rl stage's workers still run.
    if spec.run_policy.clean_pod_policy == "All":
        actions.append(DeleteJob(job.name))
    if spec.run_policy.clean_pod_policy != "None" and stage.type == "rl":
        actions.append(DeleteWorkers(stage.name))


def _stage_failed_attempt(spec, status, record, stage, job: JobObservation, now, actions) -> None:
    reason_text = job.termination_message or job.failure_message or "the learner Job failed"
    non_retryable = job.failure_reason == "PodFailurePolicy" or (job.exit_code is not None and job.exit_code in NON_RETRYABLE)
    if non_retryable:
        record.phase = Phase.FAILED
        record.message = reason_text
        record.completion_time = now
        _fail(status, now, actions, "NonRetryableFailure", f"stage {stage.name} failed and cannot be retried: {reason_text}", stage.name)
        return
    if record.restarts >= spec.run_policy.backoff_limit:
        record.phase = Phase.FAILED
        record.message = reason_text
        record.completion_time = now
        _fail(
            status, now, actions, "BackoffLimitExceeded",
            f"stage {stage.name} failed {record.restarts + 1} times (backoffLimit {spec.run_policy.backoff_limit}): {reason_text}",
            stage.name,
        )
        return
    record.restarts += 1
    record.phase = Phase.RESTARTING
    delay = restart_delay(spec.run_policy, record.restarts)
    record.next_attempt_time = now + delay
    when = f"{record.next_attempt_time.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ} (backoff {delay.total_seconds():g}s)"
    record.message = f"restart {record.restarts} at {when}, after: {reason_text}"
    actions.append(DeleteJob(job.name))
    where = record.last_checkpoint or "the start"
    actions.append(
        Event(
            "StageRestarting",
            f"stage {stage.name} restarts from {where} at {when} (restart {record.restarts}): {reason_text}",
            warning=True,
            stage=stage.name,
        )
    )
    _set_condition(
        status, ConditionType.RESTARTING, True, "BackoffWaiting",
        f"stage {stage.name} failed; restart {record.restarts} of {spec.run_policy.backoff_limit} starts at {when}: {reason_text}", now,
    )
    _start_attempt_when_due(spec, status, record, stage, now, actions)


def _suspend(spec, status, observed: Observed, now, actions) -> Plan:
    model_initializer = observed.initializer
    if model_initializer is not None and not model_initializer.suspended and not model_initializer.complete:
        actions.append(SuspendJob(model_initializer.name, True))
    stage = _current_stage(spec, status)
    if stage is not None:
        record = _record(status, stage.name)
        job = observed.jobs.get(stage.name)
        if job is not None and spec.scheduling.queue_name:
            # Kueue would unsuspend an admitted Job: deactivating its Workload makes Kueue stop it.
            if job.workload is not None and job.workload.active:
                actions.append(SetWorkloadActive(job.workload.name, False))
        elif job is not None and not job.suspended:
            actions.append(SuspendJob(job.name, True))
        if stage.type == "rl":
            actions.append(DeleteWorkers(stage.name))
        if record.phase != Phase.PENDING:
            record.phase = Phase.SUSPENDED
    if status.phase != Phase.SUSPENDED:
        actions.append(Event("Suspended", "pods stopped; checkpoints are kept"))
    status.phase = Phase.SUSPENDED
    _set_condition(status, ConditionType.SUSPENDED, True, "Suspended", "runPolicy.suspend is true", now)
    _set_condition(status, ConditionType.RUNNING, False, "Suspended", "runPolicy.suspend is true", now)
    return Plan(actions, status)


def _succeed(spec, status, now, actions) -> Plan:
    status.phase = Phase.SUCCEEDED
    status.completion_time = now
    status.output_model = render.final_output_model(spec)
    status.current_stage = spec.stages[-1].name
    status.current_step = _record(status, spec.stages[-1].name).step
    _set_condition(status, ConditionType.RUNNING, False, "Succeeded", "every stage succeeded", now)
    _set_condition(status, ConditionType.SUCCEEDED, True, "Succeeded", f"every stage succeeded; model at {status.output_model}", now)
    actions.append(Event("Succeeded", f"every stage succeeded; model at {status.output_model}"))
    return _after_finish(spec, status, now, actions)


def _fail(status, now, actions, reason: str, message: str, stage: str | None) -> Plan:
    status.phase = Phase.FAILED
    status.completion_time = now
    for record in status.stages:
        if record.phase in (Phase.RUNNING, Phase.RESTARTING, Phase.SUSPENDED):
            record.phase = Phase.FAILED
            record.completion_time = now
    _set_condition(status, ConditionType.RUNNING, False, reason, message, now)
    if _condition(status, ConditionType.RESTARTING):
        _set_condition(status, ConditionType.RESTARTING, False, reason, message, now)
    _set_condition(status, ConditionType.FAILED, True, reason, message, now)
    actions.append(Event(reason, message, warning=True, stage=stage))
    return Plan(actions, status)


def _after_finish(spec, status, now, actions) -> Plan:
    """Clean-up of a finished run: worker Deployments per cleanPodPolicy, then the TTL."""
    if spec.run_policy.clean_pod_policy != "None":
        actions += [DeleteWorkers(stage.name) for stage in spec.stages if stage.type == "rl" and not _already(actions, stage.name)]
    ttl = spec.run_policy.ttl_seconds_after_finished
    if ttl is None or status.completion_time is None:
        return Plan(actions, status)
    if now >= status.completion_time + timedelta(seconds=ttl):
        actions.append(DeleteRun())
    return Plan(actions, status)


def _already(actions: list[Action], stage: str) -> bool:
    return any(isinstance(a, DeleteWorkers) and a.stage == stage for a in actions)


def _deadline_passed(spec, status, now) -> bool:
    deadline = spec.run_policy.active_deadline_seconds
    return deadline is not None and status.start_time is not None and now >= status.start_time + timedelta(seconds=deadline)


def _fold_progress(status: api.MedMOTrainingStatus, observed: Observed) -> None:
    for name, report in observed.progress.items():
        record = next((r for r in status.stages if r.name == name), None)
        if record is None or record.phase in (Phase.SUCCEEDED, Phase.FAILED, Phase.PENDING):
            continue
        record.step = report.step
        if report.total_steps is not None:
            record.total_steps = report.total_steps
        if report.last_checkpoint:
            record.last_checkpoint = report.last_checkpoint
        record.metrics = {**record.metrics, **report.metrics}
        record.counters = {**record.counters, **report.counters}


# -- conditions -------------------------------------------------------------------------------


def _condition(status: api.MedMOTrainingStatus, kind: ConditionType) -> api.Condition | None:
    return next((c for c in status.conditions if c.type == kind.value), None)


def _set_condition(
    status: api.MedMOTrainingStatus, kind: ConditionType, value: bool, reason: str, message: str, now: datetime
) -> bool:
    """Sets a condition; lastTransitionTime moves only when the status flips. Returns whether it flipped."""
    text = "True" if value else "False"
    current = _condition(status, kind)
    if current is None:
        status.conditions.append(api.Condition(type=kind.value, status=text, reason=reason, message=message, lastTransitionTime=now))
        return True
    flipped = current.status != text
    current.reason, current.message = reason, message
    if flipped:
        current.status, current.lastTransitionTime = text, now
    return flipped


def status_patch(status: api.MedMOTrainingStatus) -> dict[str, Any]:
    """The status as a merge patch body (camelCase). Unset fields are left out: the state machine
    only ever sets fields, and leaving them out keeps the patch equal to what the server stores."""
    body = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    body.pop("kopf", None)
    return body
