"""Bad input: a clear, non-retryable exit code and termination message; malformed records skipped and counted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import yaml

from integration.trainer_loop.trainer_loop_runs import assert_succeeded, run_stage, stage_config
from medmo_trainer.data.pack import index
from medmo_trainer.exit_codes import ExitCode

MALFORMED = [
    "{not json",
    json.dumps({"id": "m-task", "task": "segmentation", "image": "images/train-000000.png",
                "prompt": "Segment it.", "answer": "done"}),
    json.dumps({"id": "m-box", "task": "grounding", "image": "images/train-000000.png",
                "prompt": "Locate every nodule with boxes.", "answer": "nodule <box>[[10, 10, 1500, 20]]</box>",
                "boxes": [{"label": "nodule", "box": [10, 10, 1500, 20]}]}),
    json.dumps({"id": "m-image", "task": "caption", "image": "images/no-such-scan.png",
                "prompt": "Describe the scan in one sentence.", "answer": "Scan with no nodule."}),
]
EXPECTED_REASONS = {"badJson", "unknownTask", "badBox", "missingImage"}


def test_unreadable_dataset_fails_not_retryable_naming_the_uri(tmp_path, synthetic_data):
    missing = str(tmp_path / "no-such-dataset")
    config = stage_config(tmp_path, missing, steps=2)
    run = run_stage(tmp_path, config)
    assert run.returncode == ExitCode.DATA_INVALID
    assert not ExitCode(run.returncode).retryable
    assert run.termination_message.startswith("DATA_INVALID (exit 3)")
    assert missing in run.termination_message


def test_malformed_records_are_skipped_and_counted_in_progress(tmp_path, synthetic_data):
    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    shard = next(data.glob("*.jsonl"))
    lines = shard.read_text().splitlines()
    # Spread the bad lines through the shard; one pass over it is read in 1 epoch.
    for offset, bad in enumerate(MALFORMED):
        lines.insert(offset * len(lines) // len(MALFORMED), bad)
    shard.write_text("\n".join(lines) + "\n")
    index(str(data))  # the shard changed: count it again (`medmo data index`), as its loader demands

    config = stage_config(tmp_path, str(data))
    config["hyperparameters"].pop("maxSteps")  # one epoch: every record is read at least once
    run = run_stage(tmp_path, config)
    assert_succeeded(run)
    final = run.final
    assert final["phase"] == "Succeeded"
    counters = final["counters"]
    by_reason = {key.removeprefix("skipped/"): n for key, n in counters.items() if key.startswith("skipped/")}
    assert set(by_reason) == EXPECTED_REASONS
    assert counters["skippedRecords"] == sum(by_reason.values()) >= len(MALFORMED)
    assert counters["recordsRead"] >= len(lines)


def test_invalid_config_exits_with_the_config_code_naming_the_field(tmp_path, synthetic_data):
    config = stage_config(tmp_path, str(synthetic_data), strategy={"name": "horovod"})
    config_file = tmp_path / "stage.yaml"
    config_file.write_text(yaml.safe_dump(config))
    log = tmp_path / "termination-log"
    result = subprocess.run([sys.executable, "-m", "medmo_trainer", "--config", str(config_file)],
                            env={"MEDMO_TERMINATION_LOG": str(log), "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == ExitCode.CONFIG_INVALID
    message = log.read_text()
    assert message.startswith("CONFIG_INVALID (exit 2)") and "strategy.name" in message
