"""Weight sync per RL step: bytes moved and seconds, publishing only the trained tensors in bf16
against publishing the whole model in fp32 (what the learner did before).

For each case the learner's `PolicyPublisher` writes one version to storage, and a real rollout
worker (`python -m medmo_trainer.rl.rollout_server`) loads it by URI, as on a step: read once from
storage and copied into its model in place. Bytes moved per step = the file, written once and read
once per rollout replica (`--workers`).

    $(scripts/bootstrap.sh)/bin/python tests/benchmarks/bench_weight_sync.py [--model preset:tiny-qwen3-vl]
        [--workers 4] [--repeats 3]

A larger preset (`preset:qwen3-vl-2b-random`) gives figures closer to a real run; it needs a GPU or
about 20 GB of memory and minutes to build.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

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
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
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
        env = {**os.environ, "MEDMO_PROGRESS_TOKEN_FILE": str(token_file)}
        rows = []
        with worker("medmo_trainer.rl.rollout_server", ["--model", args.model, "--storage-uri", scratch], env,
                    storage / "worker.log") as url:
            wait_ready(url, token)
            version = 0
            for label, groups, dtype in CASES:
                trained = set(apply_trainable(model, groups))
                state = {n: p.detach() for n, p in model.named_parameters() if n in trained}
                publisher = PolicyPublisher(config, dtype)
                publish, load = [], []
                for _ in range(args.repeats):
                    version += 1
                    started = time.perf_counter()
                    policy = publisher.publish(version, state)
                    publish.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    call(f"{url}/v1/weights", token, {"version": version, "uri": policy.uri})
                    load.append(time.perf_counter() - started)
                size = publisher.last_bytes
                rows.append((label, sum(state[n].numel() for n in state), size, statistics.median(publish),
                             statistics.median(load)))
    baseline = rows[0][2]
    print(f"model {args.model}, {args.workers} rollout workers, median of {args.repeats}\n")
    print("| published | trained parameters | file | bytes moved per step | vs before | publish s | worker load s |")
    print("|---|---|---|---|---|---|---|")
    for label, params, size, publish, load in rows:
        moved = size * (1 + args.workers)
        print(f"| {label} | {params:,} | {size / 2**20:.2f} MiB | {moved / 2**20:.2f} MiB | {size / baseline:.3f} "
              f"| {publish:.3f} | {load:.3f} |")


if __name__ == "__main__":
    main()
