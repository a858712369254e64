"""The model initializer before the first stage: planned, rendered and validated without a cluster."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from medmo_cases import load_sample
from pydantic import ValidationError

from medmo_operator import api, render
from medmo_operator.api import Phase
from medmo_operator.plan import EnsureModelInitializer, EnsureStage, JobObservation, Observed, SuspendJob, plan
from medmo_trainer.exit_codes import ExitCode

T0 = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
RUN = render.RunRef(name="medmo-tiny", namespace="ns", uid="uid-1")
ENDPOINTS = render.OperatorEndpoints(progress_url="http://operator:8080", token_key=b"k" * 32)
STORED = "file:///tmp/medmo/runs/medmo-tiny/base_model"


def _spec(**model) -> api.MedMOTrainingSpec:
    obj = load_sample("medmo-tiny.yaml")
    obj["spec"]["model"] = {"base": "org/tiny-vl", **model}
    return api.parse_training(obj).spec


def _initializer(**kw) -> JobObservation:
    return JobObservation(name="medmo-tiny-model-initializer", attempt=0, **kw)


def _condition(status, kind):
    return next((c for c in status.conditions if c.type == kind), None)


def test_a_hub_model_is_fetched_once_before_the_first_stage_which_then_loads_the_stored_copy():
    spec = _spec()

    first = plan(spec, None, Observed(), T0)
    again = plan(spec, first.status, Observed(initializer=_initializer(active=1)), T0 + timedelta(seconds=5))
    done = plan(spec, again.status, Observed(initializer=_initializer(complete=True, succeeded=1, termination_message="OK: copied")),
                T0 + timedelta(seconds=10))

    assert EnsureModelInitializer() in first.actions and not any(isinstance(a, EnsureStage) for a in first.actions)
    record = first.status.initializers[0]
    assert (record.name, record.phase, record.output) == ("model-initializer", Phase.RUNNING, STORED)
    assert _condition(first.status, "Running").reason == "Initializing"
    assert not any(isinstance(a, EnsureModelInitializer | EnsureStage) for a in again.actions)
    assert EnsureStage("align", 0) in done.actions and EnsureModelInitializer() not in done.actions
    assert (done.status.initializers[0].phase, done.status.initializers[0].message) == (Phase.SUCCEEDED, "OK: copied")
    assert done.status.current_stage == "align"
    assert render.build_stage_config(RUN, spec, spec.stages[0]).model.base == STORED


def test_a_run_whose_base_is_not_a_hub_id_has_no_initializer():
    spec = api.parse_training(load_sample("medmo-tiny.yaml")).spec

    result = plan(spec, None, Observed(), T0)

    assert EnsureStage("align", 0) in result.actions and EnsureModelInitializer() not in result.actions
    assert result.status.initializers == []


@pytest.mark.parametrize(("code", "reason"), [(ExitCode.MODEL_ACCESS_DENIED, "ModelAccessDenied"),
                                              (ExitCode.MODEL_INVALID, "ModelNotFound")])
def test_a_refused_or_missing_model_fails_the_run_at_once_naming_the_model_and_the_answer(code, reason):
    spec = _spec()
    started = plan(spec, None, Observed(), T0).status
    message = f"{code.name} (exit {int(code)}): model 'org/tiny-vl' ... the hub answered 401"
    failed = _initializer(failed=1, failed_condition=True, failure_reason="PodFailurePolicy", exit_code=int(code),
                          termination_message=message)

    result = plan(spec, started, Observed(initializer=failed), T0 + timedelta(seconds=5))

    assert result.status.phase == Phase.FAILED
    condition = _condition(result.status, "Failed")
    assert condition.reason == reason and "'org/tiny-vl'" in condition.message and "answered 401" in condition.message
    assert result.status.initializers[0].phase == Phase.FAILED
    assert not any(isinstance(a, EnsureStage | EnsureModelInitializer) for a in result.actions)


def test_suspending_while_the_model_downloads_suspends_the_initializer_and_resuming_lets_it_go():
    spec = _spec()
    started = plan(spec, None, Observed(), T0).status
    suspended_spec = spec.model_copy(update={"run_policy": spec.run_policy.model_copy(update={"suspend": True})})

    suspended = plan(suspended_spec, started, Observed(initializer=_initializer(active=1)), T0 + timedelta(seconds=5))
    resumed = plan(spec, suspended.status, Observed(initializer=_initializer(suspended=True)), T0 + timedelta(seconds=10))

    assert SuspendJob("medmo-tiny-model-initializer", True) in suspended.actions
    assert SuspendJob("medmo-tiny-model-initializer", False) in resumed.actions
    assert resumed.status.phase == Phase.RUNNING and not any(isinstance(a, EnsureStage) for a in resumed.actions)


def test_only_the_initializer_gets_the_token_by_secret_reference_and_every_pod_the_runs_hub():
    spec = _spec(revision="v1", tokenSecretRef={"name": "hf-token"}, hubEndpoint="https://hub.example")
    job = render.build_model_initializer_job(RUN, spec)
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    learner = render.build_learner_job(RUN, spec, spec.stages[0], 0, ENDPOINTS)
    learner_env = {e["name"]: e for e in learner["spec"]["template"]["spec"]["containers"][0]["env"]}

    assert container["command"] == ["python", "-m", "medmo_trainer.fetch"]
    assert container["args"] == ["--model", "org/tiny-vl", "--to", STORED, "--revision", "v1"]
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}}
    assert env["HF_ENDPOINT"]["value"] == learner_env["HF_ENDPOINT"]["value"] == "https://hub.example"
    assert "HF_TOKEN" not in learner_env
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert ExitCode.MODEL_ACCESS_DENIED in rules[0]["onExitCodes"]["values"] and rules[0]["action"] == "FailJob"
    assert job["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize(("model", "field"), [
    ({"base": "preset:tiny-qwen3-vl", "tokenSecretRef": {"name": "hf"}}, "tokenSecretRef"),
    ({"base": "s3://bucket/model", "revision": "v1"}, "revision"),
    ({"base": "org/name/extra"}, "base"),
])
def test_hub_settings_without_a_hub_id_or_a_malformed_id_are_rejected_naming_the_field(model, field):
    obj = load_sample("medmo-tiny.yaml")
    obj["spec"]["model"] = model

    with pytest.raises(ValidationError) as error:
        api.parse_training(obj)

    assert field in api.format_validation_error(error.value)
