"""spec.telemetry becomes the learner pods' OTEL_* environment; the headers only by secretKeyRef."""

from __future__ import annotations

import pydantic
import pytest
from medmo_cases import load_sample

from medmo_operator import api, render

RUN = render.RunRef(name="medmo-8b", namespace="medmo", uid="uid-1")
ENDPOINTS = render.OperatorEndpoints(progress_url="http://medmo-operator.medmo-system:8080", token_key=b"k" * 32)


def _learner_env(telemetry: dict | None) -> dict[str, dict]:
    obj = load_sample("medmo-run.yaml")
    if telemetry is not None:
        obj["spec"]["telemetry"] = telemetry
    spec = api.parse_training(obj).spec
    stage = next(s for s in spec.stages if s.type == "rl")
    job = render.build_learner_job(RUN, spec, stage, 0, ENDPOINTS)
    return {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_telemetry_renders_otlp_export_with_the_run_as_resource_attributes_and_headers_from_the_secret():
    env = _learner_env({"endpoint": "http://otel-collector.observability:4318", "samplingRatio": 0.25,
                        "headersSecretRef": {"name": "otel-auth", "key": "otlp-headers"}})

    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == "http://otel-collector.observability:4318"
    assert env["OTEL_TRACES_EXPORTER"]["value"] == env["OTEL_METRICS_EXPORTER"]["value"] == "otlp"
    assert (env["OTEL_TRACES_SAMPLER"]["value"], env["OTEL_TRACES_SAMPLER_ARG"]["value"]) == ("parentbased_traceidratio", "0.25")
    attributes = dict(pair.split("=") for pair in env["OTEL_RESOURCE_ATTRIBUTES"]["value"].split(","))
    assert attributes["medmo.run"] == "medmo-8b" and attributes["medmo.stage.type"] == "rl"
    assert env["OTEL_EXPORTER_OTLP_HEADERS"] == {
        "name": "OTEL_EXPORTER_OTLP_HEADERS", "valueFrom": {"secretKeyRef": {"name": "otel-auth", "key": "otlp-headers"}}}


def test_without_telemetry_no_otel_variable_is_set():
    assert not [name for name in _learner_env(None) if name.startswith("OTEL_")]


@pytest.mark.parametrize("telemetry, field", [
    ({"endpoint": "otel-collector:4318"}, "endpoint"),
    ({"endpoint": "http://c:4318", "samplingRatio": 1.5}, "samplingRatio"),
    ({"endpoint": "http://c:4318", "headers": "authorization=x"}, "headers"),
])
def test_bad_telemetry_is_refused_naming_the_field(telemetry, field):
    obj = load_sample("medmo-run.yaml")
    obj["spec"]["telemetry"] = telemetry
    with pytest.raises(pydantic.ValidationError) as error:
        api.parse_training(obj)
    assert f"spec.telemetry.{field}" in api.format_validation_error(error.value)
