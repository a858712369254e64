"""The RL learner under every strategy: one optimizer and schedule step per RL step, however many
micro-batches the step's completions take, and the same gradient as one micro-batch of them.

The learner's updates run in processes of their own, one rank (or two, on gloo) each
(learner_updates.py); the last test runs a whole `rl` stage under ZeRO-3 with real rollout and
reward workers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from integration.rl.pipeline import progress_lines, stage_config, synthetic, train_stage
from integration.rl.test_rl_stage import PRESET, rl_section, workers
from medmo_trainer.config import Hyperparameters
from medmo_trainer.optim import lr_multiplier

PROMPTS, GROUP = 2, 4
"""8 completions per RL step: 4 micro-batches of 2, or 1 of 8."""
STEPS = 3
SCHEDULE = {"learningRate": 1e-3, "lrScheduler": "cosine", "warmupRatio": 0.25, "maxSteps": 8,
            "maxGradNorm": 0.0}
"""Warmup then cosine decay: a different learning rate at each of the first steps. No clipping,
which would hide a gradient of the wrong scale."""

STRATEGIES = {
    "ddp": {"name": "ddp"},
    "fsdp": {"name": "fsdp"},
    "deepspeed-zero2": {"name": "deepspeed", "zeroStage": 2},
    "deepspeed-zero2-cpu-offload": {"name": "deepspeed", "zeroStage": 2, "offload": "cpu"},
    "deepspeed-zero3": {"name": "deepspeed", "zeroStage": 3},
}


@pytest.fixture(scope="module")
def grounding_data(tmp_path_factory):
    return synthetic(tmp_path_factory.mktemp("data") / "train", 16, 0, "train")


def rl_config(root: Path, data: Path, strategy: dict, micro_batch: int, rl: dict) -> Path:
    """An rl stage config of `strategy` on the schedule above, `micro_batch` completions per micro-batch."""
    path = stage_config(root, "grpo", "rl", PRESET, data, seed=0, steps=SCHEDULE["maxSteps"],
                        learning_rate=SCHEDULE["learningRate"], batch_size=micro_batch, rl=rl)
    config = yaml.safe_load(path.read_text())
    config["hyperparameters"].update(SCHEDULE)
    config["strategy"] = strategy
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def learner_updates(tmp_path_factory, grounding_data):
    """(strategy, micro-batch size, steps, ranks) -> what learner_updates.py recorded; each run once per module."""
    runs: dict[tuple, dict] = {}
    nowhere = {**rl_section([], [], group_size=GROUP, prompts=PROMPTS),
               "rolloutUrls": ["http://127.0.0.1:9"], "rewardUrls": ["http://127.0.0.1:9"]}

    def run(strategy: str, micro_batch: int, steps: int, ranks: int = 1) -> dict:
        key = (strategy, micro_batch, steps, ranks)
        if key not in runs:
            root = tmp_path_factory.mktemp(f"{strategy}-micro-{micro_batch}-ranks-{ranks}")
            config = rl_config(root, grounding_data, STRATEGIES[strategy], micro_batch, nowhere)
            out = root / "updates.pt"
            launch = ["-m", "medmo_trainer.launch", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else []
            script = Path(__file__).with_name("learner_updates.py")
            proc = subprocess.run([sys.executable, *launch, str(script), str(config), str(steps), str(out)],
                                  capture_output=True, text=True, timeout=600,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            runs[key] = torch.load(out)
        return runs[key]

    return run


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_each_rl_step_steps_the_optimizer_and_the_schedule_once(learner_updates, strategy):
    recorded = learner_updates(strategy, micro_batch=2, steps=STEPS)
    peak = SCHEDULE["learningRate"]
    multiplier = lr_multiplier(Hyperparameters.model_validate(SCHEDULE), SCHEDULE["maxSteps"])
    assert [u["optimizerSteps"] for u in recorded["updates"]] == [1] * STEPS
    assert [u["learning_rate"] for u in recorded["updates"]] == pytest.approx(
        [peak * multiplier(step) for step in range(STEPS)], rel=1e-6)
    assert recorded["learningRate"] == pytest.approx(peak * multiplier(STEPS), rel=1e-6)


@pytest.mark.parametrize(("strategy", "ranks"), [
    ("ddp", 1), ("deepspeed-zero2", 1), ("deepspeed-zero2-cpu-offload", 1), ("deepspeed-zero3", 1),
    pytest.param("ddp", 2, id="ddp-2-ranks"), pytest.param("deepspeed-zero2", 2, id="deepspeed-zero2-2-ranks"),
])
def test_micro_batches_of_an_rl_step_give_the_gradient_of_one_batch(learner_updates, strategy, ranks):
    """Each rank's completions in micro-batches of 2, or all at once: the same step."""
    split = learner_updates(strategy, micro_batch=2, steps=STEPS if ranks == 1 else 1, ranks=ranks)
    whole = learner_updates(strategy, micro_batch=PROMPTS * GROUP // ranks, steps=1, ranks=ranks)
    assert split["updates"][0]["optimizerSteps"] == whole["updates"][0]["optimizerSteps"] == 1
    assert split["gradient"].abs().sum() > 0
    torch.testing.assert_close(split["gradient"], whole["gradient"], rtol=1e-4, atol=1e-6)
    first_split, first_whole = split["updates"][0], whole["updates"][0]
    assert first_split["loss"] == pytest.approx(first_whole["loss"], rel=1e-4, abs=1e-7)
    assert first_split["grad_norm"] == pytest.approx(first_whole["grad_norm"], rel=1e-4)
    assert first_split["tokens"] == first_whole["tokens"]


def test_rl_stage_under_zero3_follows_its_schedule_and_checkpoints(start_worker, grounding_data, tmp_path):
    steps = 3
    with workers(start_worker, PRESET, rollouts=1, rewards=1) as (rollouts, rewards):
        path = rl_config(tmp_path, grounding_data, STRATEGIES["deepspeed-zero3"], micro_batch=2,
                         rl=rl_section(rollouts, rewards, group_size=GROUP, prompts=PROMPTS))
        config = yaml.safe_load(path.read_text())
        config["hyperparameters"]["maxSteps"] = steps
        config["checkpoint"] = {"everySteps": 2, "keepLast": 2}
        path.write_text(yaml.safe_dump(config))
        train_stage(path, tmp_path / "grpo.log")
    reports = progress_lines(tmp_path / "grpo.log")
    running = [r for r in reports if r["phase"] == "Running"]
    assert [r["step"] for r in running] == [1, 2, 3] and reports[-1]["phase"] == "Succeeded"
    multiplier = lr_multiplier(Hyperparameters.model_validate({**SCHEDULE, "maxSteps": steps}), steps)
    assert [r["metrics"]["learningRate"] for r in running] == pytest.approx(
        [SCHEDULE["learningRate"] * multiplier(step) for step in range(steps)], rel=1e-6)
    assert running[-1]["lastCheckpoint"] == f"{config['checkpointUri']}/step-2"
    assert reports[-1]["lastCheckpoint"] == f"{config['checkpointUri']}/step-3"
    assert (tmp_path / "grpo" / "model" / "model.safetensors").exists()
