"""Throughput of the MedMO trainer against a plain transformers training loop, on CPU.

Both train the tiny Qwen3-VL preset on the same synthetic data with the same batch size and the
same loader (same seed, so the same batches and tokens). The plain loop is model(**batch).loss,
backward, clip, AdamW step. The trainer is `Trainer.build(...).train()` of a one-rank stage for each
strategy, with all its overheads (progress reports, loss all-reduce, skipped-record counts, the
schedule) except the checkpoint and export at the end: its time is read from the per-step progress
timestamps between the warm-up step and the last step. Each loop runs in a fresh process.

    $(scripts/bootstrap.sh)/bin/python tests/benchmarks/bench_trainer.py [--steps 40] [--warmup 5]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from medmo_trainer.config import StageConfig
from medmo_trainer.data.synthetic import generate
from medmo_trainer.dist import init_distributed
from medmo_trainer.inputs import build_train_loader
from medmo_trainer.model import load_model
from medmo_trainer.progress import LOG_PREFIX, ProgressReporter
from medmo_trainer.stages.training import Trainer, seed_everything

BATCH_SIZE = 4
LEARNING_RATE = 1e-3


def stage_config(folder: Path, data: Path, steps: int, strategy: dict) -> StageConfig:
    return StageConfig.model_validate({
        "run": "bench", "stage": "sft", "type": "sft",
        "model": {"base": "preset:tiny-qwen3-vl"},
        "storage": {"uri": str(folder)},
        "outputUri": str(folder / "model"), "checkpointUri": str(folder / "checkpoints"),
        "datasets": [{"name": "synthetic", "uri": str(data)}],
        "hyperparameters": {"learningRate": LEARNING_RATE, "maxSteps": steps, "perDeviceBatchSize": BATCH_SIZE,
                            "imageSize": 64, "maxSeqLength": 256, "lrScheduler": "constant", "warmupRatio": 0.0},
        "strategy": strategy,
        "checkpoint": {"everySteps": steps},
    })


def step_tokens(config: StageConfig, steps: int) -> list[int]:
    """Tokens of each step's batch (both loops draw the same batches from the same loader)."""
    loaded = load_model(config.model)
    loader = build_train_loader(config.datasets, loaded.processor, config.hyperparameters,
                                rank=0, world_size=1, seed=config.hyperparameters.seed)
    tokens = []
    for _ in range(steps):
        before = loader.stats.tokens
        loader.next_batch()
        tokens.append(loader.stats.tokens - before)
    return tokens


def plain_loop_seconds(config: StageConfig, steps: int, warmup: int) -> float:
    """Seconds of steps warmup+1..steps of a plain transformers + AdamW loop."""
    seed_everything(config.hyperparameters.seed)
    loaded = load_model(config.model)
    model = loaded.model.train()
    loader = build_train_loader(config.datasets, loaded.processor, config.hyperparameters,
                                rank=0, world_size=1, seed=config.hyperparameters.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    batches = iter(loader)
    started = 0.0
    for step in range(1, steps + 1):
        loss = model(**next(batches)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        if step == warmup:
            started = time.perf_counter()
    return time.perf_counter() - started


def trainer_seconds(config: StageConfig, steps: int, warmup: int) -> float:
    """Seconds of steps warmup+1..steps of the MedMO trainer, from its progress timestamps."""
    trainer = Trainer.build(config, init_distributed())
    stream = io.StringIO()
    trainer.reporter = ProgressReporter(enabled=True, stream=stream)
    try:
        trainer.train()
    finally:
        trainer.close()
    reports = [json.loads(line.removeprefix(LOG_PREFIX)) for line in stream.getvalue().splitlines()]
    at = {r["step"]: r["timestamp"] for r in reports if r["phase"] == "Running"}
    return at[steps] - at[warmup]


STRATEGIES = {"ddp": {"name": "ddp"}, "fsdp": {"name": "fsdp"},
              "deepspeed zero-2": {"name": "deepspeed", "zeroStage": 2}}
PLAIN = "plain transformers + AdamW"


def measure_one(loop: str, data: Path, steps: int, warmup: int) -> float:
    """Seconds of the measured steps of one loop (run in a fresh process by `main`)."""
    with tempfile.TemporaryDirectory(prefix="medmo-bench-run-") as tmp:
        if loop == PLAIN:
            return plain_loop_seconds(stage_config(Path(tmp), data, steps, STRATEGIES["ddp"]), steps, warmup)
        return trainer_seconds(stage_config(Path(tmp), data, steps, STRATEGIES[loop]), steps, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each loop; the median time counts")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one loop, in a child process
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps({"seconds": measure_one(args.measure, Path(args.data), args.steps, args.warmup)}))
        return
    measured = args.steps - args.warmup

    with tempfile.TemporaryDirectory(prefix="medmo-bench-") as tmp:
        data = Path(tmp) / "data"
        generate(str(data), n=60, seed=1, split="train")
        base = stage_config(Path(tmp), data, args.steps, STRATEGIES["ddp"])
        tokens = sum(step_tokens(base, args.steps)[args.warmup:])
        samples = measured * BATCH_SIZE
        rows = []
        # Each loop runs in its own process, in turn, so none inherits another's warm caches.
        times: dict[str, list[float]] = {loop: [] for loop in [PLAIN, *STRATEGIES]}
        for _ in range(args.repeats):
            for loop in times:
                times[loop].append(_measure_in_child(loop, data, args))
        rows = [(loop if loop == PLAIN else f"medmo trainer, {loop}", statistics.median(t)) for loop, t in times.items()]

    baseline = rows[0][1]
    print(f"tiny Qwen3-VL, CPU ({torch.get_num_threads()} threads), 1 rank, batch {BATCH_SIZE}, "
          f"{measured} measured steps after {args.warmup} warm-up, {tokens} tokens, median of {args.repeats}")
    print(f"| {'loop':<36} | {'samples/s':>9} | {'tokens/s':>9} | {'vs plain':>8} |")
    print(f"|{'-' * 38}|{'-' * 11}|{'-' * 11}|{'-' * 10}|")
    for label, seconds in rows:
        print(f"| {label:<36} | {samples / seconds:>9.1f} | {tokens / seconds:>9.0f} | {baseline / seconds:>8.2f} |")


def _measure_in_child(loop: str, data: Path, args: argparse.Namespace) -> float:
    command = [sys.executable, __file__, "--measure", loop, "--data", str(data),
               "--steps", str(args.steps), "--warmup", str(args.warmup)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["seconds"]


if __name__ == "__main__":
    main()
