"""Useful tokens per second with packing, on a dataset whose lengths follow a medical mix, against a plain padded loop.

    $(scripts/bootstrap.sh)/bin/python tests/benchmarks/bench_packing.py [--steps 10] [--warmup 2] [--repeats 5]
        [--batch-size 8] [--threads N]

The data mixes what medical instruction data holds: many short VQA answers (one to a few words), long
free-text reports (a hundred to two hundred words), and a few multi-image studies with long reports
(three images each). In a padded batch every sample is as long as the batch's longest, so a batch
with one report among short questions is mostly padding. Three loops train the tiny Qwen3-VL preset
on CPU with the same batches (8 records by default; same loader, same seed):

- a plain transformers loop on padded batches (`model(**batch).loss`, backward, clip, AdamW step),
- the MedMO trainer (one-rank DDP stage) with `packing: false`, padded as the plain loop is,
- the MedMO trainer with `packing: true` (the default): each batch is one padding-free row.

Useful tokens are the batches' real tokens (prompt, image and answer tokens, no padding), the same
count on every side; tokens/s divides them by the seconds of the steps after the warm-up. Each loop
runs in a fresh process with the same torch threads, interleaved through the benchmark harness.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from pathlib import Path

import harness
from bench_trainer import loop_arguments, plain_loop_seconds, print_child_seconds, trainer_seconds
from bench_trainer import stage_config as trainer_stage_config
from medmo_trainer.config import StageConfig
from medmo_trainer.data.synthetic import generate
from medmo_trainer.inputs import build_train_loader
from medmo_trainer.model import load_model

PLAIN_PADDED = "plain transformers loop, padded"
TRAINER_PADDED = "medmo trainer, packing: false"
TRAINER_PACKED = "medmo trainer, packing: true"

PHRASES = [
    "The lungs are clear without focal consolidation.", "There is no pleural effusion or pneumothorax.",
    "The cardiomediastinal silhouette is within normal limits.", "Degenerative changes of the thoracic spine.",
    "Patchy opacity at the left lung base may represent atelectasis.", "No acute osseous abnormality.",
    "Stable postsurgical changes of the right hemithorax.", "Mild interstitial prominence, likely chronic.",
    "The trachea is midline.", "Surgical clips project over the right upper quadrant.",
    "Compared with the prior study, the findings are unchanged.", "Recommend follow-up in three months.",
    "The hila are normal in size and contour.", "Small calcified granuloma in the right upper lobe.",
]


def long_report(rng: random.Random, findings: str, words: int) -> str:
    """A radiology-style report of about `words` words that opens with the record's own findings."""
    parts = ["Technique: single frontal view of the chest.", f"Findings: {findings}"]
    while sum(len(p.split()) for p in parts) < words:
        parts.append(rng.choice(PHRASES))
    return " ".join(parts) + " Impression: " + findings


def medical_mix(folder: Path, scans: int, seed: int = 1) -> Path:
    """Writes the mixed dataset (see the module docstring) under `folder/mix`; returns that folder."""
    source = folder / "scans"
    generate(str(source), n=scans, seed=seed, split="train")
    records = [json.loads(line) for shard in sorted(source.glob("train-*.jsonl")) for line in shard.read_text().splitlines()]
    rng = random.Random(seed)
    mix = []
    for record in records:
        image = str(source / record["image"])
        if record["task"] == "vqa":
            mix.append({**record, "image": image})
        elif record["task"] == "report" and rng.random() < 0.5:
            mix.append({**record, "image": image, "answer": long_report(rng, record["answer"], rng.randint(100, 200))})
    reports = [r for r in records if r["task"] == "report"]
    for index in range(0, len(reports) - 2, 8):  # a multi-image study for every 8 scans
        study = reports[index : index + 3]
        mix.append({"id": f"study-{index}", "task": "report", "images": [str(source / r["image"]) for r in study],
                    "prompt": "Write the report for this study of three views.",
                    "answer": long_report(rng, study[0]["answer"], 200), "findings": study[0].get("findings", [])})
    rng.shuffle(mix)
    out = folder / "mix"
    out.mkdir()
    (out / "train-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mix))
    return out


def stage_config(folder: Path, data: Path, steps: int, packing: bool, batch_size: int) -> StageConfig:
    return trainer_stage_config(folder, data, steps, {"name": "ddp"}, batch_size=batch_size, max_seq_length=1024,
                                packing=packing)


def token_counts(config: StageConfig, steps: int, warmup: int) -> tuple[int, int]:
    """Useful tokens and padded batch positions of the measured steps' batches (padded loader)."""
    loaded = load_model(config.model)
    loader = build_train_loader(config.datasets, loaded.processor, config.hyperparameters,
                                rank=0, world_size=1, seed=config.hyperparameters.seed)
    useful = positions = 0
    for step in range(1, steps + 1):
        batch = loader.next_batch()
        if step > warmup:
            useful += int(batch["attention_mask"].sum())
            positions += batch["input_ids"].numel()
    return useful, positions


def measure_one(loop: str, data: Path, steps: int, warmup: int, batch_size: int) -> float:
    """Seconds of the measured steps of one loop (run in a fresh process by `main`)."""
    with tempfile.TemporaryDirectory(prefix="medmo-bench-run-") as tmp:
        config = stage_config(Path(tmp), data, steps, packing=loop == TRAINER_PACKED, batch_size=batch_size)
        if loop == PLAIN_PADDED:
            return plain_loop_seconds(config, steps, warmup)
        return trainer_seconds(config, steps, warmup)


def main() -> None:
    parser = loop_arguments(__doc__.splitlines()[0], steps=10, warmup=2)
    parser.add_argument("--batch-size", type=int, default=8, help="records per batch (perDeviceBatchSize)")
    parser.add_argument("--scans", type=int, default=48, help="synthetic scans the mix is made from")
    args = parser.parse_args()
    if args.measure:
        print_child_seconds(lambda: measure_one(args.measure, Path(args.data), args.steps, args.warmup, args.batch_size))
        return

    with tempfile.TemporaryDirectory(prefix="medmo-bench-") as tmp:
        data = medical_mix(Path(tmp), args.scans)
        useful, positions = token_counts(stage_config(Path(tmp), data, args.steps, packing=False, batch_size=args.batch_size),
                                         args.steps, args.warmup)

        def side(loop: str):
            command = [sys.executable, __file__, "--measure", loop, "--data", str(data),
                       "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size)]

            def measure() -> dict[str, float]:
                seconds = harness.run_child(command, threads=args.threads)["seconds"]
                return {"useful tokens/s": useful / seconds}
            return measure

        records = sum(1 for _ in (data / "train-00000.jsonl").open())
        bench = harness.Benchmark("Packing on a medical length mix", [
            harness.Side(loop, side(loop), [harness.Process("trainer", args.threads)])
            for loop in (PLAIN_PADDED, TRAINER_PADDED, TRAINER_PACKED)
        ], repeats=args.repeats, notes=[
            f"Tiny Qwen3-VL on CPU, 1 rank, batches of {args.batch_size} records from {records} (short VQA answers, "
            f"long reports, 3-image studies): {args.steps - args.warmup} measured steps after {args.warmup} "
            f"warm-up steps, the same batches on every side. They hold {useful} useful tokens; padded, they fill "
            f"{positions} positions ({100 * (1 - useful / positions):.0f} % padding)."]).run()
        bench.report(args.results)


if __name__ == "__main__":
    main()
