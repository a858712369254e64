"""Which strategies save asynchronously with `checkpoint.async`, and the switch on the wire."""

from __future__ import annotations

import signal

import pytest
import torch

from medmo_trainer.checkpoint import CheckpointManager
from medmo_trainer.config import CheckpointPolicy
from medmo_trainer.dist import DistContext
from medmo_trainer.strategies import build_strategy
from unit.trainer_loop.test_checkpoint_identity import rl_config

ONE_RANK = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_async_is_off_unless_asked_and_spelled_async_on_the_wire():
    assert CheckpointPolicy().asynchronous is False
    assert CheckpointPolicy.model_validate({"async": True}).to_wire()["async"] is True


@pytest.mark.parametrize(("strategy", "asynchronous"), [
    ({"name": "ddp"}, True), ({"name": "fsdp"}, True), ({"name": "deepspeed", "zeroStage": 2}, False),
])
def test_deepspeed_saves_synchronously_even_when_async_is_asked(strategy, asynchronous, caplog):
    config = rl_config(**{"checkpoint.async": True, "strategy": strategy})
    before = signal.getsignal(signal.SIGTERM)
    manager = CheckpointManager(config, ONE_RANK, build_strategy(config, ONE_RANK))
    try:
        assert manager.asynchronous is asynchronous
        assert ("saves synchronously" in caplog.text) is not asynchronous
    finally:
        manager.close()
    assert signal.getsignal(signal.SIGTERM) == before, "close() gives SIGTERM back"


def test_a_manager_makes_no_staging_folder_until_a_strategy_needs_one(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    config = rl_config(strategy={"name": "ddp"})
    manager = CheckpointManager(config, ONE_RANK, build_strategy(config, ONE_RANK))
    assert list(tmp_path.iterdir()) == []  # a trainer killed now leaves nothing in /tmp
    staging = manager.staging  # what DeepSpeed's save and load use
    assert staging.parent == tmp_path and staging.is_dir() and manager.staging == staging
    manager.close()
    assert list(tmp_path.iterdir()) == []
