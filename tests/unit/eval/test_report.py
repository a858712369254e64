"""The run report, from metric files written as the stages write them: tables and real plots."""

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from medmo_operator.report import write_report
from medmo_trainer.metrics_log import MetricsLog, stage_log_uri

STATUS = {
    "phase": "Succeeded",
    "outputModel": "file:///runs/tiny/grpo/model",
    "stages": [
        {"name": "ground", "phase": "Succeeded", "step": 4, "totalSteps": 4, "metrics": {"loss": 0.8125},
         "counters": {"recordsRead": 64, "skippedRecords": 2, "skipped/badJson": 2}},
        {"name": "grpo", "phase": "Succeeded", "step": 3, "totalSteps": 3, "metrics": {"reward/total": 0.61}},
        {"name": "bench", "phase": "Succeeded", "step": 0, "metrics": {"heldout/groundingMiou": 0.4375}},
    ],
}
LOSSES = [2.5, 1.75, 1.125, 0.8125]
REWARDS = [{"reward/bbox": 0.2, "reward/format": 0.5}, {"reward/bbox": 0.3, "reward/format": 0.75}, {"reward/bbox": 0.45, "reward/format": 1.0}]
EVAL = {
    "stage": "bench",
    "benchmarks": ["heldout"],
    "models": [
        {"name": "final", "uri": "file:///runs/tiny/grpo/model",
         "benchmarks": {"heldout": {"groundingMiou": 0.4375, "groundingAcc50": 0.3125, "vqaClosedAcc": 0.6875}},
         "counts": {"heldout": {"samples": 34, "unparseable": 5, "skipped": 1}}},
        {"name": "before-rl", "uri": "file:///runs/tiny/instruct/model",
         "benchmarks": {"heldout": {"groundingMiou": 0.1875, "groundingAcc50": 0.0625, "vqaClosedAcc": 0.5625}},
         "counts": {"heldout": {"samples": 34, "unparseable": 12, "skipped": 1}}},
    ],
}


def _write_run(storage):
    with MetricsLog(stage_log_uri(str(storage), "ground"), enabled=True) as log:
        for step, loss in enumerate(LOSSES, start=1):
            log.log(step, {"loss": loss, "learningRate": 1e-3})
    with MetricsLog(stage_log_uri(str(storage), "grpo"), enabled=True) as log:
        for step, rewards in enumerate(REWARDS, start=1):
            log.log(step, rewards)
    (storage / "bench").mkdir()
    (storage / "bench" / "metrics.json").write_text(json.dumps(EVAL))


def _assert_real_image(path, min_size=(400, 250)):
    image = Image.open(path)
    assert image.format == "PNG"
    assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
    pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 5  # not blank: lines, bars and text on a white background
    return pixels


def test_report_tables_hold_the_run_numbers(tmp_path):
    storage = tmp_path / "storage"
    storage.mkdir()
    _write_run(storage)
    report = write_report(STATUS, str(storage), tmp_path / "report", run_name="medmo-tiny")
    text = report.read_text()
    assert report.name == "report.md"
    assert "# MedMO run report: medmo-tiny" in text
    assert "| ground | Succeeded | 4 | 4 | 0 |" in text
    assert "Loss 2.5 at step 1 -> 0.8125 at step 4." in text
    # eval: one column per model, one row per metric
    assert "| metric | final | before-rl |" in text
    assert "| groundingMiou | 0.4375 | 0.1875 |" in text
    assert "| vqaClosedAcc | 0.6875 | 0.5625 |" in text
    assert "| unparseable | 5 | 12 |" in text
    assert "| reward/total | 0.61 |" in text  # RL stage: latest status metrics
    assert "| recordsRead | 64 |" in text and "| skipped/badJson | 2 |" in text  # status counters
    for name in ("loss.png", "rewards.png", "grounding_iou.png"):
        assert f"]({name})" in text
        _assert_real_image(report.parent / name)


def test_grounding_bars_are_drawn_to_the_scores(tmp_path):
    storage = tmp_path / "storage"
    storage.mkdir()
    _write_run(storage)
    out = tmp_path / "report"
    write_report(STATUS, str(storage), out)
    pixels = _assert_real_image(out / "grounding_iou.png")
    # Changing the scores changes the picture: the plot is drawn from the file's numbers.
    higher = json.loads(json.dumps(EVAL))
    higher["models"][1]["benchmarks"]["heldout"]["groundingMiou"] = 0.9
    (storage / "bench" / "metrics.json").write_text(json.dumps(higher))
    write_report(STATUS, str(storage), tmp_path / "other")
    assert not np.array_equal(pixels, np.asarray(Image.open(tmp_path / "other" / "grounding_iou.png").convert("L")))


def test_report_without_logs_has_tables_and_no_plots(tmp_path):
    status = {"phase": "Failed", "stages": [{"name": "align", "phase": "Failed", "step": 2, "message": "exit code 3: bad data"}]}
    report = write_report(status, str(tmp_path / "empty-storage"), tmp_path / "out")
    text = report.read_text()
    assert "| align | Failed | 2 |" in text and "exit code 3: bad data" in text
    assert not list((tmp_path / "out").glob("*.png"))


def test_report_module_does_not_import_torch():
    # The operator image renders reports without the trainer's heavy dependencies.
    code = "import sys, medmo_operator.report; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
