"""The eval stage runs like the training stages: a `medmo.step` span per generated batch, and a Failed
progress report with the error before the process exits with the failure's code."""

from __future__ import annotations

import re

from integration.trainer_loop.trainer_loop_runs import run_stage, stage_config
from medmo_trainer.exit_codes import ExitCode


def test_an_eval_stage_that_cannot_load_a_compared_model_reports_why_it_failed(tmp_path, synthetic_data):
    missing = tmp_path / "no-such-model"
    config = stage_config(
        tmp_path, str(synthetic_data), type="eval", stage="bench", datasets=[],
        benchmarks=[{"name": "heldout", "uri": str(synthetic_data), "maxSamples": 8}],
        evaluation={"maxNewTokens": 4, "batchSize": 4, "compareModels": [{"name": "before-rl", "uri": str(missing)}]},
    )
    run = run_stage(tmp_path, config, {"OTEL_TRACES_EXPORTER": "console"}, name="bench")

    assert run.returncode == ExitCode.MODEL_INVALID, run.output[-4000:]
    running = [r for r in run.reports if r["phase"] == "Running"]
    assert [r["step"] for r in running] == [1], "the stage's own model was scored (4 records per rank, one batch)"
    assert run.final["phase"] == "Failed" and run.final["step"] == 1 and run.final["totalSteps"] == 2
    assert str(missing) in run.final["message"]
    # one batch's span, then the stage's root span, ended (and exported) by the failure
    assert re.findall(r'"name": "(medmo\.[a-z]+)"', run.output) == ["medmo.step", "medmo.stage"]
