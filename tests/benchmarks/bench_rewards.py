"""Reward scoring speed: box-reward scorings per second per core in-process, and the reward worker over HTTP.

    python tests/benchmarks/bench_rewards.py [--completions 4096] [--repeats 5] [--batch 256] [--compare-commit REV]

Realistic grounding completions (seeded): 1-5 true boxes per record (sent as the controller sends
a record: its labelled boxes and its answer text), 1-5 predicted boxes near them
(jittered, sometimes missed or extra, sometimes labelled in two groups), with `<think>`/`<answer>`
text around them; about 1 in 8 is malformed (reversed corners, three numbers, a word for a number,
no closing tag, or no box at all). Every side runs on one thread in one process, and its rate per
core is completions per CPU-second it used (its thread's; over HTTP the client thread's plus the
worker process's, from /proc):

- box reward in-process: `BoxReward()(prompts, completions, task=..., boxes=...)` over the whole set;
- reward suite in-process: all four components the worker computes (`RewardSuite`; label accuracy
  parses the answer and the completion again), same set;
- reward worker, HTTP: a real `python -m medmo_trainer.rl.reward_server` (1 thread), sent the set in
  requests of `--batch` items from one client process (the client's own JSON work is in the time:
  the client waits for each response before sending the next request, so one core is busy at a time).

The worker's HTTP overhead per completion is its time per completion minus the in-process suite's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import harness

TESTS = Path(__file__).resolve().parents[1]


def completions(n: int, seed: int = 0) -> tuple[list[str], list[list[dict]]]:
    """`n` grounding completions and their records' labelled boxes, about 1 in 8 malformed."""
    rng = random.Random(seed)
    texts, references = [], []
    for _ in range(n):
        truths = []
        for _ in range(rng.randint(1, 5)):
            x1, y1 = rng.randint(0, 800), rng.randint(0, 800)
            truths.append([x1, y1, x1 + rng.randint(10, 200), y1 + rng.randint(10, 200)])
        predicted = [[v + rng.randint(-40, 40) for v in box] for box in truths if rng.random() > 0.15]
        predicted += [[x, y, x + 50, y + 60] for x, y in ((rng.randint(0, 900), rng.randint(0, 900))
                                                          for _ in range(rng.randint(0, 2)))]
        predicted = [box for box in predicted if box[2] >= box[0] and box[3] >= box[1]][:5] or [truths[0]]
        entries = [f"[{box[0]}, {box[1]}, {box[2]}, {box[3]}]" for box in predicted]
        kind = rng.random()
        if kind < 0.03:
            entries[0] = f"[{predicted[0][2]}, {predicted[0][1]}, {predicted[0][0] - 5}, {predicted[0][3]}]"  # reversed
        elif kind < 0.06:
            entries[-1] = f"[{predicted[-1][0]}, {predicted[-1][1]}, {predicted[-1][2]}]"  # three numbers
        elif kind < 0.08:
            entries[0] = "[left, 10, 20, 30]"
        if len(entries) > 2 and rng.random() < 0.3:
            answer = (f"Lesion <box>[{', '.join(entries[:2])}]</box>; mass <box>[{', '.join(entries[2:])}]</box>")
        else:
            answer = f"Lesion <box>[{', '.join(entries)}]</box>"
        if 0.08 <= kind < 0.10:
            answer = answer.removesuffix("</box>")  # no closing tag: no block found
        elif 0.10 <= kind < 0.125:
            answer = "I cannot find a lesion in this image."
        texts.append(f"<think>The scan shows {len(truths)} findings.</think><answer>{answer}</answer>")
        references.append([{"label": "lesion", "box": box} for box in truths])
    return texts, references


def answer_text(reference: list[dict]) -> str:
    """The record's answer, as the controller sends it beside its boxes."""
    return "Lesion <box>[" + ", ".join(str(b["box"]) for b in reference) + "]</box>"


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def figures(n: int, cpu_s: float, wall_s: float) -> dict[str, float]:
    return {"scorings per CPU-s (per core)": n / cpu_s, "us CPU per completion": 1e6 * cpu_s / n,
            "scorings/s (wall)": n / wall_s}


def reward_of_commit(commit: str, folder: Path):
    """BoxReward as it was at `commit` (its rewards and boxes modules, loaded from git under other names)."""
    import importlib
    import subprocess

    for module, name in (("medmo_trainer/boxes.py", "boxes_then"), ("medmo_trainer/rl/rewards.py", "rewards_then")):
        text = subprocess.run(["git", "-C", str(harness.REPO), "show", f"{commit}:{module}"], check=True,
                              capture_output=True, text=True).stdout
        Path(folder, f"{name}.py").write_text(text.replace("from medmo_trainer.boxes import", "from boxes_then import"))
    sys.path.insert(0, folder)
    return importlib.import_module("rewards_then").BoxReward


def box_reward_side_of(reward_class, texts, references):
    prompts, tasks = [None] * len(texts), ["grounding"] * len(texts)

    def measure() -> dict[str, float]:
        reward = reward_class()
        cpu, wall = time.thread_time(), time.perf_counter()
        reward(prompts, texts, task=tasks, boxes=references)
        return figures(len(texts), time.thread_time() - cpu, time.perf_counter() - wall)
    return measure


def suite_side(texts, references):
    from medmo_trainer.config import RewardWeights
    from medmo_trainer.rl.rewards import RewardSuite

    n = len(texts)
    columns = {"task": ["grounding"] * n, "boxes": references, "answer": [answer_text(r) for r in references],
               "options": [None] * n, "completion_length": [24] * n}

    def measure() -> dict[str, float]:
        suite = RewardSuite(RewardWeights(), 512)
        cpu, wall = time.thread_time(), time.perf_counter()
        suite([None] * n, texts, **columns)
        return figures(n, time.thread_time() - cpu, time.perf_counter() - wall)
    return measure


def http_side(url: str, token: str, worker_pid: int, texts, references, batch: int):
    bodies = []
    for start in range(0, len(texts), batch):
        items = [{"completion": t, "completionLength": 24,
                  "reference": {"task": "grounding", "answer": answer_text(r), "boxes": r}}
                 for t, r in zip(texts[start:start + batch], references[start:start + batch])]
        bodies.append(json.dumps({"maxCompletionLength": 512, "items": items}).encode())
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def measure() -> dict[str, float]:
        cpu, worker_cpu, wall = time.thread_time(), cpu_seconds(worker_pid), time.perf_counter()
        scored = 0
        for body in bodies:
            request = urllib.request.Request(f"{url}/v1/score", data=body, headers=headers)
            with urllib.request.urlopen(request, timeout=300) as response:
                scored += len(json.loads(response.read())["rewards"])
        wall = time.perf_counter() - wall
        cpu = time.thread_time() - cpu + cpu_seconds(worker_pid) - worker_cpu
        assert scored == len(texts)
        return figures(scored, cpu, wall)
    return measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--completions", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256, help="completions per HTTP request")
    parser.add_argument("--compare-commit", help="also measure the box reward as it was at this commit (first side)")
    parser.add_argument("--results", type=Path, default=harness.RESULTS)
    args = parser.parse_args()
    harness.pin_threads(1)
    from medmo_trainer.rl.rewards import BoxReward
    sys.path.insert(0, str(TESTS))
    from integration.rl.conftest import worker
    from medmo_trainer.rl.http import TOKEN_FILE_ENV

    texts, references = completions(args.completions)
    with tempfile.TemporaryDirectory(prefix="bench-rewards-") as folder:
        token = secrets.token_hex(16)
        Path(folder, "token").write_text(token)
        os.environ[TOKEN_FILE_ENV] = str(Path(folder, "token"))  # the worker reads the run's token from it
        with worker("medmo_trainer.rl.reward_server") as server:
            one = [harness.Process("benchmark", threads=1)]
            sides = [
                *([harness.Side(f"box reward at {args.compare_commit}, in-process",
                                box_reward_side_of(reward_of_commit(args.compare_commit, folder), texts, references),
                                one)] if args.compare_commit else []),
                harness.Side("box reward, in-process", box_reward_side_of(BoxReward, texts, references), one),
                harness.Side("reward suite (4 components), in-process", suite_side(texts, references), one),
                harness.Side(f"reward worker over HTTP, {args.batch} per request",
                             http_side(server.url, token, server.proc.pid, texts, references, args.batch),
                             [harness.Process("client", 1), harness.Process("reward worker", 1)]),
            ]
            bench = harness.Benchmark(
                "Reward scoring", sides, repeats=args.repeats, warmup=1, higher_is_better={"us CPU per completion": False},
                notes=[f"{args.completions} grounding completions (1-5 true and predicted boxes, 1 in 8 malformed); "
                       f"target 50,000 box-reward scorings/s per core in-process. Rates per core are per CPU-second "
                       f"of the scoring thread (the worker's: its process's), so other load on the machine does not "
                       f"lower them; wall rates do depend on it."]).run()
    suite_us = harness.spread(bench.results[-2].values("us CPU per completion"))[0]
    http_us = harness.spread(bench.results[-1].values("us CPU per completion"))[0]
    bench.notes.append(f"HTTP overhead: {http_us - suite_us:.1f} us of CPU per completion (client and worker: "
                       f"{http_us:.1f} over HTTP against {suite_us:.1f} for the same scoring in-process; medians).")
    bench.report(args.results)


if __name__ == "__main__":
    main()
