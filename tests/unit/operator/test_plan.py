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
from medmo_trainer.progress import Progress

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
    assert EnsureStage("align", 1) in result.actions
    record = result.status.stages[0]
    assert (record.restarts, record.phase, record.step) == (1, Phase.RESTARTING, 12)
    assert result.status.phase == Phase.RESTARTING
    assert _condition(result.status, "Restarting").status == "True"

    running = plan(spec, result.status, Observed(jobs={"align": _job("align", attempt=1, active=1)}), T0 + timedelta(seconds=40))
    assert running.status.phase == Phase.RUNNING
    assert _condition(running.status, "Restarting").status == "False"


def test_the_old_attempts_job_lingering_does_not_start_a_third_attempt():
    spec = _spec()
    status = plan(spec, None, Observed(), T0).status
    failed = _job("align", failed_condition=True, exit_code=1)
    status = plan(spec, status, Observed(jobs={"align": failed}), T0).status

    result = plan(spec, status, Observed(jobs={"align": failed}), T0 + timedelta(seconds=1))

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


def test_unschedulable_pods_show_waiting_for_resources_until_scheduled():
    spec = _spec()
    status = plan(spec, None, Observed(), T0).status
    waiting = _job("align", unschedulable_message="pod x cannot be scheduled: 0/1 nodes have enough nvidia.com/gpu")

    result = plan(spec, status, Observed(jobs={"align": waiting}), T0)
    assert _condition(result.status, "WaitingForResources").status == "True"

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
