"""What the operator reads off a stage's learner Job and its pods: a failure's exit code and message, or
the final step a finished stage's trainers wrote into their termination messages."""

from __future__ import annotations

from medmo_operator import observe, render
from medmo_trainer.progress import final_step, success_message


def _job(name: str = "r-align-0") -> dict:
    return {"metadata": {"name": name, "uid": "u1", "labels": {render.LABEL_ROLE: "learner", render.LABEL_STAGE: "align",
                                                             render.LABEL_ATTEMPT: "0"}},
            "status": {"succeeded": 2, "conditions": [{"type": "Complete", "status": "True"}]}}


def _pod(index: int, exit_code: int, message: str | None) -> dict:
    terminated = {"exitCode": exit_code, "finishedAt": f"2026-12-03T08:13:4{index}Z"}
    if message is not None:
        terminated["message"] = message
    return {"metadata": {"name": f"r-align-0-{index}-x", "labels": {"job-name": "r-align-0", render.LABEL_ROLE: "learner"}},
            "status": {"containerStatuses": [{"name": "trainer", "state": {"terminated": terminated}}]}}


def test_a_finished_stage_is_observed_with_its_trainers_success_message_the_furthest_step_first():
    pods = [_pod(0, 0, success_message(10, "10 steps", "s3://b/m") + "\n"), _pod(1, 0, success_message(9, "9 steps", "s3://b/m"))]
    observed = observe.latest_jobs([_job()], pods)["align"]
    assert observed.complete and observed.exit_code is None
    assert final_step(observed.termination_message) == 10


def test_a_failure_message_wins_over_a_success_one_and_pods_without_messages_give_none():
    pods = [_pod(0, 0, success_message(10, "10 steps", "s3://b/m")), _pod(1, 137, "rank 1 was killed")]
    observed = observe.latest_jobs([_job()], pods)["align"]
    assert (observed.exit_code, observed.termination_message) == (137, "rank 1 was killed")
    assert observe.latest_jobs([_job()], [_pod(0, 0, None)])["align"].termination_message is None
