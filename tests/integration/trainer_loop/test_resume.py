"""Checkpoints: a killed run resumes exactly (on S3, and for a stage that trains only the projector, with
frozen weights reloaded from its input model), and a crash mid-save loses nothing committed."""

from __future__ import annotations

import json

import pytest
import s3fs

from integration.trainer_loop.trainer_loop_runs import assert_succeeded, run_stage, stage_config
from medmo_trainer.checkpoint import COMMIT_MARKER, CRASH_DURING_SAVE_ENV
from medmo_trainer.model.families import FAMILIES

STRATEGIES = [
    pytest.param({"name": "ddp"}, id="ddp"),
    pytest.param({"name": "fsdp"}, id="fsdp", marks=pytest.mark.slow),
    pytest.param({"name": "deepspeed", "zeroStage": 2}, id="deepspeed-zero2", marks=pytest.mark.slow),
]
PROJECTOR = FAMILIES["qwen3_vl"].group_prefixes["projector"]
"""Parameter-name prefixes of the tiny Qwen3-VL's projector (its vision-language mergers)."""


def s3_config(tmp_path, data, bucket, prefix, s3_server, **kwargs) -> dict:
    return stage_config(
        tmp_path, data,
        checkpoint_uri=f"{bucket}/{prefix}/checkpoints", output_uri=f"{bucket}/{prefix}/model",
        storage={"uri": f"{bucket}/{prefix}", "endpoint": s3_server.endpoint}, **kwargs,
    )


def s3_credentials(s3_server) -> dict[str, str]:
    """Only the keys: the endpoint comes from the stage config, as in a pod."""
    return {key: value for key, value in s3_server.env().items() if not key.startswith("AWS_ENDPOINT_URL")}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_killed_run_resumes_with_the_same_losses(tmp_path, synthetic_data, s3_server, s3_bucket, strategy):
    data, env = str(synthetic_data), s3_credentials(s3_server)
    settings = {"steps": 24, "every_steps": 4, "strategy": strategy}
    whole = run_stage(tmp_path, s3_config(tmp_path, data, s3_bucket, "whole", s3_server, **settings), env, name="whole")
    assert_succeeded(whole)

    config = s3_config(tmp_path, data, s3_bucket, "killed", s3_server, **settings)
    killed = run_stage(tmp_path, config, env, kill_after_step=6, name="killed")
    fs = s3fs.S3FileSystem(**s3_server.storage_options())
    checkpoints = f"{s3_bucket}/killed/checkpoints"
    assert killed.returncode < 0 and killed.final["phase"] == "Running", "the run was meant to die mid-way"
    # The kill lands a little after step 6 was reported: resume from whatever was committed by then.
    committed = int(fs.cat_file(f"{checkpoints}/latest").decode().removeprefix("step-"))
    assert 4 <= committed < 24

    resumed = run_stage(tmp_path, config, env, name="resumed")
    assert_succeeded(resumed)
    assert f"resumed from {checkpoints}/step-{committed} at step {committed}" in resumed.output
    assert sorted(resumed.losses) == list(range(committed + 1, 25))
    for step, loss in {**killed.losses, **resumed.losses}.items():
        assert loss == pytest.approx(whole.losses[step], rel=1e-5), f"step {step}"
    assert resumed.final["phase"] == "Succeeded"
    fs.invalidate_cache()
    assert fs.cat_file(f"{checkpoints}/latest").decode() == "step-24"
    assert fs.exists(f"{s3_bucket}/killed/model/model.safetensors")


def test_crash_during_a_save_resumes_from_the_previous_checkpoint(tmp_path, synthetic_data, s3_server, s3_bucket):
    config = s3_config(tmp_path, str(synthetic_data), s3_bucket, "crash", s3_server, steps=6, every_steps=2)
    env = s3_credentials(s3_server)
    crashed = run_stage(tmp_path, config, {**env, CRASH_DURING_SAVE_ENV: "4"}, name="crashed")
    assert crashed.returncode == 128 + 9, "the launcher reports the worker killed by SIGKILL in the save of step 4"

    fs = s3fs.S3FileSystem(**s3_server.storage_options())
    checkpoints = f"{s3_bucket}/crash/checkpoints"
    assert fs.find(f"{checkpoints}/step-4"), "the interrupted save had written files"
    assert not fs.exists(f"{checkpoints}/step-4/COMMITTED")
    assert fs.cat_file(f"{checkpoints}/latest").decode() == "step-2"

    resumed = run_stage(tmp_path, config, env, name="resumed")
    assert_succeeded(resumed)
    assert f"resumed from {checkpoints}/step-2 at step 2" in resumed.output
    assert sorted(resumed.losses) == [3, 4, 5, 6]
    for step in (3, 4):  # the steps the crashed run had finished after its last commit
        assert resumed.losses[step] == pytest.approx(crashed.losses[step], rel=1e-5)
    fs.invalidate_cache()
    assert fs.exists(f"{checkpoints}/step-4/COMMITTED")
    assert fs.cat_file(f"{checkpoints}/latest").decode() == "step-6"
    assert not fs.exists(f"{checkpoints}/step-2"), "keepLast 2 prunes the oldest"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_killed_pretrain_stage_training_only_the_projector_resumes_with_the_same_losses(tmp_path, synthetic_data,
                                                                                       strategy):
    """The checkpoints of a projector-only stage hold no frozen weights: resume takes those from the input model."""
    settings = {
        "steps": 4, "every_steps": 2, "strategy": strategy, "type": "pretrain", "stage": "align",
        "model": {"base": "preset:tiny-qwen3-vl", "trainable": ["projector"]},
    }
    whole = run_stage(tmp_path, stage_config(tmp_path / "whole", str(synthetic_data), **settings), name="whole")
    assert_succeeded(whole)

    config = stage_config(tmp_path / "killed", str(synthetic_data), **settings)
    killed = run_stage(tmp_path, config, kill_after_step=3, name="killed")
    assert killed.returncode < 0 and killed.final["phase"] == "Running", "the run was meant to die mid-way"
    checkpoints = tmp_path / "killed" / "checkpoints"
    marker = json.loads((checkpoints / "step-2" / COMMIT_MARKER).read_text())
    assert marker["tensors"] and all(name.startswith(PROJECTOR) for name in marker["tensors"])

    resumed = run_stage(tmp_path, config, name="resumed")
    assert_succeeded(resumed)
    assert f"resumed from {checkpoints}/step-2 at step 2" in resumed.output
    assert sorted(resumed.losses) == [3, 4]
    for step, loss in {**killed.losses, **resumed.losses}.items():
        assert loss == pytest.approx(whole.losses[step], rel=1e-5), f"step {step}"
