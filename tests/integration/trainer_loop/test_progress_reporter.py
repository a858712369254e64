"""The progress reporter against a real HTTP server on loopback: token, retries, latest-wins, never blocking."""

from __future__ import annotations

import io
import json
import time

from integration.trainer_loop.trainer_loop_runs import ProgressSink, closed_port_url
from medmo_trainer.progress import LOG_PREFIX, Progress, ProgressReporter


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_reports_carry_the_token_from_the_mounted_file_and_follow_its_rotation(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("first\n")
    stream = io.StringIO()
    with ProgressSink() as sink:
        reporter = ProgressReporter(enabled=True, url=sink.url, token="ignored-when-file", token_file=str(token_file),
                                    stream=stream)
        reporter.report(Progress(run="r", stage="s", step=1, total_steps=3, metrics={"loss": 2.5}))
        wait_for(lambda: len(sink.received) == 1)
        token_file.write_text("second\n")
        reporter.report(Progress(run="r", stage="s", step=2, total_steps=3, metrics={"loss": 2.0}))
        reporter.close()
    assert [auth for auth, _ in sink.received] == ["Bearer first", "Bearer second"]
    assert sink.received[1][1]["step"] == 2 and sink.received[1][1]["totalSteps"] == 3
    logged = [json.loads(line.removeprefix(LOG_PREFIX)) for line in stream.getvalue().splitlines()]
    assert [r["metrics"]["loss"] for r in logged] == [2.5, 2.0], "every report is also a stdout line"


def test_a_down_endpoint_never_blocks_and_the_latest_report_wins_once_it_is_back(tmp_path):
    url = closed_port_url()
    reporter = ProgressReporter(enabled=True, url=url, token="t", stream=io.StringIO(), max_backoff_seconds=0.2)
    started = time.monotonic()
    for step in range(1, 201):
        reporter.report(Progress(run="r", stage="s", step=step, total_steps=200))
    assert time.monotonic() - started < 1.0, "reporting must not wait for the endpoint"
    wait_for(lambda: reporter.failed_attempts >= 2)

    port = int(url.rsplit(":", 1)[1].split("/")[0])
    with ProgressSink(port=port) as sink:  # the endpoint comes back on the same address
        wait_for(lambda: sink.received)
        reporter.close()
    steps = [payload["step"] for _, payload in sink.received]
    assert steps == [200], f"only the latest report is sent after an outage, got {steps}"


def test_close_gives_up_after_its_timeout_when_the_endpoint_stays_down():
    reporter = ProgressReporter(enabled=True, url=closed_port_url(), stream=io.StringIO())
    reporter.report(Progress(run="r", stage="s", step=1))
    started = time.monotonic()
    reporter.close(flush_timeout_seconds=1.0)
    assert time.monotonic() - started < 3.0
    assert reporter.sent == 0


def test_other_ranks_report_nothing():
    stream = io.StringIO()
    with ProgressSink() as sink:
        reporter = ProgressReporter(enabled=False, url=sink.url, stream=stream)
        reporter.report(Progress(run="r", stage="s", step=1))
        reporter.close()
    assert stream.getvalue() == "" and sink.received == []
