"""Carrying out a plan's actions: the one dispatch from actions to child objects, written once.

What an action means (which children a stage attempt has, which objects an rl stage's workers are)
is decided here from `render`; how an object is created or deleted is the executor's: the kopf
handlers create them in the cluster, `medmo run` runs them as local processes.
"""

from __future__ import annotations

from typing import Protocol

from medmo_operator import api, plan, render


class Executor(Protocol):
    """Where a run's children live."""

    def create(self, obj: dict) -> None:
        """Creates a child object unless one of that kind and name exists (names are deterministic)."""

    def delete(self, kind: str, name: str, api_version: str | None = None) -> None:
        """Deletes a child object (and what it owns, e.g. a Job's pods); absent is fine. `api_version`
        names the API of a kind outside the core ones (a gang's Workload or PodGroup)."""

    def suspend_job(self, name: str, suspend: bool) -> None:
        """Sets a learner Job's `spec.suspend`."""

    def set_workload_active(self, name: str, active: bool) -> None:
        """Sets a Kueue Workload's `spec.active` (false: Kueue stops its Job; true: Kueue queues it again)."""

    def delete_run(self) -> None:
        """Deletes the run itself (its TTL after finishing has passed)."""

    def emit(self, event: plan.Event) -> None:
        """Tells people what happened."""


def carry_out(
    actions: list[plan.Action],
    run: render.RunRef,
    spec: api.MedMOTrainingSpec,
    endpoints: render.OperatorEndpoints,
    executor: Executor,
) -> None:
    """Carries out a plan's actions, in order, through `executor`."""
    stages = {stage.name: stage for stage in spec.stages}
    for action in actions:
        match action:
            case plan.EnsureStage(stage=stage_name, attempt=attempt):
                for child in render.build_stage_children(run, spec, stages[stage_name], attempt, endpoints):
                    executor.create(child)
            case plan.EnsureModelInitializer():
                executor.create(render.build_model_initializer_job(run, spec))
            case plan.DeleteJob(name=job_name):
                executor.delete("Job", job_name)
                # the attempt's gang (scheduling.gang) shares the Job's name and goes with it
                for api_version, kind in render.gang_kinds(spec):
                    executor.delete(kind, job_name, api_version)
            case plan.SuspendJob(name=job_name, suspend=suspend):
                executor.suspend_job(job_name, suspend)
            case plan.SetWorkloadActive(name=workload, active=active):
                executor.set_workload_active(workload, active)
            case plan.DeleteWorkers(stage=stage_name):
                for role in render.WORKER_ROLES:
                    worker = render.worker_name(run, stages[stage_name], role)
                    executor.delete("Deployment", worker)
                    executor.delete("Service", worker)
                executor.delete("NetworkPolicy", render.worker_network_policy_name(run, stages[stage_name]))
            case plan.DeleteRun():
                executor.delete_run()
            case plan.Event():
                executor.emit(action)
