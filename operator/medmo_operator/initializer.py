"""The model initializer, as the plan sees it: before a run's first stage, one Job
(`render.build_model_initializer_job`, running `python -m medmo_trainer.fetch`) downloads a Hugging
Face Hub model into the run's storage, and every pod of every stage loads that copy
(`render.base_model_uri`), as Kubeflow Trainer's model initializer does.

Its record is `status.initializers[]`, named `model-initializer` (as a TrainJob's `jobsStatus` names
its initializer); while it runs, the Running condition's reason is `Initializing`. The hub refusing
the model (401/403) or not having it (404) fails the run at once, with reason `ModelAccessDenied` or
`ModelNotFound` and the initializer's own message, which names the model and the hub's answer: those
exit codes fail its Job through its podFailurePolicy, with no retry. Other failures (the hub or the
storage unreachable) are first retried by the Job controller, up to runPolicy.backoffLimit.

Pure: `plan` calls `advance` and turns the answer into actions, events and conditions.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from medmo_operator import api, render
from medmo_operator.api import Phase
from medmo_trainer.exit_codes import ExitCode

if TYPE_CHECKING:
    from medmo_operator.plan import JobObservation

NAME = render.MODEL_INITIALIZER
FAILURE_REASONS = {ExitCode.MODEL_ACCESS_DENIED: "ModelAccessDenied", ExitCode.MODEL_INVALID: "ModelNotFound"}
"""Condition reason of the run's failure by the initializer's exit code; any other: ModelInitializationFailed."""


@dataclass(frozen=True)
class Step:
    """What the initializer needs from the plan now."""

    ready: bool = False
    """The model is in the run's storage, or the run needs no initializer: the stages may run."""
    ensure: bool = False
    """Its Job must exist (created if absent)."""
    started: bool = False
    """It starts now."""
    succeeded: bool = False
    """It finished now."""
    failure: str | None = None
    """The run fails, with this condition reason."""
    message: str = ""
    """For people: what it does, did, or why it failed."""


def advance(spec: api.MedMOTrainingSpec, status: api.MedMOTrainingStatus, job: JobObservation | None, now: datetime) -> Step:
    """Updates the initializer's record in `status` from its Job and says what the plan must do."""
    if not spec.model.from_hub:
        return Step(ready=True)
    record = _record(status, spec)
    if record.phase == Phase.SUCCEEDED:
        return Step(ready=True)
    doing = f"{NAME} is downloading model {spec.model.base!r} into {record.output}"
    if job is None:
        started = record.phase == Phase.PENDING
        record.phase = Phase.RUNNING
        record.start_time = record.start_time or now
        return Step(ensure=True, started=started, message=doing)
    if job.complete:
        record.phase = Phase.SUCCEEDED
        record.completion_time = now
        record.message = job.termination_message or f"model {spec.model.base!r} is in {record.output}"
        return Step(ready=True, succeeded=True, message=record.message)
    if job.failed_condition:
        record.phase = Phase.FAILED
        record.completion_time = now
        record.message = job.termination_message or job.failure_message or "its Job failed"
        reason = FAILURE_REASONS.get(job.exit_code, "ModelInitializationFailed")
        return Step(failure=reason, message=f"{NAME} could not fetch model {spec.model.base!r}: {record.message}")
    return Step(message=doing)


def _record(status: api.MedMOTrainingStatus, spec: api.MedMOTrainingSpec) -> api.InitializerStatus:
    record = next((r for r in status.initializers if r.name == NAME), None)
    if record is None:
        record = api.InitializerStatus(name=NAME, output=render.base_model_uri(spec))
        status.initializers.append(record)
    return record
