"""Gang scheduling (scheduling.gang) rendered without a cluster: the Workload API's objects, and the
scheduler-plugins Coscheduling fallback.

The Workload API path also runs on the real control plane (tests/integration/operator/test_scheduling.py).
The Coscheduling path is tested here only: scheduler-plugins (sigs.k8s.io/scheduler-plugins) is not
among the Go modules the test control plane can build offline, so no scheduler there reads its PodGroup.
"""

from __future__ import annotations

import pytest
from medmo_cases import load_sample

from medmo_operator import api, execute, plan, render

RUN = render.RunRef(name="medmo-8b", namespace="medmo", uid="uid-1")
ENDPOINTS = render.OperatorEndpoints(progress_url="http://medmo-operator.medmo-system:8080", token_key=b"k" * 32)


def _spec(**scheduling) -> api.MedMOTrainingSpec:
    obj = load_sample("medmo-tiny.yaml")
    obj["spec"]["scheduling"] = scheduling
    obj["spec"]["stages"][0]["nodes"] = 4
    return api.parse_training(obj).spec


def _children(spec: api.MedMOTrainingSpec, attempt: int = 1) -> list[dict]:
    return render.build_stage_children(RUN, spec, spec.stages[0], attempt, ENDPOINTS)


def test_workload_api_gang_is_a_workload_and_pod_group_of_min_count_nodes_named_by_the_pods():
    spec = _spec(gang=True)
    children = _children(spec)
    kinds = [(c["apiVersion"], c["kind"]) for c in children]
    workload = next(c for c in children if c["kind"] == "Workload")
    pod_group = next(c for c in children if c["kind"] == "PodGroup")
    job = children[-1]
    stage = spec.stages[0].name

    # The API server admits a PodGroup only once its Workload exists; the Job's pods may come before either.
    assert kinds[-3:] == [("scheduling.k8s.io/v1alpha2", "Workload"), ("scheduling.k8s.io/v1alpha2", "PodGroup"), ("batch/v1", "Job")]
    (template,) = workload["spec"]["podGroupTemplates"]
    assert template["schedulingPolicy"] == {"gang": {"minCount": 4}}
    assert workload["spec"]["controllerRef"] == {"apiGroup": "batch", "kind": "Job", "name": job["metadata"]["name"]}
    assert pod_group["spec"]["podGroupTemplateRef"] == {
        "workload": {"workloadName": workload["metadata"]["name"], "podGroupTemplateName": template["name"]}}
    assert pod_group["spec"]["schedulingPolicy"] == {"gang": {"minCount": 4}}
    assert job["spec"]["template"]["spec"]["schedulingGroup"] == {"podGroupName": pod_group["metadata"]["name"]}
    assert pod_group["metadata"]["name"] == f"medmo-8b-{stage}-1"  # each attempt is a new gang
    assert render.POD_GROUP_LABEL not in job["spec"]["template"]["metadata"]["labels"]
    for child in (workload, pod_group):
        assert child["metadata"]["ownerReferences"] == [RUN.owner_reference()]


def test_coscheduling_gang_is_a_scheduler_plugins_pod_group_the_pods_name_by_label():
    spec = _spec(gang=True, gangScheduler="coscheduling", schedulerName="scheduler-plugins-scheduler")
    children = _children(spec, attempt=0)
    groups = [c for c in children if c["kind"] in ("PodGroup", "Workload")]
    job = children[-1]
    pod = job["spec"]["template"]

    assert [(g["apiVersion"], g["kind"]) for g in groups] == [("scheduling.x-k8s.io/v1alpha1", "PodGroup")]
    assert groups[0]["spec"] == {"minMember": 4}
    assert pod["metadata"]["labels"][render.POD_GROUP_LABEL] == groups[0]["metadata"]["name"] == job["metadata"]["name"]
    assert "schedulingGroup" not in pod["spec"]
    assert pod["spec"]["schedulerName"] == "scheduler-plugins-scheduler"


@pytest.mark.parametrize("scheduling", [{}, {"gang": False, "gangScheduler": "coscheduling"}])
def test_without_gang_there_is_no_pod_group(scheduling):
    job = _children(_spec(**scheduling))[-1]

    assert not [c for c in _children(_spec(**scheduling)) if c["kind"] in ("PodGroup", "Workload")]
    assert "schedulingGroup" not in job["spec"]["template"]["spec"]
    assert render.POD_GROUP_LABEL not in job["spec"]["template"]["metadata"]["labels"]
    assert "schedulerName" not in job["spec"]["template"]["spec"]


def test_an_unknown_gang_scheduler_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="gangScheduler"):
        _spec(gang=True, gangScheduler="volcano")


class RecordingExecutor:
    """Records what `execute.carry_out` asks of a cluster."""

    def __init__(self):
        self.deleted: list[tuple[str, str, str | None]] = []

    def delete(self, kind: str, name: str, api_version: str | None = None) -> None:
        self.deleted.append((kind, name, api_version))


@pytest.mark.parametrize("scheduling, gang_kinds", [
    ({"gang": True}, [("PodGroup", render.WORKLOAD_API_VERSION), ("Workload", render.WORKLOAD_API_VERSION)]),
    ({"gang": True, "gangScheduler": "coscheduling"}, [("PodGroup", render.COSCHEDULING_API_VERSION)]),
    ({}, []),
], ids=["workload-api", "coscheduling", "no-gang"])
def test_deleting_an_attempts_job_deletes_its_gang_too(scheduling, gang_kinds):
    """A restarted stage's old attempt leaves no gang behind: its Workload and PodGroup (named as its
    Job) go with the Job, so only the running attempt's gang exists."""
    spec = _spec(**scheduling)
    job = next(c for c in _children(spec) if c["kind"] == "Job")["metadata"]["name"]
    created = {(c["kind"], c["metadata"]["name"], c["apiVersion"]) for c in _children(spec) if c["kind"] in ("Workload", "PodGroup")}
    executor = RecordingExecutor()

    execute.carry_out([plan.DeleteJob(job)], RUN, spec, ENDPOINTS, executor)

    assert executor.deleted == [("Job", job, None)] + [(kind, job, version) for kind, version in gang_kinds]
    assert set(executor.deleted[1:]) == created  # exactly what the attempt made
