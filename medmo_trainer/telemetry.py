"""OpenTelemetry spans and metrics of rank 0: one trace per stage (a `medmo.stage` span with a
`medmo.step` span per step and a `medmo.checkpoint` span per save under it), for every stage type.

Configured only through the standard variables: `OTEL_TRACES_EXPORTER` (`otlp` when the OTLP
exporter package is installed, `console`, `none`), `OTEL_METRICS_EXPORTER` (`prometheus`, served on
`OTEL_EXPORTER_PROMETHEUS_HOST`:`OTEL_EXPORTER_PROMETHEUS_PORT`, default port 9464; `otlp`; `console`;
`none`), `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`, and the OTLP exporter's own
(`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_HEADERS`) and the sampler's (`OTEL_TRACES_SAMPLER`):
the operator sets them from `spec.telemetry`. With none of them set nothing is exported and the API's
no-op tracer and meter cost next to nothing.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import metrics, trace
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

logger = logging.getLogger(__name__)


class Telemetry:
    """Spans and metrics of one stage, named `medmo.step` and `medmo.checkpoint`."""

    def __init__(self, run: str, stage: str, enabled: bool) -> None:
        self.attributes = {"medmo.run": run, "medmo.stage": stage}
        tracer_provider = tracer_provider_from_env() if enabled else None
        meter_provider, self._metrics_server = _meter_provider() if enabled else (None, None)
        self._providers = [p for p in (tracer_provider, meter_provider) if p is not None]
        self.tracer = (tracer_provider or trace.NoOpTracerProvider()).get_tracer("medmo_trainer")
        meter = (meter_provider or metrics.NoOpMeterProvider()).get_meter("medmo_trainer")
        self.loss = meter.create_gauge("medmo.train.loss", description="Training loss of the last step")
        self.tokens = meter.create_counter("medmo.train.tokens", unit="{token}", description="Tokens trained on")
        self.samples = meter.create_counter("medmo.train.samples", unit="{sample}", description="Samples trained on")
        self.step_seconds = meter.create_histogram("medmo.train.step.duration", unit="s", description="Optimizer step time")

    @contextmanager
    def span(self, name: str, **attributes: object) -> Iterator[None]:
        with self.tracer.start_as_current_span(name, attributes={**self.attributes, **attributes}):
            yield

    def record_step(self, loss: float, tokens: int, samples: int, seconds: float) -> None:
        self.loss.set(loss, self.attributes)
        self.tokens.add(tokens, self.attributes)
        self.record_batch(samples, seconds)

    def record_batch(self, samples: int, seconds: float) -> None:
        """A step without a loss (an eval batch): its samples and its time."""
        self.samples.add(samples, self.attributes)
        self.step_seconds.record(seconds, self.attributes)

    def shutdown(self) -> None:
        for provider in self._providers:
            provider.shutdown()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()


def _exporter_name(variable: str) -> str:
    return os.environ.get(variable, "none").split(",")[0].strip().lower()


class _SystemRandomIds(RandomIdGenerator):
    """Trace and span ids from the OS's randomness. The SDK's default draws them from Python's
    `random`, which every stage seeds with its hyperparameters' seed: stages with one seed then got
    one trace id, and a stage's trace merged with another's."""

    _random = random.SystemRandom()

    def generate_span_id(self) -> int:
        return self._random.getrandbits(63) + 1  # never 0, the invalid id

    def generate_trace_id(self) -> int:
        return self._random.getrandbits(127) + 1


def tracer_provider_from_env():
    """A tracer provider exporting as `OTEL_TRACES_EXPORTER` says (None for `none`); the operator's too."""
    name = _exporter_name("OTEL_TRACES_EXPORTER")
    if name == "none":
        return None
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if name == "console":
        exporter = ConsoleSpanExporter()
    elif name == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            logger.warning("OTEL_TRACES_EXPORTER=otlp but opentelemetry-exporter-otlp is not installed; no traces")
            return None
        exporter = OTLPSpanExporter()
    else:
        logger.warning("OTEL_TRACES_EXPORTER=%s is not supported (otlp, console, none); no traces", name)
        return None
    provider = TracerProvider(id_generator=_SystemRandomIds())
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _meter_provider():
    """The meter provider, and the Prometheus HTTP server when metrics are scraped."""
    name = _exporter_name("OTEL_METRICS_EXPORTER")
    server = None
    if name == "none":
        return None, None
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader

    if name == "prometheus":
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        host = os.environ.get("OTEL_EXPORTER_PROMETHEUS_HOST", "0.0.0.0")
        server, _ = start_http_server(int(os.environ.get("OTEL_EXPORTER_PROMETHEUS_PORT", "9464")), addr=host)
        reader = PrometheusMetricReader()
    elif name == "console":
        reader = PeriodicExportingMetricReader(ConsoleMetricExporter())
    elif name == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        except ImportError:
            logger.warning("OTEL_METRICS_EXPORTER=otlp but opentelemetry-exporter-otlp is not installed; no metrics")
            return None, None
        reader = PeriodicExportingMetricReader(OTLPMetricExporter())
    else:
        logger.warning("OTEL_METRICS_EXPORTER=%s is not supported (prometheus, otlp, console, none)", name)
        return None, None
    return MeterProvider(metric_readers=[reader]), server
