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

from medmo_trainer.data.schema import multiple_choice_prompt
from medmo_trainer.data.synthetic import generate
from medmo_trainer.eval.scoring import METRIC_NAMES
from medmo_trainer.exit_codes import ExitCode

SCANS = 4
COUNT_KEYS = ("samples", "unparseable", "skipped")


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory) -> tuple[str, int]:
    """A held-out benchmark with a text-only multiple-choice question, a two-image question and two
    malformed records added; returns (URI, valid record count)."""
    folder = tmp_path_factory.mktemp("heldout")
    summary = generate(f"file://{folder}", SCANS, seed=11, split="heldout")
    good = json.loads((folder / "heldout-00000.jsonl").read_text().splitlines()[0])
    missing_image = {**good, "id": "lost-image", "image": "images/absent.png"}
    options = ["Pneumothorax", "Effusion", "Nodule", "Fracture", "Normal"]
    text_only = {"id": "medqa-1", "task": "vqa", "answerType": "choice", "options": options, "answer": "C",
                 "prompt": multiple_choice_prompt("Which finding is a small round opacity?", options)}
    two_images = {"id": "compare-1", "task": "vqa", "answerType": "closed", "options": ["yes", "no"], "answer": "no",
                  "images": [good["image"], good["image"]], "prompt": "Did the finding change between the scans?"}
    lines = ["{not json", *(json.dumps(r) for r in (missing_image, text_only, two_images))]
    (folder / "heldout-00001.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "medmo-index.json").unlink(missing_ok=True)  # the generator's index lists its own shard only
    return f"file://{folder}", summary["records"] + 2


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

    # every answer of every model, with what was read from it, beside the metrics
    for model in document["models"]:
        rows = [json.loads(line) for line in (tmp_path / "storage" / "bench" / "predictions" / f"{model['name']}.jsonl")
                .read_text().splitlines()]
        assert model["predictions"].endswith(f"/bench/predictions/{model['name']}.jsonl")
        assert len(rows) == records and len({row["id"] for row in rows}) == records
        by_id = {row["id"]: row for row in rows}
        assert by_id["medqa-1"]["images"] == [] and len(by_id["compare-1"]["images"]) == 2
        assert set(by_id["medqa-1"]["scores"]) == {"vqaChoiceAcc"} and by_id["medqa-1"]["reference"] == "C"
        for row in rows:
            assert row["generated"] is not None and row["prompt"] and row["reference"]
            assert row["readable"] == (row["parsed"] is not None)
        grounding = [row for row in rows if row["task"] == "grounding"]
        assert grounding and all(row["referenceBoxes"] and isinstance(row["parsed"], (list, type(None))) for row in grounding)
        # the per-record scores average to the benchmark's metric
        ious = [row["scores"]["groundingMiou"] * len(row["referenceBoxes"]) for row in grounding]
        boxes = sum(len(row["referenceBoxes"]) for row in grounding)
        assert sum(ious) / boxes == pytest.approx(model["benchmarks"]["heldout"]["groundingMiou"])
    examples = document["examples"]
    assert examples and all(Path(e["image"].removeprefix("file://")).is_file() for e in examples)

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
    # rank 0 writes every rank's answers, in the same order
    predictions = [(folder / "storage" / "bench" / "predictions" / "final.jsonl").read_text() for folder in (single, double)]
    assert predictions[0] == predictions[1]


def test_unreadable_benchmark_fails_with_a_data_error_naming_it(tmp_path):
    missing = f"file://{tmp_path}/no-such-benchmark"
    result = run_stage(tmp_path, write_config(tmp_path, missing))
    assert result.returncode == ExitCode.DATA_INVALID
    message = (tmp_path / "termination.log").read_text()
    assert missing in message and "DATA_INVALID" in message
