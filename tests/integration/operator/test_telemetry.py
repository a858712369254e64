"""OpenTelemetry for real: a run with `spec.telemetry` sends its traces and metrics, through the
OTEL_* environment the operator renders, to a real OpenTelemetry Collector (tests/otelcol: built
from Go modules, OTLP/HTTP receiver behind bearer-token auth, file exporter), and so does the
operator for its reconciles. The collector's token reaches the pods only from a Secret, by
secretKeyRef: without it the collector refuses the export.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from medmo_cases import REPO, load_sample, shrink_stages
from polling import wait_for

from integration.operator.conftest import OperatorProcess, _service_account_kubeconfig

pytestmark = [pytest.mark.slow, pytest.mark.controlplane]

RUN = "traced"
SECRET = "otel-headers"
STEPS = 2
STAGE_TYPES = {"align": "pretrain", "ground": "sft", "grpo": "rl", "bench": "eval"}
RUN_TIMEOUT_S = 1200


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Collector:
    """The OpenTelemetry Collector as a child process, writing what it receives to JSON-lines files."""

    def __init__(self, workdir: Path):
        self.binary = subprocess.run([str(REPO / "tests" / "otelcol" / "build.sh")], check=True,
                                     capture_output=True, text=True).stdout.strip()
        self.token = secrets.token_hex(16)
        self.endpoint = f"http://127.0.0.1:{_free_port()}"
        self.traces, self.metrics, self.log = workdir / "traces.jsonl", workdir / "metrics.jsonl", workdir / "otelcol.log"
        config = {
            "extensions": {"bearertokenauth": {"scheme": "Bearer", "token": self.token}},
            "receivers": {"otlp": {"protocols": {"http": {
                "endpoint": self.endpoint.removeprefix("http://"), "auth": {"authenticator": "bearertokenauth"}}}}},
            "exporters": {"file/traces": {"path": str(self.traces)}, "file/metrics": {"path": str(self.metrics)}},
            "service": {
                "extensions": ["bearertokenauth"],
                "telemetry": {"metrics": {"level": "none"}},
                "pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["file/traces"]},
                              "metrics": {"receivers": ["otlp"], "exporters": ["file/metrics"]}},
            },
        }
        (workdir / "otelcol.yaml").write_text(yaml.safe_dump(config))
        self.process = subprocess.Popen([self.binary, f"--config=file:{workdir / 'otelcol.yaml'}"],
                                        stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._listening, 60, f"the collector to listen on {self.endpoint}", interval_s=0.2)

    def _listening(self) -> bool:
        assert self.process.poll() is None, f"the collector exited: {self.log.read_text()[-3000:]}"
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", int(self.endpoint.rsplit(":", 1)[1]))) == 0

    @property
    def headers(self) -> str:
        """OTEL_EXPORTER_OTLP_HEADERS with the collector's token (values percent-encoded)."""
        return f"authorization=Bearer%20{self.token}"

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # it flushes its file exporters on the way out
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _attributes(items: list[dict]) -> dict:
    return {a["key"]: next(iter(a["value"].values()), None) for a in items}


def _spans(collector: Collector) -> list[dict]:
    """Every span received, with its resource's attributes under `resource`."""
    spans = []
    for request in _lines(collector.traces):
        for resource_spans in request.get("resourceSpans", []):
            resource = _attributes(resource_spans.get("resource", {}).get("attributes", []))
            for scope in resource_spans.get("scopeSpans", []):
                spans += [{**span, "resource": resource, "attributes": _attributes(span.get("attributes", []))}
                          for span in scope.get("spans", [])]
    return spans


def _metric_names_by_stage(collector: Collector) -> dict[str, set[str]]:
    names: dict[str, set[str]] = {}
    for request in _lines(collector.metrics):
        for resource_metrics in request.get("resourceMetrics", []):
            resource = _attributes(resource_metrics.get("resource", {}).get("attributes", []))
            for scope in resource_metrics.get("scopeMetrics", []):
                names.setdefault(resource.get("medmo.stage"), set()).update(m["name"] for m in scope.get("metrics", []))
    return names


@pytest.fixture(scope="module")
def collector(tmp_path_factory):
    process = Collector(tmp_path_factory.mktemp("otelcol"))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def operator(control_plane, operator_ns, collector, tmp_path_factory):
    """The operator exporting its reconcile spans to the collector (the standard OTEL_* variables)."""
    workdir = tmp_path_factory.mktemp("operator")
    process = OperatorProcess(_service_account_kubeconfig(control_plane, workdir / "kubeconfig"), workdir)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SERVICE_NAME": "medmo-operator",
                            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
                            "OTEL_EXPORTER_OTLP_HEADERS": collector.headers}.items():
            patch.setenv(name, value)
        process.start()
    yield process
    process.stop()


def _recipe(storage: Path, collector: Collector) -> dict:
    """The tiny sample, one stage of each type, the fewest steps and records, telemetry on."""
    obj = load_sample("medmo-tiny.yaml")
    obj["metadata"]["name"] = RUN
    spec = obj["spec"]
    spec["storage"] = {"uri": f"file://{storage}"}
    spec["stages"] = [stage for stage in spec["stages"] if stage["name"] in STAGE_TYPES]
    shrink_stages(spec, STEPS, eval_samples=4)
    spec["telemetry"] = {"endpoint": collector.endpoint, "headersSecretRef": {"name": SECRET}, "samplingRatio": 1.0}
    return obj


@pytest.mark.timeout(RUN_TIMEOUT_S + 300)
def test_each_stage_is_one_trace_named_after_the_run_at_a_real_collector(
        control_plane, operator, collector, namespace, tmp_path):
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET}, "type": "Opaque",
              "stringData": {"headers": collector.headers}}
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(secret))
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(_recipe(tmp_path, collector)))
    control_plane.kubectl("wait", "--for=condition=Succeeded", f"--timeout={RUN_TIMEOUT_S}s", f"mmt/{RUN}", "-n", namespace)

    def stage_traces():
        roots = [s for s in _spans(collector) if s["name"] == "medmo.stage" and s["attributes"].get("medmo.run") == RUN]
        return len(roots) == len(STAGE_TYPES) and roots

    roots = wait_for(stage_traces, 60, "a medmo.stage span per stage at the collector", interval_s=1)
    spans = _spans(collector)
    assert sorted((r["attributes"]["medmo.stage"], r["attributes"]["medmo.stage.type"]) for r in roots) == sorted(STAGE_TYPES.items())
    assert len({r["traceId"] for r in roots}) == len(STAGE_TYPES), "each stage is a trace of its own"
    for root in roots:
        stage = root["attributes"]["medmo.stage"]
        assert not root.get("parentSpanId"), f"{stage}'s medmo.stage span is its trace's root"
        assert root["resource"]["service.name"] == "medmo-trainer" and root["resource"]["medmo.run"] == RUN
        steps = [s for s in spans if s["traceId"] == root["traceId"] and s["name"] == "medmo.step"]
        assert steps and all(s["attributes"]["medmo.run"] == RUN for s in steps), f"{stage} has no medmo.step spans"
        if STAGE_TYPES[stage] != "eval":
            assert len(steps) == STEPS, f"{stage}: {len(steps)} step spans"
    metrics = _metric_names_by_stage(collector)
    for stage, kind in STAGE_TYPES.items():
        expected = {"medmo.train.samples", "medmo.train.step.duration"} | ({"medmo.train.loss"} if kind != "eval" else set())
        assert expected <= metrics.get(stage, set()), f"{stage} ({kind}) metrics: {metrics.get(stage)}"
    reconciles = [s for s in spans if s["name"] == "medmo.reconcile" and s["attributes"].get("medmo.run") == RUN]
    assert reconciles and all(s["resource"]["service.name"] == "medmo-operator" for s in reconciles)

    # The collector's token came to the pods from the Secret only: never in the spec, status, Jobs' or operator's text.
    run = control_plane.kubectl("get", "mmt", RUN, "-n", namespace, "-o", "json").stdout
    jobs = control_plane.kubectl("get", "jobs", "-n", namespace, "-l", f"medmo.io/run={RUN}", "-o", "json").stdout
    assert collector.token not in run and collector.token not in jobs and collector.token not in operator.log.read_text()
    request = urllib.request.Request(f"{collector.endpoint}/v1/traces", data=b"{}", headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401, "the collector takes exports only with the Secret's token"
