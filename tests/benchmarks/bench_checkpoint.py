"""Checkpoint saves on SeaweedFS S3: an asynchronous save (`checkpoint.async`) against a synchronous one
and against a raw s3fs put of the same bytes.

One rank (a gloo group of one, as `medmo run` without torchrun) trains a plain MLP of `--megabytes` of
fp32 weights under the DDP strategy for one AdamW step, so a checkpoint holds weights and both Adam
moments (about 3x `--megabytes`). Each repeat:

- raw s3fs put: `pipe_file` of the files of a committed checkpoint (its DCP data and metadata, trainer
  state, marker), read into memory beforehand, to a fresh prefix: the storage's speed for these bytes;
- synchronous save: `CheckpointManager.save` of a new step (training blocked for all of it);
- asynchronous save: `CheckpointManager.save` with `checkpoint.async` (blocked: until it returns, the
  copy to CPU memory and the upload started), then `wait()` until it has committed.

Upload speed = checkpoint bytes / seconds until committed (for the raw put, until the last put returned).
While the asynchronous upload runs this benchmark's thread only waits: on a training node the upload
shares the CPU with training.

    $(scripts/bootstrap.sh)/bin/python tests/benchmarks/bench_checkpoint.py [--megabytes 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))  # tests/ holds the shared test modules

import harness  # noqa: E402
from controlplane.seaweed import SeaweedFS  # noqa: E402

BUCKET = "s3://bench-checkpoint"


def stage_config(root: str, asynchronous: bool):
    from medmo_trainer.config import StageConfig

    return StageConfig.model_validate({
        "run": "bench-checkpoint", "stage": "sft", "type": "sft", "runUid": "bench",
        "model": {"base": "preset:tiny-qwen3-vl"},
        "storage": {"uri": BUCKET}, "outputUri": f"{root}/model", "checkpointUri": f"{root}/checkpoints",
        "datasets": [{"name": "none", "uri": f"{BUCKET}/none"}],
        "strategy": {"name": "ddp"},
        # Nothing is pruned while timing (earlier repeats' folders are deleted untimed): every side
        # writes the same bytes, the saves with their commit protocol (marker, `latest`, listings).
        "checkpoint": {"everySteps": 1, "keepLast": 1000, "async": asynchronous},
    })


def trained_strategy(megabytes: int, config):
    """The DDP strategy over an MLP of `megabytes` of fp32 weights, after one AdamW step (so it has moments)."""
    import torch

    from medmo_trainer.dist import init_distributed
    from medmo_trainer.strategies import build_strategy

    width = 1024
    layers = max(1, megabytes * 2**20 // (4 * width * width))
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))
    context = init_distributed()
    strategy = build_strategy(config, context)
    strategy.prepare(model, total_steps=10, micro_batches_per_step=1)
    strategy.backward(strategy.model(torch.randn(8, width)).square().mean(), last_micro_step=True)
    strategy.optimizer_step()
    return context, strategy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=32, help="fp32 weights of the model (the checkpoint: ~3x)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", type=Path, default=harness.RESULTS)
    args = parser.parse_args()
    harness.pin_threads(1)

    with tempfile.TemporaryDirectory() as folder, SeaweedFS(Path(folder) / "seaweedfs") as server:
        os.environ.update(server.env())
        from medmo_trainer.checkpoint import CheckpointManager
        from medmo_trainer.fsio import url_to_fs

        fs, _ = url_to_fs(BUCKET)
        fs.mkdir(BUCKET)
        context, strategy = trained_strategy(args.megabytes, stage_config(f"{BUCKET}/sync", False))
        synchronous = CheckpointManager(stage_config(f"{BUCKET}/sync", False), context, strategy)
        asynchronous = CheckpointManager(stage_config(f"{BUCKET}/async", True), context, strategy)
        assert asynchronous.asynchronous

        # The bytes of one committed checkpoint, for the raw put.
        synchronous.save(0, {})
        _, first = url_to_fs(synchronous.uri_of(0))
        files = {path.removeprefix(first): fs.cat_file(path) for path in fs.find(first)}
        size = sum(map(len, files.values()))
        print(f"checkpoint: {len(files)} files, {size / 2**20:.1f} MiB", flush=True)
        steps = iter(range(1, 10_000))
        megabytes = size / 2**20

        def forget(uri: str) -> None:
            """Deletes what earlier repeats wrote under `uri` (untimed): every timed save starts from an empty
            folder, so its listings do not grow with the repeats and it prunes nothing."""
            _, root = url_to_fs(uri)
            if fs.exists(root):
                fs.rm(root, recursive=True)
            fs.invalidate_cache()

        def raw_put() -> dict[str, float]:
            forget(f"{BUCKET}/raw")
            prefix = f"{BUCKET}/raw/{next(steps)}"
            started = time.perf_counter()
            for name, data in files.items():
                fs.pipe_file(f"{prefix}{name}", data)
            seconds = time.perf_counter() - started
            return {"upload MiB/s": megabytes / seconds, "seconds to committed": seconds}

        def sync_save() -> dict[str, float]:
            forget(synchronous.root)
            started = time.perf_counter()
            synchronous.save(next(steps), {})
            seconds = time.perf_counter() - started
            return {"upload MiB/s": megabytes / seconds, "seconds to committed": seconds, "training blocked s": seconds}

        def async_save() -> dict[str, float]:
            forget(asynchronous.root)
            started = time.perf_counter()
            asynchronous.save(next(steps), {})
            blocked = time.perf_counter() - started
            asynchronous.wait()
            seconds = time.perf_counter() - started
            return {"upload MiB/s": megabytes / seconds, "seconds to committed": seconds, "training blocked s": blocked}

        layout = [harness.Process("trainer (1 rank)", 1), harness.Process("SeaweedFS (weed server)", 0)]
        bench = harness.Benchmark("Checkpoint saves (SeaweedFS S3)", [
            harness.Side("raw s3fs put", raw_put, layout),
            harness.Side("synchronous save", sync_save, layout),
            harness.Side("asynchronous save", async_save, layout),
        ], repeats=args.repeats, warmup=1,
            higher_is_better={"seconds to committed": False, "training blocked s": False}).run()
        synchronous.close()
        asynchronous.close()

    def median(side: int, metric: str) -> float:
        return statistics.median(bench.results[side].values(metric))

    speed = median(2, "upload MiB/s") / median(0, "upload MiB/s")
    blocked = median(2, "training blocked s") / median(1, "training blocked s")
    bench.notes.extend([
        "",
        f"A checkpoint of a {args.megabytes} MiB fp32 MLP after one AdamW step: {len(files)} files, "
        f"{megabytes:.1f} MiB (weights and both moments). The benchmark's thread only waits during the asynchronous "
        "upload; on a training node, training shares the CPU with it.",
        f"Asynchronous upload speed: {speed:.0%} of raw s3fs put (target >= 70 %); training blocked by an "
        f"asynchronous save: {blocked:.1%} of a synchronous save's time (target < 10 %).",
    ])
    bench.report(args.results)


if __name__ == "__main__":
    main()
