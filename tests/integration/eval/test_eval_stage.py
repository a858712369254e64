"""The eval stage as the operator runs it: `python -m medmo_trainer --config` (and under the torchrun
launcher with 2 gloo processes) on the tiny Qwen3-VL preset and a few held-out synthetic scans."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from medmo_cases import progress_lines

from medmo_trainer.data.synthetic import generate
from medmo_trainer.eval.scoring import METRIC_NAMES
from medmo_trainer.exit_codes import ExitCode

SCANS = 4
COUNT_KEYS = ("samples", "unparseable", "skipped")


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory) -> tuple[str, int]:
    """A held-out benchmark with two malformed records added; returns (URI, valid record count)."""
    folder = tmp_path_factory.mktemp("heldout")
    summary = generate(f"file://{folder}", SCANS, seed=11, split="heldout")
    good = json.loads((folder / "heldout-00000.jsonl").read_text().splitlines()[0])
    missing_image = {**good, "id": "lost-image", "image": "images/absent.png"}
    (folder / "heldout-00001.jsonl").write_text("{not json\n" + json.dumps(missing_image) + "\n")
    return f"file://{folder}", summary["records"]


def write_config(tmp_path: Path, benchmark_uri: str, **evaluation) -> Path:
    storage = f"file://{tmp_path}/storage"
    config = {
        "run": "tiny",
        "stage": "bench",
        "type": "eval",
        "model": {"base": "preset:tiny-qwen3-vl"},
        "storage": {"uri": storage},
        "outputUri": f"{storage}/bench/model",
        "checkpointUri": f"{storage}/bench/checkpoints",
        "hyperparameters": {"imageSize": 64},
        "benchmarks": [{"name": "heldout", "uri": benchmark_uri}],
        "evaluation": {"maxNewTokens": 16, **evaluation},
    }
    path = tmp_path / "stage.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_stage(tmp_path: Path, config: Path, nproc: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEDMO_TERMINATION_LOG": str(tmp_path / "termination.log"), "OMP_NUM_THREADS": "1"}
    env.pop("MEDMO_PROGRESS_URL", None)
    trainer = ["-m", "medmo_trainer", "--config", str(config)]
    if nproc > 1:
        command = [sys.executable, "-m", "medmo_trainer.launch", "--standalone", f"--nproc-per-node={nproc}", *trainer]
    else:
        command = [sys.executable, *trainer]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def read_metrics(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "storage" / "bench" / "metrics.json").read_text())


def test_eval_stage_scores_models_and_reports_metrics(tmp_path, benchmark):
    uri, records = benchmark
    config = write_config(tmp_path, uri, compareModels=[{"name": "before-rl", "uri": "preset:tiny-qwen3-vl"}])
    result = run_stage(tmp_path, config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    document = read_metrics(tmp_path)
    assert [m["name"] for m in document["models"]] == ["final", "before-rl"]
    flat, counters = document["metrics"], document["counters"]
    for prefix in ("heldout/", "before-rl/heldout/"):
        scores = {name: flat[prefix + name] for name in METRIC_NAMES}  # every task of the set is scored
        assert all(0.0 <= value <= 1.0 for value in scores.values()), scores
        assert counters[prefix + "samples"] == records
        assert counters[prefix + "skipped"] == 2  # the bad JSON line and the record whose image is absent
        assert 0 <= counters[prefix + "unparseable"] <= records

    final = progress_lines(result.stdout)[-1]
    assert final["phase"] == "Succeeded" and final["step"] == final["totalSteps"] > 0
    # what the operator folds into status.stages[].metrics and .counters
    assert final["metrics"] == pytest.approx(flat) and final["counters"] == counters
    assert "heldout/groundingMiou" in (tmp_path / "termination.log").read_text()


def test_two_ranks_give_the_one_rank_metrics(tmp_path, benchmark):
    uri, records = benchmark
    single, double = tmp_path / "one", tmp_path / "two"
    for folder, nproc in ((single, 1), (double, 2)):
        folder.mkdir()
        # batch size 1: each record is computed alone, so greedy answers cannot depend on batch padding
        result = run_stage(folder, write_config(folder, uri, batchSize=1), nproc=nproc)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one, two = read_metrics(single), read_metrics(double)
    assert two["counters"]["heldout/samples"] == records
    assert two["metrics"] == pytest.approx(one["metrics"]) and two["counters"] == one["counters"]


def test_unreadable_benchmark_fails_with_a_data_error_naming_it(tmp_path):
    missing = f"file://{tmp_path}/no-such-benchmark"
    result = run_stage(tmp_path, write_config(tmp_path, missing))
    assert result.returncode == ExitCode.DATA_INVALID
    message = (tmp_path / "termination.log").read_text()
    assert missing in message and "DATA_INVALID" in message
