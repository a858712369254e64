"""Weight sync per RL step: bytes moved and seconds, publishing only the trained tensors in bf16
against publishing the whole model in fp32 (what the learner did before).

For each case the learner's `PolicyPublisher` writes one version to storage, and a real rollout
worker (`python -m medmo_trainer.rl.rollout_server`) loads it by URI, as on a step: read once from
storage and copied into its model in place. Bytes moved per step = the file, written once and read
once per rollout replica (`--workers`).

    $(scripts/bootstrap.sh)/bin/python tests/benchmarks/bench_weight_sync.py [--model preset:tiny-qwen3-vl]
        [--workers 4] [--repeats 5]

The cases run interleaved through the benchmark harness (every case once per repeat); the
benchmark process and the rollout worker each have one thread.

A larger preset (`preset:qwen3-vl-2b-random`) gives figures closer to a real run; it needs a GPU or
about 20 GB of memory and minutes to build.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

import harness
from medmo_trainer.config import StageConfig
from medmo_trainer.gpu_check import worker
from medmo_trainer.model import apply_trainable, load_model
from medmo_trainer.stages.rl import PolicyPublisher

CASES = [
    ("whole model, fp32 (before)", ["vision", "projector", "language"], torch.float32),
    ("whole model, bf16", ["vision", "projector", "language"], torch.bfloat16),
    ("projector only (alignment), bf16", ["projector"], torch.bfloat16),
    ("projector + language model (sft), bf16", ["projector", "language"], torch.bfloat16),
]


def call(url: str, token: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def wait_ready(url: str, token: str) -> None:
    deadline = time.monotonic() + 600
    while True:
        try:
            call(f"{url}/readyz", token)
            return
        except urllib.error.HTTPError:  # 503 while the model loads
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="preset:tiny-qwen3-vl")
    parser.add_argument("--workers", type=int, default=4, help="rollout replicas each reading every version")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", type=Path, default=harness.RESULTS)
    args = parser.parse_args()
    harness.pin_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-weight-sync-") as scratch:
        storage = Path(scratch)
        token_file = storage / "token"
        token = secrets.token_hex(16)
        token_file.write_text(token)
        config = StageConfig.model_validate({
            "run": "bench", "stage": "grpo", "type": "rl", "model": {"base": args.model}, "storage": {"uri": scratch},
            "outputUri": f"{scratch}/model", "checkpointUri": f"{scratch}/ckpt", "datasets": [{"name": "d", "uri": scratch}],
            "rl": {"rolloutUrls": ["http://unused"], "rewardUrls": ["http://unused"]},
        })
        model = load_model(args.model).model
        env = harness.thread_env(1, {**os.environ, "MEDMO_PROGRESS_TOKEN_FILE": str(token_file)})
        with worker("medmo_trainer.rl.rollout_server", ["--model", args.model, "--storage-uri", scratch, "--threads", "1"],
                    env, storage / "worker.log") as url:
            wait_ready(url, token)
            versions = iter(range(1, 1_000_000))
            sizes: dict[str, tuple[int, int]] = {}

            def case(label: str, groups: list[str], dtype: torch.dtype):
                trained = set(apply_trainable(model, groups))
                state = {n: p.detach().clone() for n, p in model.named_parameters() if n in trained}
                publisher = PolicyPublisher(config, dtype)

                def measure() -> dict[str, float]:
                    version = next(versions)
                    started = time.perf_counter()
                    policy = publisher.publish(version, state)
                    published = time.perf_counter() - started
                    started = time.perf_counter()
                    call(f"{url}/v1/weights", token, {"version": version, "uri": policy.uri})
                    loaded = time.perf_counter() - started
                    sizes[label] = (sum(t.numel() for t in state.values()), publisher.last_bytes)
                    return {"publish s": published, "worker load s": loaded}
                return measure

            bench = harness.Benchmark("RL weight sync per step", [
                harness.Side(label, case(label, groups, dtype),
                             [harness.Process("learner (publisher)", 1), harness.Process("rollout worker", 1)])
                for label, groups, dtype in CASES
            ], repeats=args.repeats, higher_is_better={"publish s": False, "worker load s": False}).run()
    baseline = sizes[CASES[0][0]][1]
    bench.notes.append(f"model {args.model}; bytes moved per step = the file written once and read by each of "
                       f"{args.workers} rollout workers (one real worker is timed):")
    bench.notes.append("")
    bench.notes.append("| published | trained parameters | file | bytes moved per step | vs before |")
    bench.notes.append("|---|---|---|---|---|")
    for label, _, _ in CASES:
        params, size = sizes[label]
        bench.notes.append(f"| {label} | {params:,} | {size / 2**20:.2f} MiB | {size * (1 + args.workers) / 2**20:.2f} MiB "
                           f"| {size / baseline:.3f} |")
    bench.report(args.results)


if __name__ == "__main__":
    main()
