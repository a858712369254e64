"""The streaming loader at the paper's scale: does a rank's memory or start-up grow with the dataset?

Builds synthetic datasets of 10k, 100k and 1M records on SeaweedFS S3 (JSONL shards of 10k records
with their `medmo-index.json`, the layout `medmo data index` leaves; every
record points at one of a pool of 64 scan PNGs, fetched when a sample is made), then, for each size,
starts 2 ranks at once, each a fresh process with 2 loader worker processes, and reports per rank:

- peak RSS (VmHWM) of the rank's process from the moment it builds the loader (the model code, torch
  and the processor, loaded before, are the same at every size; the peak is reset after them), the
  loader's own share of it (that peak minus the RSS just before), and the peak of its largest worker
  process (forked from the rank, so it counts the pages it shares with it);
- time to first batch: from building the loader to holding its first batch;
- samples/s over the following batches.

It also measures what the tiny trainer consumes: samples/s of forward, backward and AdamW steps of
the tiny Qwen3-VL preset on the same batches, one rank, in this process (one thread). Sizes are
measured interleaved through the benchmark harness, `--repeats` times; every rank and worker
process has one thread (OMP_NUM_THREADS=1), and each repeat's figure is the larger of the two
ranks' (memory, time to first batch) or their mean (samples/s).

    $(scripts/bootstrap.sh)/bin/python tests/benchmarks/bench_data_streaming.py \\
        [--sizes 10000 100000 1000000] [--repeats 5] [--batches 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))  # tests/ holds the shared test modules

import harness  # noqa: E402
from controlplane.seaweed import SeaweedFS  # noqa: E402

from medmo_trainer.config import DatasetSpec, Hyperparameters  # noqa: E402
from medmo_trainer.data import iter_records  # noqa: E402
from medmo_trainer.data.shards import Shard, write_index  # noqa: E402
from medmo_trainer.data.synthetic import generate  # noqa: E402
from medmo_trainer.fsio import join, url_to_fs  # noqa: E402

SHARD_RECORDS = 10_000
PRESET = "preset:tiny-qwen3-vl"


def hyperparameters(args) -> Hyperparameters:
    # the tiny recipe's settings (manifests/samples/medmo-tiny.yaml)
    return Hyperparameters(per_device_batch_size=args.batch_size, image_size=80, max_seq_length=256)


def build_dataset(bucket: str, size: int, pool: list[dict]) -> str:
    """`size` records cycling over the pool's, each with its own id, as JSONL shards with an index."""
    uri = f"{bucket}/n{size}"
    fs, root = url_to_fs(uri)
    shards = []
    for start in range(0, size, SHARD_RECORDS):
        lines = []
        for i in range(start, min(size, start + SHARD_RECORDS)):
            record = pool[i % len(pool)]
            lines.append(json.dumps(record | {"id": f"r{i:07d}-{record['id']}"}))
        path = join(root, f"part-{len(shards):05d}.jsonl")
        fs.pipe_file(path, ("\n".join(lines) + "\n").encode())
        shards.append(Shard(fs.unstrip_protocol(path), len(lines), {"caption": len(lines)}))
    write_index(uri, shards)
    return uri


def memory_mib(pid: int | str = "self", field: str = "VmRSS") -> float:
    """A process's resident memory (VmRSS) or its peak (VmHWM), from /proc."""
    with open(f"/proc/{pid}/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith(field + ":"))
    return kib / 1024


def rank_main(args) -> None:
    """One rank: build the loader, time its first batch and the next ones, report memory (one JSON line)."""
    from medmo_trainer.inputs import build_train_loader
    from medmo_trainer.model import load_model

    print(harness.thread_settings(), file=sys.stderr)
    processor = load_model(PRESET).processor
    spec = [DatasetSpec(name="bench", uri=args.uri)]
    before = memory_mib()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from here: model loading is not the loader's
    started = time.perf_counter()
    loader = build_train_loader(spec, processor, hyperparameters(args), rank=args.rank, world_size=2, seed=0,
                                num_workers=args.workers)
    loader.next_batch()
    first_batch = time.perf_counter() - started
    samples, started = loader.stats.samples, time.perf_counter()
    for _ in range(args.batches):
        loader.next_batch()
    rate = (loader.stats.samples - samples) / (time.perf_counter() - started)
    peak = memory_mib(field="VmHWM")
    workers = getattr(loader._prepared, "_workers", [])  # torch's worker processes, while they run
    workers_peak = max((memory_mib(w.pid, "VmHWM") for w in workers), default=0.0)
    print(json.dumps({"rank": args.rank, "before": before, "peak": peak, "workersPeak": workers_peak,
                      "firstBatch": first_batch, "samplesPerS": rate}))


def measure_ranks(uri: str, args) -> list[dict]:
    """Both ranks of one size, started together."""
    command = [sys.executable, __file__, "--rank-of", uri, "--batches", str(args.batches),
               "--batch-size", str(args.batch_size), "--workers", str(args.workers)]
    ranks = [subprocess.Popen([*command, "--rank", str(rank)], stdout=subprocess.PIPE, text=True,
                              env=harness.thread_env(1)) for rank in (0, 1)]
    results = []
    for process in ranks:
        out, _ = process.communicate()
        if process.returncode:
            raise SystemExit(f"rank exited with {process.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def trainer_rate(uri: str, args, steps: int = 12, warmup: int = 2) -> float:
    """Samples/s the tiny trainer consumes: forward, backward, AdamW step, one rank, batches made beforehand."""
    import torch

    from medmo_trainer.inputs import build_train_loader
    from medmo_trainer.model import load_model

    loaded = load_model(PRESET, seed=0)
    loader = build_train_loader([DatasetSpec(name="bench", uri=uri)], loaded.processor, hyperparameters(args),
                                rank=0, world_size=1, seed=0)
    batches = [loader.next_batch() for _ in range(steps)]
    per_batch = loader.stats.samples / steps
    model = loaded.model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for index, batch in enumerate(batches):
        if index == warmup:
            started = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return per_batch * (steps - warmup) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--results", type=Path, default=harness.RESULTS)
    parser.add_argument("--rank-of", dest="uri", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.uri:
        return rank_main(args)
    harness.pin_threads(1)

    with tempfile.TemporaryDirectory() as folder, SeaweedFS(Path(folder) / "seaweedfs") as server:
        os.environ.update(server.env())
        fs, _ = url_to_fs("s3://bench")
        fs.mkdir("bench")
        generate("s3://bench/pool", n=64, seed=0)
        pool = [r.model_dump(mode="json", by_alias=True, exclude_defaults=True)
                for r in iter_records("s3://bench/pool", tasks=["caption"])]
        uris = {}
        for size in args.sizes:
            started = time.perf_counter()
            uris[size] = build_dataset("s3://bench", size, pool)
            print(f"built {size} records in {time.perf_counter() - started:.0f} s", flush=True)
        consumed = trainer_rate(uris[args.sizes[0]], args)
        print(f"tiny trainer consumes {consumed:.1f} samples/s (1 rank, 1 thread, batch {args.batch_size})", flush=True)

        def side(size: int):
            def measure() -> dict[str, float]:
                ranks = measure_ranks(uris[size], args)
                return {
                    "rank peak RSS MiB": max(r["peak"] for r in ranks),
                    "loader's share of it MiB": max(r["peak"] - r["before"] for r in ranks),
                    "largest worker peak RSS MiB": max(r["workersPeak"] for r in ranks),
                    "time to first batch s": max(r["firstBatch"] for r in ranks),
                    "samples/s per rank": sum(r["samplesPerS"] for r in ranks) / len(ranks),
                }
            return measure

        layout = [harness.Process("rank", 1, 2), harness.Process("loader worker", 1, 2 * args.workers)]
        bench = harness.Benchmark("Streaming loader at scale (SeaweedFS S3)", [
            harness.Side(f"{size:,} records", side(size), layout) for size in args.sizes
        ], repeats=args.repeats, higher_is_better={"rank peak RSS MiB": False, "loader's share of it MiB": False,
                                                   "largest worker peak RSS MiB": False, "time to first batch s": False},
            notes=[f"JSONL shards of {SHARD_RECORDS:,} records with their index, images fetched per sample; 2 ranks "
                   f"started together, each with {args.workers} loader workers, batch {args.batch_size} at imageSize 80 "
                   f"(the tiny recipe), {args.batches} batches timed after the first. The tiny trainer consumes "
                   f"{consumed:.1f} samples/s (forward, backward, AdamW; one rank, one thread). Ratios against the "
                   "smallest size: memory and time to first batch should not grow with the dataset (ratio near 1)."],
        ).run()
    bench.report(args.results)


if __name__ == "__main__":
    main()
