"""Stages of a learning test run as a pod runs them (`python -m medmo_trainer --config`), on one thread,
so that several seeds' chains can run side by side on the 2 cores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

IMAGE_SIZE = 112
LEARNING_RATE, BATCH = 2e-3, 8


def stage(root: Path, name: str, kind: str, base: str, seed: int, **fields) -> dict:
    return {
        "run": f"learning-seed{seed}", "stage": name, "type": kind, "model": {"base": base},
        "storage": {"uri": str(root)}, "outputUri": str(root / name / "model"),
        "checkpointUri": str(root / name / "checkpoints"),
        "strategy": {"name": "ddp"}, "checkpoint": {"everySteps": 1000, "keepLast": 1}, **fields,
    }


def training(steps: int, seed: int, image_size: int = IMAGE_SIZE) -> dict:
    """Constant learning rate 2e-3, 8 samples a step, `image_size` px images (112 unless given)."""
    return {"learningRate": LEARNING_RATE, "maxSteps": steps, "perDeviceBatchSize": BATCH, "imageSize": image_size,
            "maxSeqLength": 512, "seed": seed, "lrScheduler": "constant", "warmupRatio": 0.0}


def run_stage(root: Path, config: dict) -> None:
    path = root / f"{config['stage']}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = root / f"{config['stage']}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDMO_TERMINATION_LOG": str(log) + ".term"}
    env.pop("MEDMO_PROGRESS_URL", None)
    with open(log, "w") as out:
        code = subprocess.run([sys.executable, "-m", "medmo_trainer", "--config", str(path)], stdout=out,
                              stderr=subprocess.STDOUT, env=env, timeout=1200).returncode
    assert code == 0, f"stage {config['stage']} exited {code}:\n{log.read_text()[-3000:]}"
