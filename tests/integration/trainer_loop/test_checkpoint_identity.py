"""A stage resumes only from checkpoints of its own run written under its own config, and refuses one
whose tensors do not fit its model, naming what differs. Every refusal exits with
CHECKPOINT_INCOMPATIBLE (the operator does not retry it), reports Failed with the reason and how to
start over, and leaves the checkpoints as they were."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from transformers import Qwen3VLForConditionalGeneration

from integration.trainer_loop.trainer_loop_runs import StageRun, assert_succeeded, run_stage, stage_config
from medmo_trainer.exit_codes import ExitCode
from medmo_trainer.model import export_hf, load_model
from medmo_trainer.model.presets import VISION_HIDDEN, tiny_processor, tiny_qwen3_vl_config

RUN_UID = "0b5e7d1c-run-one"


@pytest.fixture(scope="module")
def finished(tmp_path_factory, synthetic_data) -> dict:
    """The config of a finished 2-step align stage (projector only, input model in a folder), whose
    checkpoints step-1 and step-2 are in its storage."""
    tmp = tmp_path_factory.mktemp("identity")
    loaded = load_model("preset:tiny-qwen3-vl")
    export_hf(loaded.model, loaded.processor, str(tmp / "input-model"))
    config = stage_config(tmp, str(synthetic_data), steps=2, every_steps=1, type="pretrain", stage="align",
                          runUid=RUN_UID, model={"base": str(tmp / "input-model"), "trainable": ["projector"]})
    assert_succeeded(run_stage(tmp, config, name="first"))
    return config


def assert_refused(run: StageRun, config: dict, *reasons: str) -> str:
    """The run exited non-retryably before training, saying why; its checkpoints are untouched."""
    assert run.returncode == ExitCode.CHECKPOINT_INCOMPATIBLE, run.output[-4000:]
    checkpoints = Path(config["checkpointUri"])
    for text in (run.termination_message, run.final["message"]):
        for reason in reasons:
            assert reason in text
    assert run.final["phase"] == "Failed" and run.final["step"] == 0
    assert (checkpoints / "latest").read_text() == "step-2"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-1", "step-2"]
    return run.termination_message


def test_a_checkpoint_of_another_run_is_refused_saying_how_to_start_over(finished, tmp_path):
    """A resource deleted and applied again under the same name and storage is a new run (a new uid)."""
    config = {**finished, "runUid": "9a44f0e2-run-two"}
    run = run_stage(tmp_path, config, name="another-run")
    message = assert_refused(run, config, f"was written by another run (uid {RUN_UID}; this run's uid is 9a44f0e2-run-two)")
    assert f"To start the stage over, delete {config['checkpointUri']} or give the run a new `spec.storage.uri`" in message
    assert "to continue the other run with `medmo run`, use the --workdir it was started with" in message


def test_the_same_run_with_an_edited_config_is_refused_naming_what_changed(finished, tmp_path):
    config = {**finished, "hyperparameters": {**finished["hyperparameters"], "learningRate": 1e-4}}
    run = run_stage(tmp_path, config, name="edited")
    assert_refused(run, config, "was written by this run under another stage config (changed since: hyperparameters)",
                   f"delete {config['checkpointUri']}")


def test_a_checkpoint_that_does_not_fit_the_model_is_refused_naming_the_shapes(finished, tmp_path):
    """The input model changed under the stage (its folder rewritten with a wider vision tower): the
    projector the checkpoint holds takes features of another width."""
    folder = Path(finished["model"]["base"])
    kept = folder.with_name("input-model-kept")
    folder.rename(kept)
    try:
        processor = tiny_processor("qwen3_vl")
        wider = tiny_qwen3_vl_config(processor.tokenizer)
        wider.vision_config.hidden_size = 2 * VISION_HIDDEN
        export_hf(Qwen3VLForConditionalGeneration(wider), processor, str(folder))
        run = run_stage(tmp_path, finished, name="reshaped")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        kept.rename(folder)
    merged, wider_merged = 4 * VISION_HIDDEN, 8 * VISION_HIDDEN  # 2x2 patches merged into one token
    assert_refused(
        run, finished, f"does not fit the model of stage 'align' ({folder})", "tensors have other shapes",
        f"model.visual.deepstack_merger_list.0.linear_fc1.weight: checkpoint [{merged}, {merged}], "
        f"model [{wider_merged}, {wider_merged}]",
    )
