"""Fixtures of the training-loop tests (helpers to run stages are in trainer_loop_runs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from medmo_trainer.data.synthetic import generate


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 synthetic scans (about 130 records of all five tasks) with PNG images beside the shard."""
    folder = tmp_path_factory.mktemp("trainer-loop-data")
    generate(str(folder), n=24, seed=11, split="train")
    return folder
