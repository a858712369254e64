"""The stage state machine, driven with observations instead of a cluster."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from medmo_cases import load_sample

from medmo_operator import api
from medmo_operator.api import Phase
from medmo_operator.plan import (
    DeleteJob,
    DeleteRun,
    DeleteWorkers,
    EnsureStage,
    Event,
    JobObservation,
    Observed,
    SuspendJob,
    plan,
)
from medmo_trainer.progress import Progress, final_step, success_message

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def _spec(**run_policy) -> api.MedMOTrainingSpec:
    obj = load_sample("medmo-tiny.yaml")
    obj["spec"]["runPolicy"].update(run_policy)
    return api.parse_training(obj).spec


def _job(stage, attempt=0, **kw) -> JobObservation:
    return JobObservation(name=f"medmo-tiny-{stage}-{attempt}", attempt=attempt, **kw)


def _condition(status, kind):
    return next((c for c in status.conditions if c.type == kind), None)


def test_a_new_run_starts_its_first_stage():
    result = plan(_spec(), None, Observed(), T0)

    assert EnsureStage("align", 0) in result.actions
    assert result.status.phase == Phase.RUNNING
    assert result.status.current_stage == "align"
    assert [r.phase for r in result.status.stages] == [Phase.RUNNING] + [Phase.PENDING] * 4
    assert _condition(result.status, "Created").status == "True"


def test_planning_twice_on_the_same_observation_creates_nothing_new():
    spec = _spec()
    first = plan(spec, None, Observed(), T0)
    observed = Observed(jobs={"align": _job("align", active=1)})

    second = plan(spec, first.status, observed, T0 + timedelta(seconds=5))

    assert not [a for a in second.actions if isinstance(a, EnsureStage)]
    assert second.status.stages[0].phase == Phase.RUNNING


def test_a_stage_that_finished_while_no_report_arrived_reads_its_final_step_from_the_termination_message():
    # The operator was down while the stage ran its last steps and ended: no report of them ever came.
    spec = _spec()
    status = plan(spec, None, Observed(), T0).status
    message = success_message(10, "10 steps, final loss 5.9110", "s3://b/runs/medmo-tiny/align/model")
    finished = _job("align", complete=True, succeeded=1, termination_message=message)

    status = plan(spec, status, Observed(jobs={"align": finished}), T0 + timedelta(minutes=1)).status

    record = status.stages[0]
    assert (record.phase, record.step, record.total_steps) == (Phase.SUCCEEDED, 10, 10)
    assert record.message == message
    assert final_step("OK: model 'x' copied") is None and final_step(None) is None


def test_stages_run_in_order_to_success_with_the_final_model():
    spec = _spec()
    status = plan(spec, None, Observed(), T0).status
    jobs = {}
    for index, stage in enumerate(spec.stages):
        jobs[stage.name] = _job(stage.name, complete=True, succeeded=1)
        result = plan(spec, status, Observed(jobs=dict(jobs)), T0 + timedelta(minutes=index + 1))
        status = result.status
        if index + 1 < len(spec.stages):
            assert EnsureStage(spec.stages[index + 1].name, 0) in result.actions

    assert status.phase == Phase.SUCCEEDED
    assert all(r.phase == Phase.SUCCEEDED for r in status.stages)
    assert status.output_model == "file:///tmp/medmo/runs/medmo-tiny/grpo/model"
    assert _condition(status, "Succeeded").status == "True"
    assert DeleteWorkers("grpo") in result.actions or any(isinstance(a, DeleteWorkers) for a in result.actions)


def test_a_retryable_failure_restarts_the_stage_as_a_new_attempt_and_counts_it():
    spec = _spec()
    status = plan(spec, None, Observed(), T0).status
    progress = {"align": Progress(run="medmo-tiny", stage="align", step=12, total_steps=30, last_checkpoint="file:///c/step-10")}
    status = plan(spec, status, Observed(jobs={"align": _job("align", active=1)}, progress=progress), T0).status

    failed = _job("align", failed_condition=True, failure_reason="BackoffLimitExceeded", exit_code=137)
    result = plan(spec, status, Observed(jobs={"align": failed}), T0 + timedelta(seconds=30))

    assert DeleteJob("medmo-tiny-align-0") in result.actions
    record = result.status.stages[0]
    assert (record.restarts, record.phase, record.step) == (1, Phase.RESTARTING, 12)
    assert result.status.phase == Phase.RESTARTING
    assert _condition(result.status, "Restarting").status == "True"

    result = plan(spec, result.status, Observed(), T0 + timedelta(seconds=40))  # the default 10 s backoff has passed
    assert EnsureStage("align", 1) in result.actions

    running = plan(spec, result.status, Observed(jobs={"align": _job("align", attempt=1, active=1)}), T0 + timedelta(seconds=45))
    assert running.status.phase == Phase.RUNNING
    assert _condition(running.status, "Restarting").status == "False"


def test_the_old_attempts_job_lingering_does_not_start_a_third_attempt():
    spec = _spec()
    status = plan(spec, None, Observed(), T0).status
    failed = _job("align", failed_condition=True, exit_code=1)
    status = plan(spec, status, Observed(jobs={"align": failed}), T0).status

    result = plan(spec, status, Observed(jobs={"align": failed}), T0 + timedelta(seconds=10))

    assert [a for a in result.actions if isinstance(a, EnsureStage)] == [EnsureStage("align", 1)]
    assert result.status.stages[0].restarts == 1


def test_a_non_retryable_exit_fails_the_run_with_the_trainers_reason_and_no_retry():
    spec = _spec()
    status = plan(spec, None, Observed(), T0).status
    failed = _job("align", failed_condition=True, failure_reason="PodFailurePolicy", exit_code=3,
                  termination_message="dataset synthetic://x cannot be read: no such bucket")

    result = plan(spec, status, Observed(jobs={"align": failed}), T0)

    assert result.status.phase == Phase.FAILED
    assert not [a for a in result.actions if isinstance(a, EnsureStage)]
    assert "cannot be read" in _condition(result.status, "Failed").message
    assert _condition(result.status, "Failed").reason == "NonRetryableFailure"
    assert result.status.stages[0].restarts == 0


def test_events_name_their_stage_as_data():
    spec = _spec(backoffLimit=1)
    started = plan(spec, None, Observed(), T0)
    restarted = plan(spec, started.status, Observed(jobs={"align": _job("align", failed_condition=True, exit_code=1)}), T0)
    succeeded = plan(spec, restarted.status, Observed(jobs={"align": _job("align", 1, complete=True, succeeded=1)}), T0)
    failed = plan(spec, succeeded.status, Observed(jobs={"ground": _job("ground", failed_condition=True, exit_code=3)}), T0)

    events = [(a.reason, a.stage) for r in (started, restarted, succeeded, failed) for a in r.actions if isinstance(a, Event)]
    assert events == [
        ("Created", None),
        ("StageStarted", "align"),
        ("StageRestarting", "align"),
        ("StageSucceeded", "align"),
        ("StageStarted", "ground"),
        ("NonRetryableFailure", "ground"),
    ]


def test_backoff_limit_bounds_restarts():
    spec = _spec(backoffLimit=1)
    status = plan(spec, None, Observed(), T0).status
    status = plan(spec, status, Observed(jobs={"align": _job("align", failed_condition=True, exit_code=1)}), T0).status
    result = plan(spec, status, Observed(jobs={"align": _job("align", 1, failed_condition=True, exit_code=1)}), T0)

    assert result.status.phase == Phase.FAILED
    assert _condition(result.status, "Failed").reason == "BackoffLimitExceeded"


def _crash_loop(spec, failures: int) -> list[tuple[datetime, datetime]]:
    """Fails the first stage's attempts one after another, each as soon as it starts; returns for
    each failure when it failed and when its restart was created, checking nothing starts before."""
    status = plan(spec, None, Observed(), T0).status
    now, attempt, timeline = T0, 0, []
    for _ in range(failures):
        failed = Observed(jobs={"align": _job("align", attempt, failed_condition=True, exit_code=1)})
        result = plan(spec, status, failed, now)
        failed_at, attempt = now, attempt + 1
        while EnsureStage("align", attempt) not in result.actions:
            assert not [a for a in result.actions if isinstance(a, EnsureStage)]
            now += timedelta(seconds=1)
            result = plan(spec, result.status, Observed(), now)  # the failed Job is gone, nothing new yet
        timeline.append((failed_at, now))
        status = result.status
    return timeline


def test_restarts_wait_a_doubling_backoff_up_to_its_cap():
    spec = _spec(backoffLimit=6, restartBackoffSeconds=10, maxRestartBackoffSeconds=60)

    timeline = _crash_loop(spec, failures=6)

    assert [(started - failed).total_seconds() for failed, started in timeline] == [10, 20, 40, 60, 60, 60]


def test_a_zero_backoff_restarts_at_once():
    spec = _spec(restartBackoffSeconds=0)

    assert [(started - failed).total_seconds() for failed, started in _crash_loop(spec, failures=2)] == [0, 0]


def test_while_a_restart_backs_off_the_status_says_when_it_starts():
    spec = _spec(backoffLimit=3, restartBackoffSeconds=30)
    status = plan(spec, None, Observed(), T0).status
    failed = _job("align", failed_condition=True, exit_code=137, termination_message="rank 1 was killed")

    waiting = plan(spec, status, Observed(jobs={"align": failed}), T0 + timedelta(seconds=5))
    again = plan(spec, waiting.status, Observed(), T0 + timedelta(seconds=20))

    for result in (waiting, again):
        restarting = _condition(result.status, "Restarting")
        assert (restarting.status, restarting.reason) == ("True", "BackoffWaiting")
        assert "restart 1 of 3 starts at 2026-11-30T12:00:35Z (backoff 30s)" in restarting.message
        assert "rank 1 was killed" in restarting.message
        record = result.status.stages[0]
        assert record.next_attempt_time == T0 + timedelta(seconds=35)
        assert record.message == "restart 1 at 2026-11-30T12:00:35Z (backoff 30s), after: rank 1 was killed"
        assert (result.status.phase, result.status.current_stage) == (Phase.RESTARTING, "align")
    assert again.status == waiting.status  # nothing to write while waiting: no status patch per reconcile
    events = [a.message for a in waiting.actions if isinstance(a, Event)]
    assert events == ["stage align restarts from the start at 2026-11-30T12:00:35Z (backoff 30s) (restart 1): rank 1 was killed"]

    started = plan(spec, again.status, Observed(), T0 + timedelta(seconds=35))
    assert EnsureStage("align", 1) in started.actions
    assert _condition(started.status, "Restarting").reason == "GangRestart"
    assert started.status.stages[0].next_attempt_time is None
    running = plan(spec, started.status, Observed(jobs={"align": _job("align", 1, active=1)}), T0 + timedelta(seconds=40))
    assert (_condition(running.status, "Restarting").status, running.status.phase) == ("False", Phase.RUNNING)


def test_a_backoff_cap_below_its_base_is_refused_naming_both_fields():
    with pytest.raises(ValueError, match=r"maxRestartBackoffSeconds \(5\) must be at least restartBackoffSeconds \(10\)"):
        _spec(restartBackoffSeconds=10, maxRestartBackoffSeconds=5)


def test_suspend_stops_the_job_and_resume_continues_it():
    spec = _spec()
    status = plan(spec, None, Observed(), T0).status
    running = Observed(jobs={"align": _job("align", active=1)})

    suspended = plan(_spec(suspend=True), status, running, T0)
    assert SuspendJob("medmo-tiny-align-0", True) in suspended.actions
    assert suspended.status.phase == Phase.SUSPENDED
    assert _condition(suspended.status, "Suspended").status == "True"

    resumed = plan(spec, suspended.status, Observed(jobs={"align": _job("align", suspended=True)}), T0)
    assert SuspendJob("medmo-tiny-align-0", False) in resumed.actions
    assert resumed.status.phase == Phase.RUNNING
    assert _condition(resumed.status, "Suspended").status == "False"


def _running_rl_stage(spec):
    """A run whose stages before the rl stage `grpo` succeeded, with grpo's first attempt running."""
    status = plan(spec, None, Observed(), T0).status
    done = {s.name: _job(s.name, complete=True, succeeded=1) for s in spec.stages if s.name in ("align", "ground", "instruct")}
    status = plan(spec, status, Observed(jobs=done), T0).status
    assert status.current_stage == "grpo"
    return status, done


def test_resuming_a_suspended_rl_stage_brings_its_workers_back_in_the_same_attempt():
    spec = _spec()
    status, done = _running_rl_stage(spec)
    running = Observed(jobs={**done, "grpo": _job("grpo", active=1)})
    status = plan(spec, status, running, T0 + timedelta(minutes=1)).status

    suspended = plan(_spec(suspend=True), status, running, T0 + timedelta(minutes=2))
    assert DeleteWorkers("grpo") in suspended.actions
    assert SuspendJob("medmo-tiny-grpo-0", True) in suspended.actions

    paused = Observed(jobs={**done, "grpo": _job("grpo", suspended=True)})
    resumed = plan(spec, suspended.status, paused, T0 + timedelta(minutes=3))

    # The attempt's children (rollout and reward Deployments included) are ensured before the
    # learner is unsuspended, so its first step finds workers; the attempt is the same one.
    ensure, unsuspend = EnsureStage("grpo", 0), SuspendJob("medmo-tiny-grpo-0", False)
    assert ensure in resumed.actions and unsuspend in resumed.actions
    assert resumed.actions.index(ensure) < resumed.actions.index(unsuspend)
    assert not [a for a in resumed.actions if isinstance(a, DeleteJob | DeleteWorkers)]
    record = next(r for r in resumed.status.stages if r.name == "grpo")
    assert (record.restarts, record.phase, resumed.status.phase) == (0, Phase.RUNNING, Phase.RUNNING)
    assert _condition(resumed.status, "Restarting") is None

    again = plan(spec, resumed.status, Observed(jobs={**done, "grpo": _job("grpo", active=1)}), T0 + timedelta(minutes=4))
    assert not [a for a in again.actions if isinstance(a, EnsureStage | SuspendJob)]


def test_a_stage_suspended_during_its_restart_backoff_restarts_when_due_after_resuming():
    spec = _spec(restartBackoffSeconds=60)
    status = plan(spec, None, Observed(), T0).status
    status = plan(spec, status, Observed(jobs={"align": _job("align", failed_condition=True, exit_code=1)}), T0).status
    status = plan(_spec(restartBackoffSeconds=60, suspend=True), status, Observed(), T0 + timedelta(seconds=10)).status

    early = plan(spec, status, Observed(), T0 + timedelta(seconds=20))
    assert not [a for a in early.actions if isinstance(a, EnsureStage)]
    assert early.status.stages[0].phase == Phase.RESTARTING

    due = plan(spec, early.status, Observed(), T0 + timedelta(seconds=60))
    assert EnsureStage("align", 1) in due.actions
    running = plan(spec, due.status, Observed(jobs={"align": _job("align", 1, active=1)}), T0 + timedelta(seconds=65))
    assert _condition(running.status, "Restarting").status == "False"
    assert running.status.stages[0].restarts == 1


def test_unschedulable_pods_show_waiting_for_resources_until_scheduled():
    spec = _spec()
    status = plan(spec, None, Observed(), T0).status
    waiting = "1 pod cannot be scheduled, short of nvidia.com/gpu: 1 learner (each requests nvidia.com/gpu 8)"

    result = plan(spec, status, Observed(jobs={"align": _job("align")}, unschedulable={"align": waiting}), T0)
    assert _condition(result.status, "WaitingForResources").status == "True"
    assert _condition(result.status, "WaitingForResources").message == waiting

    result = plan(spec, result.status, Observed(jobs={"align": _job("align", active=1)}), T0)
    assert _condition(result.status, "WaitingForResources").status == "False"


def test_deadline_fails_the_run_and_stops_its_job():
    spec = _spec(activeDeadlineSeconds=60)
    status = plan(spec, None, Observed(), T0).status

    result = plan(spec, status, Observed(jobs={"align": _job("align", active=1)}), T0 + timedelta(seconds=61))

    assert result.status.phase == Phase.FAILED
    assert _condition(result.status, "Failed").reason == "DeadlineExceeded"
    assert DeleteJob("medmo-tiny-align-0") in result.actions


@pytest.mark.parametrize("elapsed, deleted", [(30, False), (121, True)])
def test_ttl_after_finished_deletes_the_run(elapsed, deleted):
    spec = _spec(ttlSecondsAfterFinished=120)
    status = plan(spec, None, Observed(), T0).status
    status = plan(spec, status, Observed(jobs={"align": _job("align", failed_condition=True, failure_reason="PodFailurePolicy", exit_code=2)}), T0).status

    result = plan(spec, status, Observed(), T0 + timedelta(seconds=elapsed))

    assert (DeleteRun() in result.actions) is deleted


def test_progress_is_folded_into_the_running_stage():
    spec = _spec()
    status = plan(spec, None, Observed(), T0).status
    progress = {"align": Progress(run="medmo-tiny", stage="align", step=7, total_steps=30, last_checkpoint="file:///x/step-5", metrics={"loss": 1.5})}

    result = plan(spec, status, Observed(jobs={"align": _job("align", active=1)}, progress=progress), T0)

    record = result.status.stages[0]
    assert (record.step, record.total_steps, record.last_checkpoint, record.metrics["loss"]) == (7, 30, "file:///x/step-5", 1.5)
    assert result.status.current_step == 7


def test_a_stage_added_to_the_spec_before_it_starts_is_planned():
    spec = _spec()
    status = plan(spec, None, Observed(), T0).status
    obj = load_sample("medmo-tiny.yaml")
    obj["spec"]["stages"].insert(4, {"name": "extra", "type": "sft", "datasets": [{"name": "d", "uri": "synthetic://train?n=8&seed=9"}]})
    edited = api.parse_training(obj).spec

    result = plan(edited, status, Observed(jobs={"align": _job("align", active=1)}), T0)

    assert [r.name for r in result.status.stages] == ["align", "ground", "instruct", "grpo", "extra", "bench"]
