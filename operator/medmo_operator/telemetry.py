"""The operator's metrics, through OpenTelemetry, served for Prometheus to scrape, and a span per
reconcile, exported as the standard OTEL_* variables say (`OTEL_TRACES_EXPORTER=otlp` and
`OTEL_EXPORTER_OTLP_ENDPOINT` on the operator's Deployment; unset, nothing is traced)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider

from medmo_operator.plan import Action, Event
from medmo_trainer.telemetry import tracer_provider_from_env

_meter = None
_tracer: trace.Tracer = trace.NoOpTracer()
_instruments: dict = {}


def setup(prometheus_port: int | None, host: str = "0.0.0.0") -> None:
    """Installs a meter provider; with a port, also a Prometheus endpoint at `/metrics`; and a tracer
    provider when OTEL_TRACES_EXPORTER asks for one."""
    global _meter, _tracer
    tracer_provider = tracer_provider_from_env()
    if tracer_provider is not None:
        trace.set_tracer_provider(tracer_provider)
        _tracer = tracer_provider.get_tracer("medmo_operator")
    readers = []
    if prometheus_port is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        start_http_server(port=prometheus_port, addr=host)
        readers.append(PrometheusMetricReader())
    metrics.set_meter_provider(MeterProvider(metric_readers=readers))
    _meter = metrics.get_meter("medmo_operator")
    _instruments.update(
        created=_meter.create_counter("medmo_runs_created", description="MedMOTraining runs created"),
        succeeded=_meter.create_counter("medmo_runs_succeeded", description="runs that succeeded"),
        failed=_meter.create_counter("medmo_runs_failed", description="runs that failed"),
        restarted=_meter.create_counter("medmo_stage_restarts", description="gang restarts of stages"),
        stage_duration=_meter.create_histogram("medmo_stage_duration", unit="s", description="wall time of finished stages"),
        reconcile=_meter.create_histogram("medmo_reconcile_latency", unit="s", description="time of one reconcile of one run"),
    )


def record_actions(actions: list[Action], stage_durations: dict[str, float]) -> None:
    """Counts what a reconcile decided: the plan's events say what happened."""
    if not _instruments:
        return
    counters = {"Created": "created", "Succeeded": "succeeded", "StageRestarting": "restarted"}
    for action in actions:
        if not isinstance(action, Event):
            continue
        if action.reason in counters:
            _instruments[counters[action.reason]].add(1)
        elif action.reason in ("NonRetryableFailure", "BackoffLimitExceeded", "DeadlineExceeded"):
            _instruments["failed"].add(1, {"reason": action.reason})
    for stage_type, seconds in stage_durations.items():
        _instruments["stage_duration"].record(seconds, {"stage_type": stage_type})


def record_reconcile(seconds: float) -> None:
    if _instruments:
        _instruments["reconcile"].record(seconds)


@contextmanager
def reconcile_span(namespace: str, name: str) -> Iterator[None]:
    """The span of one reconcile of one run (a trace of its own: reconciles are timer ticks)."""
    with _tracer.start_as_current_span("medmo.reconcile", attributes={"medmo.run": name, "medmo.namespace": namespace}):
        yield


def shutdown() -> None:
    """Exports the spans still buffered (the operator is stopping)."""
    provider = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()
