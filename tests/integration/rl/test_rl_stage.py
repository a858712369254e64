"""The `rl` stage end to end on CPU: real torchrun learner ranks, rollout and reward worker processes."""

import contextlib
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from integration.rl.pipeline import progress_lines, stage_config, synthetic, train_stage
from integration.trainer_loop.trainer_loop_runs import assert_succeeded, run_stage

PRESET = "preset:tiny-qwen3-vl"


def rl_section(rollouts, rewards, steps_overlap: int = 0, group_size: int = 4, prompts: int = 2) -> dict:
    return {
        "algorithm": {"groupSize": group_size, "promptsPerStep": prompts, "maxCompletionLength": 16,
                      "maxStaleness": steps_overlap},
        "rewards": {"accuracy": 0.0, "bbox": 1.0, "format": 0.0, "overlong": 0.0},
        "rolloutUrls": [w.url for w in rollouts],
        "rewardUrls": [w.url for w in rewards],
        "requestTimeoutSeconds": 60,
    }


@contextlib.contextmanager
def workers(start_worker, model: str, rollouts: int = 2, rewards: int = 2):
    with contextlib.ExitStack() as stack:
        yield (
            [stack.enter_context(start_worker("medmo_trainer.rl.rollout_server", "--model", model, "--threads", "1"))
             for _ in range(rollouts)],
            [stack.enter_context(start_worker("medmo_trainer.rl.reward_server")) for _ in range(rewards)],
        )


@pytest.fixture(scope="module")
def grounding_data(tmp_path_factory):
    return synthetic(tmp_path_factory.mktemp("data") / "train", 16, 0, "train")


def test_two_rank_learner_reports_rewards_and_publishes_versions(start_worker, grounding_data, tmp_path):
    with workers(start_worker, PRESET) as (rollouts, rewards):
        config = stage_config(tmp_path, "grpo", "rl", PRESET, grounding_data, seed=0, steps=3,
                              learning_rate=1e-3, batch_size=4, rl=rl_section(rollouts, rewards))
        train_stage(config, tmp_path / "grpo.log", nproc=2)
    reports = progress_lines(tmp_path / "grpo.log")
    running = [r for r in reports if r["phase"] == "Running"]
    assert [r["step"] for r in running] == [1, 2, 3] and reports[-1]["phase"] == "Succeeded"
    for report in running:
        metrics = report["metrics"]
        assert 0.0 <= metrics["reward/bbox"] <= 1.0 and metrics["rewardStd/bbox"] >= 0.0
        assert metrics["rolloutTokensPerSecond"] > 0 and "clipFraction" in metrics and "kl" in metrics
        # step t was sampled from the version published after step t-1
        assert metrics["policyVersion"] == report["step"] - 1
    assert (tmp_path / "grpo" / "model" / "model.safetensors").exists()
    published = sorted(p.name for p in (tmp_path / "storage" / "grpo" / "policy").glob("*/v-*.safetensors"))
    assert published == ["v-2.safetensors", "v-3.safetensors"]  # older versions are pruned


def test_one_step_overlap_bounds_staleness(start_worker, grounding_data, tmp_path):
    with workers(start_worker, PRESET, rollouts=1, rewards=1) as (rollouts, rewards):
        config = stage_config(tmp_path, "grpo", "rl", PRESET, grounding_data, seed=0, steps=3,
                              learning_rate=1e-3, batch_size=4, rl=rl_section(rollouts, rewards, steps_overlap=1))
        train_stage(config, tmp_path / "grpo.log")
    running = [r for r in progress_lines(tmp_path / "grpo.log") if r["phase"] == "Running"]
    # batch t+1 is generated while the learner updates to t: from version t-1, never older
    assert [r["metrics"]["policyVersion"] for r in running] == [0, 0, 1]


def test_killing_a_rollout_and_a_reward_worker_mid_run_the_run_finishes(start_worker, grounding_data, tmp_path):
    steps = 8
    with workers(start_worker, PRESET) as (rollouts, rewards):
        config = stage_config(tmp_path, "grpo", "rl", PRESET, grounding_data, seed=0, steps=steps,
                              learning_rate=1e-3, batch_size=4, rl=rl_section(rollouts, rewards))
        log = tmp_path / "grpo.log"
        with open(log, "w") as handle:
            learner = subprocess.Popen([sys.executable, "-m", "medmo_trainer", "--config", str(config)],
                                       stdout=handle, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not re.search(r'"step": 2,', log.read_text()):
                assert learner.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            rollouts[0].proc.send_signal(signal.SIGKILL)
            rewards[1].proc.send_signal(signal.SIGKILL)
            assert learner.wait(timeout=600) == 0, log.read_text()[-3000:]
        finally:
            if learner.poll() is None:
                learner.kill()
                learner.wait()
    reports = progress_lines(log)
    assert reports[-1]["phase"] == "Succeeded" and reports[-1]["step"] == steps
    last = [r for r in reports if r["phase"] == "Running"][-1]["counters"]
    assert last["rolloutFailovers"] >= 1 and last["rewardFailovers"] >= 1


@pytest.mark.parametrize("strategy", [{"name": "ddp"}, {"name": "deepspeed", "zeroStage": 2}], ids=["ddp", "deepspeed-zero2"])
def test_a_killed_stage_resumes_with_the_losses_of_an_uninterrupted_run(strategy, start_worker, grounding_data, tmp_path):
    """Killed after step 3, with the checkpoint of step 2 committed, the stage resumes at step 3 and
    republishes that policy as version 2; each step's loss, gradient norm and reward are those of a run
    never interrupted, and the resumed steps and checkpoints are traced as a training stage's are."""
    with workers(start_worker, PRESET, rollouts=1, rewards=1) as (rollouts, rewards):
        def config(name: str) -> dict:
            path = stage_config(tmp_path / name, "grpo", "rl", PRESET, grounding_data, seed=0, steps=4,
                                learning_rate=1e-3, batch_size=4, rl=rl_section(rollouts, rewards))
            return {**yaml.safe_load(path.read_text()), "checkpoint": {"everySteps": 2, "keepLast": 2},
                    "strategy": strategy}

        whole = run_stage(tmp_path, config("whole"), name="whole")
        assert_succeeded(whole)
        interrupted = config("interrupted")
        killed = run_stage(tmp_path, interrupted, kill_after_step=3, name="killed")
        resumed = run_stage(tmp_path, interrupted, {"OTEL_TRACES_EXPORTER": "console"}, name="resumed")
    assert killed.returncode < 0 and killed.final["phase"] == "Running", "the run was meant to die mid-way"
    assert_succeeded(resumed)
    running = [r for r in resumed.reports if r["phase"] == "Running"]
    assert [r["step"] for r in running] == [3, 4]
    assert [r["metrics"]["policyVersion"] for r in running] == [2, 3]
    assert running[0]["lastCheckpoint"] == f"{interrupted['checkpointUri']}/step-2"
    uninterrupted = {r["step"]: r["metrics"] for r in whole.reports if r["phase"] == "Running"}
    for report in [r for r in killed.reports if r["phase"] == "Running"] + running:
        for metric in ("loss", "gradNorm", "reward/total"):
            expected = uninterrupted[report["step"]][metric]
            assert report["metrics"][metric] == pytest.approx(expected, rel=1e-5), f"step {report['step']} {metric}"
    spans = re.findall(r'"name": "(medmo\.[a-z]+)"', resumed.output)
    assert spans.count("medmo.step") == 2 and spans.count("medmo.checkpoint") == 1
