"""The run report, from metric files written as the stages write them: tables and real plots."""

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from medmo_operator.report import rolling_mean, write_report
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


def _write_predictions(storage, shift=0):
    """Predictions of both models on two held-out grounding images, and the images, as the eval stage writes them."""
    examples, rows = [], {"final": [], "before-rl": []}
    for n in range(2):
        image = storage / "bench" / "examples" / "heldout" / f"{n}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((96, 128), 40 + 60 * n, dtype=np.uint8)).convert("RGB").save(image)
        examples.append({"benchmark": "heldout", "id": f"scan-{n}-grounding", "image": str(image)})
        truth = [{"label": "nodule", "box": [100, 200, 400, 500]}]
        for name, box in (("final", [120 + shift, 210, 420 + shift, 520]), ("before-rl", [600, 600, 900, 900])):
            rows[name].append({"benchmark": "heldout", "id": f"scan-{n}-grounding", "task": "grounding",
                               "referenceBoxes": truth, "parsed": [{"label": "nodule", "box": box}],
                               "scores": {"groundingMiou": 0.8 if name == "final" else 0.0}})
    evaluation = json.loads(json.dumps(EVAL))
    evaluation["examples"] = examples
    for model in evaluation["models"]:
        path = storage / "bench" / "predictions" / f"{model['name']}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows[model["name"]]))
        model["predictions"] = str(path)
    (storage / "bench" / "metrics.json").write_text(json.dumps(evaluation))


def test_report_draws_true_and_predicted_boxes_of_each_model_on_held_out_images(tmp_path):
    storage = tmp_path / "storage"
    storage.mkdir()
    _write_run(storage)
    _write_predictions(storage)
    report = write_report(STATUS, str(storage), tmp_path / "report")
    text = report.read_text()
    assert "](boxes.png)" in text and "green: true boxes" in text
    assert "predictions/final.jsonl" in text and "predictions/before-rl.jsonl" in text
    # before and after RL side by side, with the change
    assert "| metric | final | before-rl | change |" in text and "| groundingMiou | 0.4375 | 0.1875 | +0.25 |" in text
    pixels = np.asarray(Image.open(report.parent / "boxes.png").convert("RGB")).astype(int)
    red, green = (pixels[..., 0] > 200) & (pixels[..., 1] < 80), (pixels[..., 1] > 150) & (pixels[..., 0] < 80)
    assert red.sum() > 50 and green.sum() > 50  # the predicted and the true boxes are drawn
    # the boxes are drawn where the predictions put them
    _write_predictions(storage, shift=300)
    write_report(STATUS, str(storage), tmp_path / "moved")
    assert not np.array_equal(pixels, np.asarray(Image.open(tmp_path / "moved" / "boxes.png").convert("RGB")))


def test_reward_curves_have_a_rolling_mean_and_the_rl_stage_a_before_after_table(tmp_path):
    assert rolling_mean([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert rolling_mean([4.0, 0.0], 8) == [4.0, 2.0]
    storage = tmp_path / "storage"
    storage.mkdir()
    _write_run(storage)
    text = write_report(STATUS, str(storage), tmp_path / "report").read_text()
    # three steps of reward/bbox 0.2, 0.3, 0.45: the first and last step, and the mean of (up to) 8 steps
    assert "| reward/bbox | 0.2 | 0.3167 | 0.3167 | 0.45 |" in text
