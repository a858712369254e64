"""The operator's metrics reach a Prometheus scrape (OpenTelemetry with the Prometheus reader)."""

from __future__ import annotations

import re
import socket
import urllib.request

from medmo_operator import telemetry
from medmo_operator.plan import Event


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_runs_restarts_failures_and_latency_are_scraped():
    port = _free_port()
    telemetry.setup(port, host="127.0.0.1")

    telemetry.record_actions([Event("Created", "run created"), Event("StageRestarting", "restart 1", warning=True)], {"sft": 12.5})
    telemetry.record_actions([Event("NonRetryableFailure", "exit 3", warning=True), Event("Succeeded", "done")], {})
    telemetry.record_reconcile(0.02)

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert _sample(text, "medmo_runs_created_total") == 1
    assert _sample(text, "medmo_stage_restarts_total") == 1
    assert _sample(text, "medmo_runs_succeeded_total") == 1
    assert _sample(text, "medmo_runs_failed_total", 'reason="NonRetryableFailure"') == 1
    assert _sample(text, "medmo_stage_duration_seconds_sum", 'stage_type="sft"') == 12.5
    assert _sample(text, "medmo_reconcile_latency_seconds_count") == 1


def _sample(text: str, name: str, label: str = "") -> float:
    """The value of a Prometheus sample line, whatever scope labels OpenTelemetry adds."""
    pattern = rf"^{name}(?:\{{[^}}]*{re.escape(label)}[^}}]*\}})? (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"no {name} {label} in the scrape"
    return float(match.group(1))
