"""OpenTelemetry through the standard OTEL_* variables: nothing when unset, spans and metrics when set."""

from __future__ import annotations

import json
import random
import socket
import urllib.request

from medmo_trainer.telemetry import Telemetry


def test_console_traces_hold_step_and_checkpoint_spans(monkeypatch, capsys):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    telemetry = Telemetry("run-a", "sft", enabled=True)
    with telemetry.span("medmo.step", step=1):
        pass
    with telemetry.span("medmo.checkpoint", step=1):
        pass
    telemetry.shutdown()
    out = capsys.readouterr().out
    spans = json.loads("[" + out.replace("}\n{", "},{") + "]")
    assert [s["name"] for s in spans] == ["medmo.step", "medmo.checkpoint"]
    assert spans[0]["attributes"] == {"medmo.run": "run-a", "medmo.stage": "sft", "step": 1}


def test_prometheus_metrics_are_served_on_the_configured_port(monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_HOST", "127.0.0.1")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", str(port))
    telemetry = Telemetry("run-a", "sft", enabled=True)
    try:
        telemetry.record_step(loss=2.5, tokens=300, samples=8, seconds=0.1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        telemetry.shutdown()
    samples = {line.split("{")[0]: line for line in text.splitlines() if line.startswith("medmo_")}
    assert samples["medmo_train_loss"].endswith(" 2.5") and 'medmo_run="run-a"' in samples["medmo_train_loss"]
    assert samples["medmo_train_tokens_total"].endswith(" 300.0")


def test_without_otel_variables_nothing_is_exported(monkeypatch, capsys):
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER"):
        monkeypatch.delenv(name, raising=False)
    telemetry = Telemetry("run-a", "sft", enabled=True)
    with telemetry.span("medmo.step", step=1):
        telemetry.record_step(loss=1.0, tokens=1, samples=1, seconds=0.1)
    telemetry.shutdown()
    assert telemetry._providers == [] and capsys.readouterr().out == ""


def test_stages_seeded_alike_are_traces_of_their_own(monkeypatch):
    """Every stage seeds Python's `random` with its seed; trace ids must not follow it."""
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    trace_ids = set()
    for stage in ("align", "ground"):
        random.seed(42)
        telemetry = Telemetry("run-a", stage, enabled=True)
        with telemetry.tracer.start_as_current_span("medmo.stage") as span:
            trace_ids.add(span.get_span_context().trace_id)
        telemetry.shutdown()
    assert len(trace_ids) == 2
