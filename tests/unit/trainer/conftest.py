"""Fixtures of the trainer's unit tests: small synthetic datasets and the tiny model presets."""

from __future__ import annotations

from pathlib import Path

import pytest

from medmo_trainer.config import Hyperparameters
from medmo_trainer.data.synthetic import generate
from medmo_trainer.model import LoadedModel, load_model


@pytest.fixture(scope="session")
def synthetic_train(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 synthetic scans (about 170 records of all five tasks) in one shard with PNG files beside it."""
    folder = tmp_path_factory.mktemp("synthetic-train")
    generate(str(folder), n=30, seed=3, split="train")
    return folder


@pytest.fixture(scope="session")
def synthetic_other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, smaller dataset (held-out split, embedded images) for mixtures."""
    folder = tmp_path_factory.mktemp("synthetic-other")
    generate(str(folder), n=12, seed=4, split="heldout", embed_images=True)
    return folder


@pytest.fixture(scope="session")
def tiny_qwen3() -> LoadedModel:
    """The tiny Qwen3-VL preset; tests must not change its weights or requires_grad flags."""
    return load_model("preset:tiny-qwen3-vl")


@pytest.fixture
def small_hp() -> Hyperparameters:
    """Settings that keep a batch tiny: 64-pixel images (4x4 patches of 16), 4 samples."""
    return Hyperparameters(per_device_batch_size=4, image_size=64, max_seq_length=256)
