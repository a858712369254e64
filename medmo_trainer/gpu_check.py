"""A GPU check anyone with one GPU can run: the trainer's GPU paths measured, as one table.

    scripts/gpu-check.sh                   on a GPU: Qwen3-VL 2B (and 8B when memory allows), in bf16
    scripts/gpu-check.sh --cpu --tiny      anywhere: the same table from the tiny preset on CPU, in fp32

Rows: SFT steps with packing under FSDP2 and under DeepSpeed ZeRO-3 (tokens/s, MFU, peak GPU memory,
measured over the steps after the first), rollout tokens/s with the transformers backend and with
vLLM, and one GRPO step end to end (rollout and reward workers as processes, the learner as
`python -m medmo_trainer`, as in a run's pods). Each measurement runs in a process of its own, so
one's GPU memory never counts against the next; a part that cannot run here (vLLM without a GPU or
not installed) is a row saying why, and a part that fails is a row with its error. Models are
random-initialised from the released configs (`preset:qwen3-vl-<size>-random`): no weights are
downloaded. MFU and FLOPs are defined in `medmo_trainer.flops`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

RESULT_PREFIX = "GPU-CHECK-RESULT "
"""How a part's process hands its row to the parent (one JSON line on stdout)."""


@dataclass(frozen=True)
class Profile:
    """Sizes of one check: the GPU one, or the tiny CPU one (same parts, same table)."""

    models: tuple[str, ...]
    """SFT models; the first also serves rollout and GRPO."""
    sft_steps: int
    samples_per_row: int
    """Samples packed into each row (perDeviceBatchSize)."""
    max_seq_length: int
    image_size: int
    scans: int
    """Synthetic scans generated as data (about 5 records each)."""
    rollout_prompts: int
    group_size: int
    completion_tokens: int
    precision: str


GPU = Profile(models=("preset:qwen3-vl-2b-random",), sft_steps=6, samples_per_row=64, max_seq_length=1024,
              image_size=448, scans=96, rollout_prompts=16, group_size=8, completion_tokens=256, precision="bf16")
CPU_TINY = Profile(models=("preset:tiny-qwen3-vl",), sft_steps=3, samples_per_row=4, max_seq_length=256,
                   image_size=64, scans=4, rollout_prompts=2, group_size=2, completion_tokens=8, precision="fp32")
LARGE_GPU_GIB = 120
"""GPU memory from which the 8B model's SFT row is added (FSDP2 on one GPU, bf16)."""


@dataclass
class Row:
    """One line of the table."""

    check: str
    model: str
    setup: str
    tokens_per_second: float | None = None
    mfu: float | None = None
    peak_gpu_memory_gib: float | None = None
    notes: str = ""


COLUMNS = ("check", "model", "setup", "tokens/s", "MFU", "peak GPU memory", "notes")


def format_table(rows: list[Row], header: str) -> str:
    """A Markdown table (what the README holds)."""

    def cells(row: Row) -> list[str]:
        return [row.check, row.model.removeprefix("preset:"), row.setup,
                "—" if row.tokens_per_second is None else f"{row.tokens_per_second:,.0f}",
                "—" if row.mfu is None else f"{100 * row.mfu:.1f} %",
                "—" if row.peak_gpu_memory_gib is None else f"{row.peak_gpu_memory_gib:.1f} GiB",
                row.notes]

    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells(row)) + " |" for row in rows]
    return "\n".join(lines)


# -- the parts, each run in its own process -----------------------------------------------------


def synthetic_data(work: Path, profile: Profile) -> Path:
    from medmo_trainer.data.synthetic import generate

    folder = work / "data"
    if not any(folder.glob("*.jsonl")):
        generate(str(folder), n=profile.scans, seed=0, split="train")
    return folder


def part_sft(profile: Profile, work: Path, model: str, strategy: str) -> Row:
    """SFT steps with packing; the first step (allocation, kernel selection) is not measured."""
    from medmo_trainer.config import StageConfig
    from medmo_trainer.dist import init_distributed, shutdown_distributed
    from medmo_trainer.stages.training import Trainer

    name, _, zero = strategy.partition("-zero")
    config = StageConfig.model_validate({
        "run": "gpu-check", "stage": f"sft-{strategy}", "type": "sft", "model": {"base": model},
        "storage": {"uri": str(work)}, "outputUri": str(work / "model"), "checkpointUri": str(work / "checkpoints"),
        "datasets": [{"name": "synthetic", "uri": str(synthetic_data(work, profile))}],
        "hyperparameters": {"maxSteps": profile.sft_steps, "perDeviceBatchSize": profile.samples_per_row,
                            "maxSeqLength": profile.max_seq_length, "imageSize": profile.image_size, "packing": True,
                            "precision": profile.precision, "learningRate": 1e-5, "warmupRatio": 0.0},
        "strategy": {"name": name, **({"zeroStage": int(zero)} if zero else {})},
    })
    context = init_distributed()
    trainer = Trainer.build(config, context)
    try:
        batches = trainer.micro_batches()
        steps = [trainer.train_step(batches) for _ in range(profile.sft_steps)][1:]
    finally:
        trainer.close()
        shutdown_distributed()
    seconds = sum(s.seconds for s in steps)
    flops = sum(s.flops for s in steps)
    peak = steps[0].peak_flops
    memory = [s.peak_memory_bytes for s in steps if s.peak_memory_bytes is not None]
    return Row("SFT, packed", model, f"{strategy}, {profile.precision}",
               tokens_per_second=sum(s.tokens for s in steps) / seconds,
               mfu=flops / seconds / peak if peak else None,
               peak_gpu_memory_gib=max(memory) / 2**30 if memory else None,
               notes=f"{len(steps)} steps of {sum(s.tokens for s in steps) // len(steps)} tokens, "
                     f"{flops / seconds / 1e12:.3g} TFLOPs/s")


def rollout_prompts(work: Path, profile: Profile) -> list:
    from medmo_trainer.data import iter_records
    from medmo_trainer.rl.prompts import Prompt, portable_record

    records = [r.model_dump(mode="json", by_alias=True, exclude_none=True)
               for r in iter_records(str(synthetic_data(work, profile)), ["grounding"])]
    return [Prompt.model_validate({"id": str(i), "record": portable_record(records[i % len(records)])})
            for i in range(profile.rollout_prompts)]


def part_rollout(profile: Profile, work: Path, model: str, backend_name: str) -> Row:
    """Generated tokens/s of one request of the profile's prompts x group size, after a warm-up request."""
    import torch

    from medmo_trainer.config import RLAlgorithm
    from medmo_trainer.rl.rollout import BACKENDS, SamplingParams

    if backend_name == "vllm":
        import importlib.util

        if not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None:
            return Row("rollout", model, "vllm", notes="skipped: needs a CUDA GPU and vLLM (images/rollout-vllm/)")
    algorithm = RLAlgorithm(max_prompt_length=2048, max_completion_length=profile.completion_tokens,
                            prompts_per_step=profile.rollout_prompts, group_size=profile.group_size)
    backend = BACKENDS[backend_name](model, seed=0, algorithm=algorithm)
    prompts = rollout_prompts(work, profile)
    sampling = SamplingParams(n=profile.group_size, max_new_tokens=profile.completion_tokens, seed=1,
                              image_size=profile.image_size)
    backend.generate(prompts[:1], sampling.model_copy(update={"n": 1, "max_new_tokens": 4}))
    started = time.perf_counter()
    groups = backend.generate(prompts, sampling)
    seconds = time.perf_counter() - started
    tokens = sum(len(c.token_ids) for g in groups for c in g.completions)
    failed = [g.error for g in groups if g.error]
    on_gpu = torch.cuda.is_available()
    return Row("rollout", model, f"{backend_name}, {'bf16' if on_gpu else 'fp32'}", tokens_per_second=tokens / seconds,
               peak_gpu_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if on_gpu and backend_name != "vllm" else None,
               notes=f"{len(prompts)} prompts x {profile.group_size}, {tokens} tokens"
                     + (f"; {len(failed)} prompts failed: {failed[0]}" if failed else ""))


@contextmanager
def worker(module: str, args: list[str], env: dict[str, str], log: Path) -> Iterator[str]:
    """A worker process on 127.0.0.1 until the block ends; yields its URL once it listens."""
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", module, "--host", "127.0.0.1", "--port", "0", *args],
                                   stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 600
            while not (found := re.search(r"listening on (http://\S+)", log.read_text())):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{module} did not start: {log.read_text()[-2000:]}")
                time.sleep(0.5)
            yield found.group(1)
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def part_grpo(profile: Profile, work: Path, model: str) -> Row:
    """One GRPO step end to end: prompts -> rollout worker -> reward worker -> update -> weights published."""
    import yaml

    token = work / "run-token"
    token.write_text(secrets.token_hex(16))
    env = {**os.environ, "MEDMO_PROGRESS_TOKEN_FILE": str(token)}
    env.pop("MEDMO_PROGRESS_URL", None)
    config = {
        "run": "gpu-check", "stage": "grpo", "type": "rl", "model": {"base": model},
        "storage": {"uri": str(work)}, "outputUri": str(work / "grpo-model"), "checkpointUri": str(work / "grpo-ckpt"),
        "datasets": [{"name": "synthetic", "uri": str(synthetic_data(work, profile)), "tasks": ["grounding"]}],
        "hyperparameters": {"maxSteps": 1, "perDeviceBatchSize": profile.group_size, "imageSize": profile.image_size,
                            "precision": profile.precision, "learningRate": 1e-6},
        "strategy": {"name": "fsdp"},
        "rl": {"algorithm": {"groupSize": profile.group_size, "promptsPerStep": max(1, profile.rollout_prompts // 4),
                             "maxCompletionLength": profile.completion_tokens}},
    }
    with ExitStack() as stack:
        rollout = stack.enter_context(worker("medmo_trainer.rl.rollout_server",
                                             ["--model", model, "--storage-uri", str(work)], env, work / "rollout.log"))
        reward = stack.enter_context(worker("medmo_trainer.rl.reward_server", [], env, work / "reward.log"))
        config["rl"].update(rolloutUrls=[rollout], rewardUrls=[reward])
        path = work / "grpo.yaml"
        path.write_text(yaml.safe_dump(config))
        started = time.perf_counter()
        learner = subprocess.run([sys.executable, "-m", "medmo_trainer", "--config", str(path)],
                                 capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - started
    reports = [json.loads(line.removeprefix("[medmo] ")) for line in learner.stdout.splitlines()
               if line.startswith("[medmo] ")]
    step = next((r["metrics"] for r in reports if r["phase"] == "Running"), None)
    if learner.returncode != 0 or step is None:
        raise RuntimeError(f"the learner failed ({learner.returncode}): {(learner.stdout + learner.stderr)[-2000:]}")
    return Row("GRPO step, end to end", model, "fsdp learner, transformers rollout",
               tokens_per_second=step["rolloutTokensPerSecond"],
               notes=f"reward {step['reward/total']:.2f}, weights synced {step['policySyncBytes'] / 2**20:.1f} MiB "
                     f"in {step['policySyncSeconds']:.2f} s; learner process {seconds:.0f} s with load and export")


PARTS = {"sft": part_sft, "rollout": part_rollout, "grpo": part_grpo}


# -- the parent: the plan, one process per part, the table ---------------------------------------


def plan(profile: Profile, gpu_memory_gib: float | None) -> list[tuple[str, list[str], Row]]:
    """(part, its arguments, the row reported if it fails) for every check of the profile."""
    models = list(profile.models)
    if gpu_memory_gib is not None and gpu_memory_gib >= LARGE_GPU_GIB and profile is GPU:
        models.append("preset:qwen3-vl-8b-random")
    first = models[0]
    parts = [("sft", [first, strategy]) for strategy in ("fsdp", "deepspeed-zero3")]
    parts += [("sft", [model, "fsdp"]) for model in models[1:]]
    parts += [("rollout", [first, backend]) for backend in ("transformers", "vllm")]
    parts += [("grpo", [first])]
    labels = {"sft": "SFT, packed", "rollout": "rollout", "grpo": "GRPO step, end to end"}
    return [(part, args, Row(labels[part], args[0], ", ".join(args[1:]))) for part, args in parts]


def run_part(part: str, args: list[str], profile_name: str, work: Path, timeout: float) -> Row:
    command = [sys.executable, "-m", "medmo_trainer.gpu_check", "--part", part, "--profile", profile_name,
               "--work", str(work), *args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
    # A session of its own: a part that overruns is stopped with the workers it started.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise RuntimeError(f"took longer than {timeout:.0f} s") from None
    result = next((line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)), None)
    if result is None:
        raise RuntimeError(f"exit code {process.returncode}: {(stdout + stderr)[-600:]}".replace("\n", " "))
    return Row(**json.loads(result.removeprefix(RESULT_PREFIX)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run on CPU even where there is a GPU")
    parser.add_argument("--tiny", action="store_true", help="the tiny preset and sizes (seconds per part)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--work", help="scratch folder (default: a temporary one)")
    parser.add_argument("--part-timeout", type=float, default=300.0, help="seconds a part may take")
    parser.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--profile", choices=["gpu", "cpu-tiny"], help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported, here and in every part
    if args.part:  # one part, in this process
        row = PARTS[args.part](GPU if args.profile == "gpu" else CPU_TINY, Path(args.work), *rest)
        print(RESULT_PREFIX + json.dumps(asdict(row)), flush=True)
        return 0
    import torch

    on_gpu = torch.cuda.is_available()
    profile_name = "cpu-tiny" if args.tiny or not on_gpu else "gpu"
    profile = CPU_TINY if profile_name == "cpu-tiny" else GPU
    device = torch.cuda.get_device_name() if on_gpu else "CPU"
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30 if on_gpu else None
    header = f"GPU check, {time.strftime('%Y-%m-%d')}, {device}" + (f" ({memory:.0f} GiB)" if memory else "")
    rows = []
    with tempfile.TemporaryDirectory(prefix="medmo-gpu-check-") as scratch:
        work = Path(args.work or scratch)
        work.mkdir(parents=True, exist_ok=True)
        for part, part_args, failed in plan(profile, memory):
            started = time.perf_counter()
            try:
                row = run_part(part, part_args, profile_name, work, args.part_timeout)
            except RuntimeError as error:
                row = failed
                row.notes = f"failed: {error}"
            print(f"{row.check} [{row.setup}]: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
            rows.append(row)
    print(format_table(rows, header))
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "rows": [asdict(r) for r in rows]}, indent=2))
    return 0 if not any(r.notes.startswith("failed") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
