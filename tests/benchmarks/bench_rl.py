"""Completions/s of this project's RL pipeline against TRL's GRPOTrainer, on the same tiny model, data, reward and cores.

    python tests/benchmarks/bench_rl.py [--steps 8] [--repeats 5] [--workers 1] [--learner-threads 1] [--trl-threads 1,2]
        [--from-preset]

Both sides train the same weights (a grounding SFT of the tiny Qwen3-VL preset, see `prepare`) on
synthetic grounding prompts with the paper's box reward, group size 8, 4 prompts per step, at most
72 completion tokens, learning rate 5e-4, DAPO loss with clip-higher, no KL, on CPU. Ours: `python -m medmo_trainer` running the `rl` stage
with N rollout-worker and N reward-worker processes, once on-policy (`maxStaleness: 0`) and once
asynchronous (`maxStaleness: 1`: the next step's completions are generated while the learner
updates). TRL: `GRPOTrainer` in one process. The rate is completions per second over the steps
after the first (start-up excluded); beside it each side's mean reward over the first and the last
half of its steps, so a faster side is also seen to learn as much per completion. The sides run
interleaved through the benchmark harness, every process with its threads fixed (OMP_NUM_THREADS
and torch threads, printed by each): TRL's one process once with 1 thread and once with all the
cores' threads (on a loaded machine a multi-threaded process can lose far more than its share to
threads waiting on each other), ours with the cores' threads split between the learner and the
rollout worker (the reward worker is a third, mostly idle, process), so the layouts differ and the
table says how.

TRL is a benchmark-only dependency (requirements/bench.txt): it is installed into its own virtual
environment under $MEDMO_CACHE (never into the project's), which sees the project's packages
through a .pth file so both sides run the same torch and transformers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness

REPO = Path(__file__).resolve().parents[2]
GROUP, PROMPTS, TOKENS, IMAGE_SIZE, LEARNING_RATE = 8, 4, 72, 112, 5e-4


def cache() -> Path:
    return Path(os.environ.get("MEDMO_CACHE", Path.home() / ".cache" / "medmo")) / "bench-rl"


def trl_python() -> str:
    """The interpreter of the TRL venv, created on first use."""
    venv = cache() / "trl-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True)
        site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        ours = [p for p in sys.path if p.endswith("site-packages")][0]
        # addsitedir (not a bare path) so the project's own .pth files, its editable install, apply too
        Path(site, "medmo-project.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(REPO / "requirements" / "bench.txt")],
                       check=True)
    return str(python)


def prepare(from_preset: bool) -> tuple[Path, Path]:
    """Synthetic grounding data and the starting weights, shared by both sides.

    By default the start is the grounding SFT of the tiny preset that the slow RL test trains (seed 0,
    cached under $MEDMO_CACHE/rl-test/ and shared with that test): it answers with boxes, so the box
    reward varies within a group and both sides have something to learn from. `from_preset` starts
    from the random preset instead (its rewards are all zero: a speed-only comparison).
    """
    from integration.rl.pipeline import synthetic
    from integration.rl.test_rl_improves_grounding import cache_root, sft_model

    from medmo_trainer.model import export_hf, load_model

    if not from_preset:
        data = synthetic(cache_root() / "train", 300, 0, "train")
        return data, Path(sft_model(cache_root(), data, 0))
    root = cache()
    data = synthetic(root / "data", 48, 0, "train")
    model = root / "tiny-qwen3-vl"
    if not (model / "model.safetensors").exists():
        loaded = load_model("preset:tiny-qwen3-vl")
        export_hf(loaded.model, loaded.processor, str(model))
    return data, model


def learning(rewards: list[float]) -> dict[str, float]:
    """How far a side learned: the mean reward of each step's completions, over the first and the last
    half of the steps (both sides sample the same number of completions per step, so the halves
    cover the same completions' worth of learning on each side)."""
    half = len(rewards) // 2
    return {"reward, first half": sum(rewards[:half]) / max(half, 1),
            "reward, last half": sum(rewards[half:]) / max(len(rewards) - half, 1)}


def figures_from_reports(reports: list[dict]) -> dict[str, float]:
    """Completions per second between the first and the last step's reports, and the reward curve's halves."""
    running = [r for r in reports if r["phase"] == "Running"]
    first, last = running[0], running[-1]
    rate = (last["step"] - first["step"]) * GROUP * PROMPTS / (last["timestamp"] - first["timestamp"])
    return {"completions/s": rate, **learning([r["metrics"]["reward/total"] for r in running])}


def run_ours(data: Path, model: Path, steps: int, workers: int, learner_threads: int, out: Path,
             staleness: int = 0) -> dict[str, float]:
    from integration.rl.conftest import worker
    from integration.rl.pipeline import progress_lines, stage_config, train_stage
    from medmo_trainer.rl.http import TOKEN_FILE_ENV

    # The run's token, as a run's pods get it: the workers require it and the learner sends it.
    (out / "run-token").write_text(secrets.token_hex(32))
    os.environ[TOKEN_FILE_ENV] = str(out / "run-token")
    with contextlib.ExitStack() as stack:
        one = harness.thread_env(1, {})
        rollouts = [stack.enter_context(worker("medmo_trainer.rl.rollout_server", "--model", str(model), "--threads", "1",
                                               storage_uri=str(out), env=one))
                    for _ in range(workers)]
        rewards = [stack.enter_context(worker("medmo_trainer.rl.reward_server", env=one)) for _ in range(workers)]
        rl = {
            "algorithm": {"groupSize": GROUP, "promptsPerStep": PROMPTS, "maxCompletionLength": TOKENS,
                          "maxStaleness": staleness},
            "rewards": {"accuracy": 0.0, "bbox": 1.0, "format": 0.0, "overlong": 0.0},
            "rolloutUrls": [w.url for w in rollouts], "rewardUrls": [w.url for w in rewards],
        }
        config = stage_config(out, "grpo", "rl", str(model), data, seed=0, steps=steps,
                              learning_rate=LEARNING_RATE, batch_size=GROUP * PROMPTS, rl=rl)
        config_text = config.read_text().replace("imageSize: 112", f"imageSize: {IMAGE_SIZE}")
        config.write_text(config_text)
        train_stage(config, out / "grpo.log", timeout=3600, env=harness.thread_env(learner_threads, {}))
    return figures_from_reports(progress_lines(out / "grpo.log"))


def run_trl(data: Path, model: Path, steps: int, threads: int, out: Path) -> dict[str, float]:
    result = out / "trl.json"
    subprocess.run([trl_python(), __file__, "--trl-side", "--data", str(data), "--model", str(model),
                    "--steps", str(steps), "--result", str(result)], check=True, cwd=out,
                   env=harness.thread_env(threads, {**os.environ, "PYTHONPATH": str(REPO / "tests")}))
    return json.loads(result.read_text())


# --- the TRL side (runs in the TRL venv) -------------------------------------------------------


def trl_side(data: Path, model_folder: Path, steps: int, result: Path) -> None:
    import io

    import datasets
    import torch
    from PIL import Image
    from transformers import TrainerCallback
    from transformers.processing_utils import ProcessorMixin
    from trl import GRPOConfig, GRPOTrainer

    from medmo_trainer.data import iter_records, load_image
    from medmo_trainer.model import load_model
    from medmo_trainer.rl.rewards import BoxReward

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    print(harness.thread_settings(), file=sys.stderr)
    loaded = load_model(str(model_folder))

    class TinyProcessor(ProcessorMixin):
        """The project's processor behind the ProcessorMixin face TRL expects: unpadded ids per prompt for
        generation, padded tensors when asked for them (TRL's forward pass)."""

        attributes = ["image_processor", "tokenizer"]

        def __init__(self, inner):  # no ProcessorMixin.__init__: it would re-validate the parts' classes
            self.inner, self.tokenizer, self.image_processor = inner, inner.tokenizer, inner.image_processor
            self.chat_template = inner.tokenizer.chat_template

        def __call__(self, text=None, images=None, **kwargs):
            flat = [as_image(image) for per_prompt in images for image in (per_prompt or [])] if images else None
            batch = self.inner(text, flat, image_size=IMAGE_SIZE, padding_side="left")
            if kwargs.get("return_tensors") == "pt":  # the forward pass's call: left-padded tensors
                return batch
            keep = batch["attention_mask"].bool()
            out = {k: [row[m].tolist() for row, m in zip(batch[k], keep)] for k in ("input_ids", "attention_mask",
                                                                                  "mm_token_type_ids")}
            if flat:
                out["pixel_values"], out["image_grid_thw"] = batch["pixel_values"], batch["image_grid_thw"]
            return out

        def batch_decode(self, ids, **kwargs):
            return self.tokenizer.batch_decode(ids, **kwargs)

    def as_image(image):
        # datasets stores an image nested in a message as {"bytes": ..., "path": ...}
        return Image.open(io.BytesIO(image["bytes"])) if isinstance(image, dict) else image

    rows = []
    for record in iter_records(str(data), ["grounding"]):
        content = [{"type": "image", "image": load_image(record.image)}, {"type": "text", "text": record.prompt}]
        rows.append({"prompt": [{"role": "user", "content": content}], "task": "grounding",
                     "boxes": [b.model_dump(mode="json") for b in record.boxes]})
    dataset = datasets.Dataset.from_list(rows)
    box_reward = BoxReward()

    def bbox(prompts, completions, **columns):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return box_reward(prompts, texts, task=columns["task"], boxes=columns["boxes"])

    stamps = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    config = GRPOConfig(
        output_dir=str(result.parent / "trl-out"), max_steps=steps, learning_rate=LEARNING_RATE,
        per_device_train_batch_size=GROUP * PROMPTS, num_generations=GROUP, max_completion_length=TOKENS,
        temperature=1.0, top_p=1.0, beta=0.0, epsilon=0.15, epsilon_high=0.25, loss_type="dapo",
        mask_truncated_completions=True, use_cpu=True, bf16=False, report_to=[], save_strategy="no",
        logging_steps=1, gradient_checkpointing=False, seed=0, lr_scheduler_type="constant",
    )
    trainer = GRPOTrainer(model=loaded.model, reward_funcs=[bbox], args=config, train_dataset=dataset,
                          processing_class=TinyProcessor(loaded.processor), callbacks=[Stamp()])
    torch.manual_seed(0)
    trainer.train()
    rate = (len(stamps) - 1) * GROUP * PROMPTS / (stamps[-1] - stamps[0])
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    result.write_text(json.dumps({"completions/s": rate, **learning(rewards)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1, help="rollout and reward worker processes (each)")
    parser.add_argument("--learner-threads", type=int, default=max(1, harness.cores() - 1),
                        help="torch threads of our learner (each worker gets 1)")
    parser.add_argument("--trl-threads", default=f"1,{harness.cores()}",
                        help="torch threads of TRL's process, comma-separated: one side for each")
    parser.add_argument("--from-preset", action="store_true",
                        help="start from the random tiny preset (rewards all zero) instead of the cached SFT model")
    parser.add_argument("--results", type=Path, default=harness.RESULTS)
    parser.add_argument("--trl-side", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_side:
        trl_side(args.data, args.model, args.steps, args.result)
        return
    sys.path.insert(0, str(REPO / "tests"))
    data, model = prepare(args.from_preset)
    trl_python()  # the TRL venv, built before any timing

    def in_fresh_folder(measure):
        """Runs `measure(folder)` in a new folder under the cache, removed afterwards."""
        def run() -> dict[str, float]:
            with tempfile.TemporaryDirectory(prefix="run-", dir=cache()) as out:
                return measure(Path(out))
        return run

    def ours(staleness: int):
        return in_fresh_folder(lambda out: run_ours(data, model, args.steps, args.workers, args.learner_threads,
                                                    out, staleness))

    def trl(threads: int):
        return in_fresh_folder(lambda out: run_trl(data, model, args.steps, threads, out))

    w = args.workers
    trl_threads = [int(n) for n in args.trl_threads.split(",")]
    bench = harness.Benchmark("RL: medmo rl stage against TRL GRPOTrainer", [
        *(harness.Side(f"TRL GRPOTrainer, {n} thread{'s' * (n > 1)}", trl(n), [harness.Process("trainer", n)])
          for n in trl_threads),
        *(harness.Side(f"medmo rl stage ({w}+{w} workers), maxStaleness {staleness}", ours(staleness),
                       [harness.Process("learner", args.learner_threads), harness.Process("rollout worker", 1, w),
                        harness.Process("reward worker", 1, w)])
          for staleness in (0, 1)),
    ], repeats=args.repeats, notes=[
        f"{args.steps} steps of {PROMPTS} prompts x {GROUP} completions of <= {TOKENS} tokens, CPU, rate over the "
        f"steps after the first. Both sides on the same {harness.cores()} cores; the layouts differ: TRL generates "
        f"and learns in one process (of {' or '.join(map(str, trl_threads))} threads), ours in a learner of {args.learner_threads} and "
        f"{w} rollout worker(s) of 1 thread (the reward workers score between generations and are otherwise idle)."]).run()
    bench.report(args.results)


if __name__ == "__main__":
    main()
