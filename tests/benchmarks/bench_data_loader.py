"""Training loader throughput: samples/s and tokens/s with batches prepared inline and by worker processes.

    python tests/benchmarks/bench_data_loader.py [--scans 200] [--batches 60] [--workers 2] [--image-size 128]

Prints one line per configuration and the ratio of the worker configuration to the inline one. Both
see exactly the same batches (the loader's batches are a pure function of their index).
"""

from __future__ import annotations

import argparse
import tempfile
import time

from medmo_trainer.config import DatasetSpec, Hyperparameters
from medmo_trainer.data.synthetic import generate
from medmo_trainer.inputs import build_train_loader
from medmo_trainer.model import load_model


def measure(spec, processor, hp, workers: int, batches: int) -> tuple[float, float]:
    loader = build_train_loader(spec, processor, hp, rank=0, world_size=1, seed=0, num_workers=workers)
    for _ in range(1 + 2 * workers):  # start-up, and the batches workers prepared ahead, are not steady state
        loader.next_batch()
    samples, tokens = loader.stats.samples, loader.stats.tokens
    started = time.perf_counter()
    for _ in range(batches):
        loader.next_batch()
    seconds = time.perf_counter() - started
    return (loader.stats.samples - samples) / seconds, (loader.stats.tokens - tokens) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", type=int, default=200)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args()
    processor = load_model("preset:tiny-qwen3-vl").processor
    hp = Hyperparameters(per_device_batch_size=args.batch_size, image_size=args.image_size)
    with tempfile.TemporaryDirectory() as folder:
        generate(folder, args.scans, seed=0)
        spec = [DatasetSpec(name="synthetic", uri=folder)]
        inline = measure(spec, processor, hp, 0, args.batches)
        workers = measure(spec, processor, hp, args.workers, args.batches)
    print(f"inline:            {inline[0]:8.1f} samples/s  {inline[1]:10.0f} tokens/s")
    print(f"{args.workers} worker processes: {workers[0]:8.1f} samples/s  {workers[1]:10.0f} tokens/s")
    print(f"ratio workers/inline: {workers[0] / inline[0]:.2f}")


if __name__ == "__main__":
    main()
