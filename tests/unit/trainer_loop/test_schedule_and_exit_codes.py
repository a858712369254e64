"""Pure parts of the training loop: the learning-rate schedule, exit codes, the stage registry."""

from __future__ import annotations

import math

import pytest
import torch.distributed as dist

from medmo_trainer.entrypoint import classify
from medmo_trainer.config import Hyperparameters
from medmo_trainer.data import DatasetUnavailableError
from medmo_trainer.exit_codes import (
    NON_RETRYABLE,
    RETRYABLE,
    CheckpointIncompatibleError,
    ConfigError,
    ExitCode,
    StorageError,
)
from medmo_trainer.optim import lr_multiplier
from medmo_trainer.stages import get_runner, register


@pytest.mark.parametrize("scheduler", ["cosine", "linear", "constant"])
def test_warmup_rises_linearly_to_the_peak_then_the_schedule_decays(scheduler):
    multiplier = lr_multiplier(Hyperparameters(lr_scheduler=scheduler, warmup_ratio=0.1), total_steps=100)
    warmup = [multiplier(step) for step in range(10)]
    assert warmup == pytest.approx([(s + 1) / 11 for s in range(10)])
    assert multiplier(10) == pytest.approx(1.0)
    last = multiplier(99)
    expected_last = {"cosine": 0.5 * (1 + math.cos(math.pi * 89 / 90)), "linear": 1 / 90, "constant": 1.0}
    assert last == pytest.approx(expected_last[scheduler])
    decay = [multiplier(step) for step in range(10, 100)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False)), "no increase after warmup"


def test_exit_codes_split_into_failing_and_retryable_classes():
    assert set(NON_RETRYABLE) == {ExitCode.CONFIG_INVALID, ExitCode.DATA_INVALID, ExitCode.MODEL_INVALID,
                                  ExitCode.MODEL_ACCESS_DENIED, ExitCode.CHECKPOINT_INCOMPATIBLE}
    assert set(RETRYABLE) == {ExitCode.UNEXPECTED, ExitCode.STORAGE_UNAVAILABLE, ExitCode.DISTRIBUTED_FAILURE,
                              ExitCode.MODEL_HUB_UNAVAILABLE}
    assert not set(NON_RETRYABLE) & set(RETRYABLE)


@pytest.mark.parametrize(("error", "code"), [
    (DatasetUnavailableError("s3://b/data", "NoSuchBucket"), ExitCode.DATA_INVALID),
    (ConfigError("bad"), ExitCode.CONFIG_INVALID),
    (StorageError("s3 down"), ExitCode.STORAGE_UNAVAILABLE),
    (CheckpointIncompatibleError("written by another run"), ExitCode.CHECKPOINT_INCOMPATIBLE),
    (dist.DistNetworkError("peer lost"), ExitCode.DISTRIBUTED_FAILURE),
    (ConnectionResetError("reset"), ExitCode.STORAGE_UNAVAILABLE),
    (ZeroDivisionError("bug"), ExitCode.UNEXPECTED),
])
def test_failures_are_classified_by_type(error, code):
    assert classify(error) == code


def test_unknown_stage_type_is_a_config_error_listing_the_registered_ones():
    with pytest.raises(ConfigError, match="'distill' has no runner.*sft"):
        get_runner("sft") and get_runner("distill")


def test_registered_runner_is_found_by_its_stage_type():
    @register("unit-test-stage")
    def runner(config, context):
        return None

    assert get_runner("unit-test-stage") is runner
