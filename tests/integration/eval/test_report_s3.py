"""The metrics log and the run report on the real SeaweedFS S3 server (object storage cannot append)."""

from __future__ import annotations

import json

import fsspec
import pytest

from medmo_operator.report import write_report
from medmo_trainer.metrics_log import MetricsLog, read_metrics_log, stage_log_uri


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


def test_metrics_log_and_report_on_s3(s3_env, s3_bucket, tmp_path):
    storage = f"{s3_bucket}/runs/tiny"
    uri = stage_log_uri(storage, "ground")
    with MetricsLog(uri, enabled=True, flush_every=2) as attempt:
        for step in range(1, 6):
            attempt.log(step, {"loss": 3.0 - 0.5 * step})
    # restarted from the checkpoint of step 2: steps 3-5 of the killed attempt are replaced
    with MetricsLog(uri, enabled=True, start_step=2, flush_every=2) as attempt:
        attempt.log(3, {"loss": 1.25})
    assert [(r["step"], r["loss"]) for r in read_metrics_log(uri)] == [(1, 2.5), (2, 2.0), (3, 1.25)]

    evaluation = {"stage": "bench", "benchmarks": ["heldout"], "models": [
        {"name": "final", "uri": "x", "benchmarks": {"heldout": {"groundingMiou": 0.375, "groundingAcc50": 0.25}}}]}
    fs, _ = fsspec.core.url_to_fs(storage, **s3_env.storage_options())
    fs.pipe_file(f"{storage}/bench/metrics.json", json.dumps(evaluation).encode())

    status = {"phase": "Succeeded", "stages": [{"name": "ground", "phase": "Succeeded", "step": 3},
                                               {"name": "bench", "phase": "Succeeded", "step": 1}]}
    text = write_report(status, storage, tmp_path).read_text()
    assert "Loss 2.5 at step 1 -> 1.25 at step 3." in text
    assert "| groundingMiou | 0.375 |" in text
    assert (tmp_path / "loss.png").stat().st_size > 1000 and (tmp_path / "grounding_iou.png").stat().st_size > 1000
