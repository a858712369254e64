"""The CPU RL pipeline of the tests and the benchmark: synthetic grounding data, a short SFT warm-up
of the tiny Qwen3-VL, the GRPO stage config, and held-out box-reward evaluation.

Everything is real: `python -m medmo_trainer` runs the stages, workers are separate processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from medmo_cases import progress_lines as reports_in

from medmo_trainer.rl.rewards import BoxReward

IMAGE_SIZE = 112
MAX_COMPLETION_TOKENS = 72
"""A three-box grounding answer is 65 tokens (numbers are written digit by digit) and its end of turn."""


def run(cmd: list[str], log: Path, timeout: float = 900, env: dict | None = None) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        proc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout,
                              env={**os.environ, "MEDMO_TERMINATION_LOG": str(log) + ".term", **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{log.read_text()[-4000:]}")


def synthetic(out: Path, n: int, seed: int, split: str) -> Path:
    if not any(out.glob("*.jsonl")):
        run([sys.executable, "-m", "medmo_trainer.data.synthetic", "--out", str(out), "--n", str(n),
             "--seed", str(seed), "--split", split], out.with_suffix(".log"))
    return out


def stage_config(root: Path, stage: str, stage_type: str, model: str, data: Path, *, seed: int,
                 steps: int, learning_rate: float, batch_size: int, rl: dict | None = None) -> Path:
    config = {
        "run": "rl-test",
        "stage": stage,
        "type": stage_type,
        "model": {"base": model},
        "storage": {"uri": str(root / "storage")},
        "outputUri": str(root / stage / "model"),
        "checkpointUri": str(root / stage / "checkpoints"),
        "datasets": [{"name": "grounding", "uri": str(data), "tasks": ["grounding"]}],
        "hyperparameters": {
            "learningRate": learning_rate, "maxSteps": steps, "perDeviceBatchSize": batch_size,
            "imageSize": IMAGE_SIZE, "maxSeqLength": 512, "seed": seed, "warmupRatio": 0.0,
            "lrScheduler": "constant", "packing": False,
        },
        "strategy": {"name": "ddp"},
        "checkpoint": {"everySteps": 1000, "keepLast": 1},
    }
    if rl is not None:
        config["rl"] = rl
    path = root / f"{stage}.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def train_stage(config: Path, log: Path, nproc: int = 1, timeout: float = 900, env: dict | None = None) -> None:
    if nproc == 1:
        run([sys.executable, "-m", "medmo_trainer", "--config", str(config)], log, timeout, env)
    else:
        run([sys.executable, "-m", "medmo_trainer.launch", "--standalone", f"--nproc-per-node={nproc}",
             "-m", "medmo_trainer", "--config", str(config)], log, timeout, env)


def heldout_grounding(model_uri: str, data: Path, limit: int = 24, samples: int = 0, seed: int = 0) -> dict[str, float]:
    """Mean box reward and mean IoU (the eval stage's: each true box's matched IoU) on held-out
    grounding records: of greedy answers (`samples` 0), or of `samples` answers per record drawn at
    temperature 1 (the policy's expected reward and IoU), seeded."""
    from medmo_trainer.eval.metrics import grounding_summary, score_grounding

    from medmo_trainer.data import iter_records
    from medmo_trainer.model import load_model
    from medmo_trainer.rl.prompts import Prompt, encode_prompts

    loaded = load_model(model_uri)
    model, processor = loaded.model.eval(), loaded.processor
    records = list(iter_records(str(data), ["grounding"]))[:limit]
    per_record = max(samples, 1)
    sampling = {"do_sample": True, "temperature": 1.0, "top_k": 0, "num_return_sequences": samples} if samples else {"do_sample": False}
    texts = []
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(records), 8):
            chunk = records[start : start + 8]
            prompts = [Prompt(record=r.model_dump(mode="json", by_alias=True)) for r in chunk]
            inputs = encode_prompts(processor, prompts, IMAGE_SIZE)
            out = model.generate(**inputs, max_new_tokens=MAX_COMPLETION_TOKENS, **sampling,
                                 eos_token_id=processor.tokenizer.eos_token_id,
                                 pad_token_id=processor.tokenizer.pad_token_id)
            texts += processor.batch_decode(out[:, inputs["input_ids"].shape[1] :])
    boxes = [[b.model_dump(mode="json") for b in r.boxes] for r in records for _ in range(per_record)]
    rewards = BoxReward()([None] * len(texts), texts, task=["grounding"] * len(texts), boxes=boxes)
    ious = [iou for text, truths in zip(texts, boxes) for iou in score_grounding(text, [t["box"] for t in truths]).ious]
    return {"boxReward": float(sum(rewards) / len(rewards)), "iou": grounding_summary(ious)["groundingMiou"]}


def progress_lines(log: Path) -> list[dict]:
    """The progress reports a stage printed in its log file."""
    return reports_in(log.read_text())
