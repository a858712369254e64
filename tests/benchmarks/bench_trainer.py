"""Throughput of the MedMO trainer against a plain transformers training loop, on CPU.

Both train the tiny Qwen3-VL preset on the same synthetic data with the same batch size and the
same loader (same seed, so the same batches and tokens). The plain loop is model(**batch).loss,
backward, clip, AdamW step. The trainer is `Trainer.build(...).train()` of a one-rank stage for each
strategy, with all its overheads (progress reports, loss all-reduce, skipped-record counts, the
schedule) except the checkpoint and export at the end: its time is read from the per-step progress
timestamps between the warm-up step and the last step. Each loop runs in a fresh process.

    $(scripts/bootstrap.sh)/bin/python tests/benchmarks/bench_trainer.py [--steps 20] [--warmup 4] [--repeats 5]
        [--loops ddp,fsdp,deepspeed zero-2] [--threads N]

Every loop's process gets the same torch threads (--threads, default all cores), and the loops run
interleaved (plain, ddp, ..., plain, ddp, ...) through the benchmark harness.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import harness
from medmo_trainer.config import StageConfig
from medmo_trainer.data.synthetic import generate
from medmo_trainer.dist import init_distributed
from medmo_trainer.inputs import build_train_loader
from medmo_trainer.model import load_model
from medmo_trainer.progress import LOG_PREFIX, ProgressReporter
from medmo_trainer.stages.training import Trainer, seed_everything

BATCH_SIZE = 4
LEARNING_RATE = 1e-3


def stage_config(folder: Path, data: Path, steps: int, strategy: dict, *, batch_size: int = BATCH_SIZE,
                 max_seq_length: int = 256, packing: bool = True) -> StageConfig:
    """A one-rank sft stage of the tiny preset on `data` (this benchmark's and bench_packing's)."""
    return StageConfig.model_validate({
        "run": "bench", "stage": "sft", "type": "sft",
        "model": {"base": "preset:tiny-qwen3-vl"},
        "storage": {"uri": str(folder)},
        "outputUri": str(folder / "model"), "checkpointUri": str(folder / "checkpoints"),
        "datasets": [{"name": "bench", "uri": str(data)}],
        "hyperparameters": {"learningRate": LEARNING_RATE, "maxSteps": steps, "perDeviceBatchSize": batch_size,
                            "imageSize": 64, "maxSeqLength": max_seq_length, "lrScheduler": "constant",
                            "warmupRatio": 0.0, "packing": packing},
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


def loop_arguments(description: str, steps: int, warmup: int) -> argparse.ArgumentParser:
    """The options every loop-against-loop benchmark takes (this one's and bench_packing's)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each loop, interleaved")
    parser.add_argument("--threads", type=int, default=harness.cores(), help="torch threads of every loop's process")
    parser.add_argument("--results", type=Path, default=harness.RESULTS)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one loop, in a child process
    parser.add_argument("--data", help=argparse.SUPPRESS)
    return parser


def print_child_seconds(measure) -> None:
    """In a loop's child process: its threads as given, then the seconds `measure()` returns, as JSON."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    print(harness.thread_settings(), file=sys.stderr)
    print(json.dumps({"seconds": measure()}))


def main() -> None:
    parser = loop_arguments(__doc__.splitlines()[0], steps=20, warmup=4)
    parser.add_argument("--loops", default=",".join(STRATEGIES), help=f"strategies beside the plain loop ({', '.join(STRATEGIES)})")
    args = parser.parse_args()
    if args.measure:
        print_child_seconds(lambda: measure_one(args.measure, Path(args.data), args.steps, args.warmup))
        return
    measured = args.steps - args.warmup
    loops = [PLAIN, *(loop.strip() for loop in args.loops.split(",") if loop.strip())]

    with tempfile.TemporaryDirectory(prefix="medmo-bench-") as tmp:
        data = Path(tmp) / "data"
        generate(str(data), n=60, seed=1, split="train")
        base = stage_config(Path(tmp), data, args.steps, STRATEGIES["ddp"])
        tokens = sum(step_tokens(base, args.steps)[args.warmup:])
        samples = measured * BATCH_SIZE

        def side(loop: str):
            command = [sys.executable, __file__, "--measure", loop, "--data", str(data),
                       "--steps", str(args.steps), "--warmup", str(args.warmup)]

            def measure() -> dict[str, float]:
                seconds = harness.run_child(command, threads=args.threads)["seconds"]
                return {"samples/s": samples / seconds, "tokens/s": tokens / seconds}
            return measure

        # Each loop runs in its own fresh process, so none inherits another's warm caches.
        bench = harness.Benchmark("Trainer against a plain transformers loop", [
            harness.Side(loop if loop == PLAIN else f"medmo trainer, {loop}", side(loop),
                         [harness.Process("trainer", args.threads)]) for loop in loops
        ], repeats=args.repeats, notes=[
            f"Tiny Qwen3-VL on CPU, 1 rank, batch {BATCH_SIZE}: {measured} measured steps after {args.warmup} "
            f"warm-up steps, {tokens} tokens, the same batches on every side. A difference inside the sides' "
            "min-max ranges is noise, not a speed-up."]).run()
        bench.report(args.results)


if __name__ == "__main__":
    main()
