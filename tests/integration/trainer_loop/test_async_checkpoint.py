"""Asynchronous checkpoints (`checkpoint.async`): uploads run while training goes on, a killed run resumes
exactly from what was committed, and a crash in the middle of a background upload loses nothing committed."""

from __future__ import annotations

import pytest
import s3fs

from integration.trainer_loop.test_resume import s3_config, s3_credentials
from integration.trainer_loop.trainer_loop_runs import assert_succeeded, run_stage
from medmo_trainer.checkpoint import HOLD_UPLOAD_ENV
from medmo_trainer.progress import LOG_PREFIX


def async_config(tmp_path, data, bucket, prefix, s3_server, **kwargs) -> dict:
    config = s3_config(tmp_path, data, bucket, prefix, s3_server, **kwargs)
    config["checkpoint"]["async"] = True
    return config


def uploads_held(lines: list[str], step: int) -> int:
    """Ranks whose upload of `step` the test hook holds, from the output so far."""
    return sum("holding the upload of" in line and f"step-{step}/" in line for line in lines)


@pytest.mark.parametrize("strategy", [
    pytest.param({"name": "ddp"}, id="ddp"),
    pytest.param({"name": "fsdp"}, id="fsdp", marks=pytest.mark.slow),
])
def test_asynchronous_saves_resume_with_the_losses_of_an_uninterrupted_synchronous_run(
        tmp_path, synthetic_data, s3_server, s3_bucket, strategy):
    data, env = str(synthetic_data), s3_credentials(s3_server)
    settings = {"steps": 12, "every_steps": 4, "strategy": strategy}
    whole = run_stage(tmp_path, s3_config(tmp_path, data, s3_bucket, "whole", s3_server, **settings), env, name="whole")
    assert_succeeded(whole)

    config = async_config(tmp_path, data, s3_bucket, "killed", s3_server, **settings)
    # Step 9 runs after the save of step 8 has waited for step 4's commit; step 8's may be in flight.
    killed = run_stage(tmp_path, config, env, kill_after_step=9, name="killed")
    assert killed.returncode < 0 and killed.final["phase"] == "Running", "the run was meant to die mid-way"
    fs = s3fs.S3FileSystem(**s3_server.storage_options())
    checkpoints = f"{s3_bucket}/killed/checkpoints"
    committed = int(fs.cat_file(f"{checkpoints}/latest").decode().removeprefix("step-"))
    assert committed in (4, 8)

    resumed = run_stage(tmp_path, config, env, name="resumed")
    assert_succeeded(resumed)
    assert f"resumed from {checkpoints}/step-{committed} at step {committed}" in resumed.output
    for step, loss in {**killed.losses, **resumed.losses}.items():
        assert loss == pytest.approx(whole.losses[step], rel=1e-5), f"step {step}"
    # The last save is waited for: the stage reports success with it committed, and keepLast 2 pruned.
    assert resumed.final["phase"] == "Succeeded"
    assert resumed.final["lastCheckpoint"] == f"{checkpoints}/step-12"
    fs.invalidate_cache()
    assert fs.cat_file(f"{checkpoints}/latest").decode() == "step-12"
    assert sorted(fs.ls(checkpoints, detail=False)) == [f"{checkpoints[5:]}/{name}"
                                                      for name in ("latest", "step-12", "step-8")]


def test_crash_during_a_background_upload_resumes_from_the_previous_checkpoint(
        tmp_path, synthetic_data, s3_server, s3_bucket):
    config = async_config(tmp_path, str(synthetic_data), s3_bucket, "crash", s3_server, steps=6, every_steps=2)
    env = s3_credentials(s3_server)
    # The upload of step 4 writes its data files, then hangs on both ranks while training goes on (to
    # step 5 at least; the save of step 6 would wait for it): the whole process tree is killed then.
    def upload_in_flight_and_step_5_done(lines: list[str]) -> bool:
        return uploads_held(lines, step=4) == 2 and any(line.startswith(LOG_PREFIX) and '"step": 5' in line
                                                       for line in lines)

    crashed = run_stage(tmp_path, config, {**env, HOLD_UPLOAD_ENV: "4"}, kill_when=upload_in_flight_and_step_5_done,
                        name="crashed")
    assert crashed.returncode < 0 and crashed.final["step"] >= 5, "the run was meant to die in the upload"

    fs = s3fs.S3FileSystem(**s3_server.storage_options())
    checkpoints = f"{s3_bucket}/crash/checkpoints"
    assert fs.find(f"{checkpoints}/step-4"), "the upload had written its data files"
    assert not fs.exists(f"{checkpoints}/step-4/state/.metadata")
    assert not fs.exists(f"{checkpoints}/step-4/COMMITTED")
    assert fs.cat_file(f"{checkpoints}/latest").decode() == "step-2"

    resumed = run_stage(tmp_path, config, env, name="resumed")
    assert_succeeded(resumed)
    assert f"resumed from {checkpoints}/step-2 at step 2" in resumed.output
    assert sorted(resumed.losses) == [3, 4, 5, 6]
    for step in range(3, crashed.final["step"] + 1):  # the steps the crashed run finished after its last commit
        assert resumed.losses[step] == pytest.approx(crashed.losses[step], rel=1e-5)
    fs.invalidate_cache()
    assert fs.exists(f"{checkpoints}/step-4/COMMITTED")
    assert fs.cat_file(f"{checkpoints}/latest").decode() == "step-6"


def test_sigterm_waits_for_the_upload_in_flight_to_commit(tmp_path, synthetic_data, s3_server, s3_bucket):
    config = async_config(tmp_path, str(synthetic_data), s3_bucket, "sigterm", s3_server, steps=12, every_steps=2)
    env = s3_credentials(s3_server)
    # The upload of step 4 is held 5 s after its data files; the pod is stopped (SIGTERM) meanwhile.
    stopped = run_stage(tmp_path, config, {**env, HOLD_UPLOAD_ENV: "4:5"}, name="stopped",
                        terminate_when=lambda lines: uploads_held(lines, step=4) == 2)
    assert stopped.returncode != 0 and stopped.final["step"] < 12, "the run was meant to stop mid-way"
    assert "SIGTERM: the checkpoint in flight is committed" in stopped.output

    fs = s3fs.S3FileSystem(**s3_server.storage_options())
    checkpoints = f"{s3_bucket}/sigterm/checkpoints"
    assert fs.exists(f"{checkpoints}/step-4/COMMITTED")
    assert fs.cat_file(f"{checkpoints}/latest").decode() == "step-4"
