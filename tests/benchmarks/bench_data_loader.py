"""Training loader throughput: samples/s and tokens/s with batches prepared inline and by worker processes.

    python tests/benchmarks/bench_data_loader.py [--scans 200] [--batches 40] [--workers 2] [--repeats 5]

Each measurement runs in a fresh process, the sides interleaved (inline, workers, inline, ...), and
every process has one compute thread (OMP_NUM_THREADS=1 and torch threads 1 in the main process;
torch gives its loader workers one thread too), so the workers side is N+1 single-threaded
processes against one. Both see exactly the same batches (a batch is a pure function of its index).
Timing starts once the batches the workers prepared ahead are used up (the first
1 + 3 x workers x prefetch batches are not timed), so the rate is what the workers sustain,
and it is given per CPU-second too (all the side's processes, from /proc): on C cores the workers
side cannot exceed min(C, N+1) times the inline rate, and a per-CPU-second rate that differs
between the sides says one side does more work per sample.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import harness

PREFETCH = 2  # the loader's prefetch_factor


def cpu_seconds(pid: int | str) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(folder: str, workers: int, batches: int, batch_size: int, image_size: int) -> dict[str, float]:
    """One side in this process: samples/s and tokens/s over `batches` batches after the prepared-ahead ones."""
    import torch

    from medmo_trainer.config import DatasetSpec, Hyperparameters
    from medmo_trainer.inputs import build_train_loader
    from medmo_trainer.model import load_model

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(harness.thread_settings(), file=sys.stderr)
    processor = load_model("preset:tiny-qwen3-vl").processor
    hp = Hyperparameters(per_device_batch_size=batch_size, image_size=image_size)
    loader = build_train_loader([DatasetSpec(name="synthetic", uri=folder)], processor, hp, rank=0, world_size=1,
                                seed=0, num_workers=workers)
    for _ in range(1 + 3 * workers * PREFETCH):
        loader.next_batch()
    pids = ["self", *(w.pid for w in getattr(loader._prepared, "_workers", []))]  # torch's worker processes
    samples, tokens = loader.stats.samples, loader.stats.tokens
    cpu, started = sum(map(cpu_seconds, pids)), time.perf_counter()
    for _ in range(batches):
        loader.next_batch()
    seconds = time.perf_counter() - started
    cpu = sum(map(cpu_seconds, pids)) - cpu
    samples, tokens = loader.stats.samples - samples, loader.stats.tokens - tokens
    return {"samples/s": samples / seconds, "tokens/s": tokens / seconds, "samples per CPU-s": samples / cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", type=int, default=200)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", type=Path, default=harness.RESULTS)
    parser.add_argument("--measure-workers", type=int, help=argparse.SUPPRESS)  # internal: one side, in a child
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_workers is not None:
        figures = measure(args.data, args.measure_workers, args.batches, args.batch_size, args.image_size)
        print(json.dumps(figures))
        return

    from medmo_trainer.data.synthetic import generate

    with tempfile.TemporaryDirectory() as folder:
        generate(folder, args.scans, seed=0)

        def side(workers: int):
            command = [sys.executable, __file__, "--measure-workers", str(workers), "--data", folder,
                       "--batches", str(args.batches), "--batch-size", str(args.batch_size),
                       "--image-size", str(args.image_size)]
            return lambda: harness.run_child(command, threads=1)

        bench = harness.Benchmark("Data loader: inline against worker processes", [
            harness.Side("inline", side(0), [harness.Process("trainer", 1)]),
            harness.Side(f"{args.workers} worker processes", side(args.workers),
                         [harness.Process("trainer", 1), harness.Process("loader worker", 1, args.workers)]),
        ], repeats=args.repeats, notes=[
            f"{args.scans} synthetic scans, batch {args.batch_size}, image size {args.image_size}, {args.batches} timed "
            f"batches after the prepared-ahead ones; each repeat a fresh process. With {harness.cores()} cores the "
            f"workers side can be at most {min(harness.cores(), args.workers + 1)}x the inline one; "
            "samples per CPU-s counts every process of the side."]).run()
        bench.report(args.results)


if __name__ == "__main__":
    main()
