"""Weight sync: the learner publishes only the tensors that train, and a rollout worker reads each
published version from storage once, however many requests name it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from integration.rl.test_rl_strategies import STRATEGIES, rl_config
from integration.rl.test_rl_stage import rl_section
from integration.rl.test_rollout_server import call, wait_ready
from integration.rl.pipeline import synthetic
from medmo_trainer.config import StageConfig
from medmo_trainer.model import apply_trainable
from medmo_trainer.model.loading import load_model
from medmo_trainer.stages.rl import PolicyPublisher

PRESET = "preset:tiny-qwen3-vl"
PROJECTOR = ("model.visual.merger.", "model.visual.deepstack_merger_list.")

PUBLISH = """
import sys, yaml
from medmo_trainer.config import StageConfig
from medmo_trainer.dist import init_distributed, shutdown_distributed
from medmo_trainer.stages.rl import GRPOLearner
context = init_distributed()
learner = GRPOLearner.build(StageConfig.model_validate(yaml.safe_load(open(sys.argv[1]))), context)
try:
    policy = learner.publish(1)
    print("PUBLISHED", policy.uri, learner.sync.bytes)
finally:
    learner.close()
    shutdown_distributed()
"""


def _stage_config(storage: Path) -> StageConfig:
    return StageConfig.model_validate({
        "run": "sync", "stage": "grpo", "type": "rl", "model": {"base": PRESET, "trainable": ["projector"]},
        "storage": {"uri": str(storage)}, "outputUri": str(storage / "model"), "checkpointUri": str(storage / "ckpt"),
        "datasets": [{"name": "d", "uri": str(storage / "data")}],
        "rl": {"rolloutUrls": ["http://127.0.0.1:9"], "rewardUrls": ["http://127.0.0.1:9"]},
    })


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed-zero3"])  # the two that shard, so gather what they publish
def test_the_alignment_stage_publishes_only_the_projector(tmp_path, strategy):
    config = rl_config(tmp_path, synthetic(tmp_path / "data", 4, 0, "train"), STRATEGIES[strategy], 1,
                       {**rl_section([], [], group_size=2, prompts=1),
                        "rolloutUrls": ["http://127.0.0.1:9"], "rewardUrls": ["http://127.0.0.1:9"]})
    stage = yaml.safe_load(config.read_text())
    stage["model"]["trainable"] = ["projector"]
    config.write_text(yaml.safe_dump(stage))
    proc = subprocess.run([sys.executable, "-c", PUBLISH, str(config)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    uri, size = next(line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("PUBLISHED"))
    with safe_open(uri, framework="pt") as published:
        names = set(published.keys())
    model = load_model(PRESET).model
    expected = {name for name, _ in model.named_parameters() if name.startswith(PROJECTOR)}
    assert names == expected, f"published {sorted(names - expected)[:3]} beyond, {sorted(expected - names)[:3]} short"
    assert int(size) == Path(uri).stat().st_size
    everything = sum(p.numel() * p.element_size() for p in model.parameters())
    assert int(size) < everything / 4, "the projector is a small part of the model"


def test_published_weights_are_in_the_stages_compute_dtype(tmp_path):
    model = load_model(PRESET).model
    trained = set(apply_trainable(model, ["projector"]))
    state = {name: p.detach() for name, p in model.named_parameters() if name in trained}
    ref = PolicyPublisher(_stage_config(tmp_path), torch.bfloat16).publish(1, state)
    with safe_open(ref.uri, framework="pt") as published:
        assert {published.get_tensor(name).dtype for name in published.keys()} == {torch.bfloat16}


def test_a_worker_downloads_each_policy_version_once(start_worker, tmp_path_factory):
    storage = tmp_path_factory.getbasetemp() / "weight-sync"  # under the workers' storage
    model = load_model(PRESET).model
    trained = set(apply_trainable(model, ["projector"]))
    publisher = PolicyPublisher(_stage_config(storage), torch.bfloat16)
    state = {name: p.detach() for name, p in model.named_parameters() if name in trained}
    first, second = publisher.publish(1, state), publisher.publish(2, {k: v + 0.01 for k, v in state.items()})
    prompts = [{"id": "p", "messages": [{"role": "user", "content": [{"type": "text", "text": "Any nodule?"}]}]}]
    with start_worker("medmo_trainer.rl.rollout_server", "--model", PRESET, "--threads", "1") as handle:
        url = wait_ready(handle)

        def sample(policy) -> dict:
            status, out = call(f"{url}/v1/generate", {"prompts": prompts, "policy": policy.to_wire(),
                                                       "sampling": {"n": 2, "maxNewTokens": 4, "seed": 1}})
            assert status == 200, out
            return out

        assert sample(first)["policyVersion"] == 1
        assert sample(first)["tokensPerSecond"] > 0
        _, held = call(f"{url}/v1/policy")
        size = Path(first.uri).stat().st_size
        assert (held["weightFetches"], held["weightBytesFetched"]) == (1, size), "version 1 was read twice"
        assert sample(second)["policyVersion"] == 2
        _, held = call(f"{url}/v1/policy")
        assert (held["weightFetches"], held["weightBytesFetched"]) == (2, size + Path(second.uri).stat().st_size)
        assert held["generatedTokens"] > 0 and held["backend"] == "transformers"
