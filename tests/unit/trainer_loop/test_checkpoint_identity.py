"""What a checkpoint records of its stage's config, how a mismatch of tensors is put into words, and
which failures to read a checkpoint are retried."""

from __future__ import annotations

import traceback

from torch.distributed.checkpoint.api import CheckpointException

from medmo_trainer.checkpoint import classify_reading_failure, config_sections, describe_mismatch
from medmo_trainer.config import StageConfig
from medmo_trainer.exit_codes import CheckpointIncompatibleError, ExitCode, StorageError


def rl_config(**changes) -> StageConfig:
    wire = {
        "run": "medmo", "runUid": "uid-1", "stage": "grpo", "type": "rl",
        "model": {"base": "s3://bucket/runs/medmo/instruct/model", "trainable": ["projector", "language"]},
        "storage": {"uri": "s3://bucket/runs/medmo"},
        "outputUri": "s3://bucket/runs/medmo/grpo/model", "checkpointUri": "s3://bucket/runs/medmo/grpo/checkpoints",
        "datasets": [{"name": "boxes", "uri": "s3://data/boxes/"}],
        "hyperparameters": {"learningRate": 1e-6, "maxSteps": 100},
        "strategy": {"name": "deepspeed", "zeroStage": 2},
        "checkpoint": {"everySteps": 10, "keepLast": 2},
        "rl": {"algorithm": {"groupSize": 8}, "rolloutUrls": ["http://rollout:8000"],
               "rewardUrls": ["http://reward:8000"], "rolloutRequestsPerStep": 4},
    }
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        target = wire
        for key in parents:
            target = target[key]
        target[leaf] = value
    return StageConfig.model_validate(wire)


def changed_sections(**changes) -> list[str]:
    before, after = config_sections(rl_config()), config_sections(rl_config(**changes))
    return [name for name in before if before[name] != after[name]]


def test_what_changes_training_changes_the_recorded_config():
    assert changed_sections(**{"hyperparameters.learningRate": 2e-6}) == ["hyperparameters"]
    assert changed_sections(**{"model.trainable": ["projector"]}) == ["model"]
    assert changed_sections(**{"model.base": "s3://bucket/runs/medmo/ground/model"}) == ["model"]
    assert changed_sections(**{"datasets": [{"name": "boxes", "uri": "s3://data/boxes-v2/"}]}) == ["datasets"]
    assert changed_sections(**{"strategy.zeroStage": 3}) == ["strategy"]
    assert changed_sections(**{"rl.algorithm.groupSize": 4}) == ["rl"]


def test_where_and_how_often_do_not_change_the_recorded_config():
    """Replica counts, worker addresses, storage, checkpoint policy and the run's identity are not training."""
    assert changed_sections(**{
        "rl.rolloutUrls": ["http://rollout-0:8000", "http://rollout-1:8000"], "rl.rolloutRequestsPerStep": 8,
        "checkpoint.everySteps": 50, "checkpoint.async": True, "storage.uri": "s3://elsewhere/runs/medmo", "runUid": "uid-2",
        "checkpointUri": "s3://elsewhere/runs/medmo/grpo/checkpoints",
    }) == []


def test_a_field_added_later_with_a_default_leaves_older_checkpoints_resumable():
    """A trainer upgrade that adds a defaulted field (here to every dataset) hashes as before it;
    setting the new field to anything else is a change."""

    class UpgradedDataset(type(rl_config().datasets[0])):
        shuffleBuffer: int = 1000

    before = config_sections(rl_config())
    upgraded = rl_config()
    upgraded.datasets = [UpgradedDataset(**upgraded.datasets[0].model_dump())]
    assert config_sections(upgraded) == before
    upgraded.datasets = [UpgradedDataset(**{**upgraded.datasets[0].model_dump(), "shuffleBuffer": 10})]
    assert config_sections(upgraded)["datasets"] != before["datasets"]


def test_a_mismatch_names_missing_unexpected_and_reshaped_tensors():
    model = {"merger.fc1.weight": [128, 128], "merger.fc2.weight": [64, 128], "merger.norm.weight": [32]}
    checkpoint = {"merger.fc1.weight": [192, 192], "merger.fc2.weight": [64, 128], "lm_head.weight": [512, 64]}
    words = describe_mismatch(expected=model, found=checkpoint)
    assert "1 trained tensors of the model are not in the checkpoint (merger.norm.weight)" in words
    assert "1 tensors of the checkpoint are not trained in the model (lm_head.weight)" in words
    assert "merger.fc1.weight: checkpoint [192, 192], model [128, 128]" in words
    assert "merger.fc2.weight" not in words
    assert describe_mismatch(expected=model, found=dict(model)) == ""


def test_a_long_mismatch_shows_a_few_names_and_counts_the_rest():
    model = {f"layer.{i}.weight": [8] for i in range(12)}
    words = describe_mismatch(expected=model, found={})
    assert words.startswith("12 trained tensors of the model are not in the checkpoint (layer.0.weight, ")
    assert words.endswith("and 7 more)")


def test_reading_a_checkpoint_fails_retryably_only_when_storage_failed():
    """Contents that do not load (DCP wraps each rank's error) cannot be cured by a retry; storage can."""
    def on_rank(error: BaseException) -> CheckpointException:
        return CheckpointException("load failed", {0: (error, traceback.StackSummary())})

    refused = classify_reading_failure("loading checkpoint s3://b/c/step-4",
                                       on_rank(RuntimeError("Missing key in checkpoint state_dict: model.x")))
    assert isinstance(refused, CheckpointIncompatibleError) and refused.exit_code == ExitCode.CHECKPOINT_INCOMPATIBLE
    assert "loading checkpoint s3://b/c/step-4 failed" in str(refused) and "model.x" in str(refused)
    for storage_trouble in (on_rank(ConnectionResetError("reset by peer")), PermissionError("AccessDenied")):
        assert isinstance(classify_reading_failure("loading checkpoint", storage_trouble), StorageError)
    assert isinstance(classify_reading_failure("reading the marker", ValueError("Expecting value")),
                      CheckpointIncompatibleError)
