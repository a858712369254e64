"""Experiment (not a test, not part of `make bench`): does a second vision encoder that sees a finer grid
help grounding? The figures it gives are quoted in the README's `visionEncoders` section.

    python tests/benchmarks/experiment_second_encoder.py [--base-size 112] [--steps 300] [--seeds 0,1,2]
        [--align-steps 0]

The base tower of the tiny Qwen3-VL turns a `--base-size` px scan into image tokens of patch 16
merged 2x2 (112 px: 4x4 tokens; 64 px: 2x2). A tiny SigLIP added with `model.visionEncoders` sees
the same scan at 128 px with patch 8, pooled to 8x8 tokens. For each seed, grounding SFT of the
same length runs with and without it (optionally after `--align-steps` of caption pretraining, the
real `pretrain` stage on the whole model; then the real `sft` and `eval` stages, `python -m medmo_trainer`,
three at a time on one thread each), and the held-out grounding mean IoU of each is printed with the
mean and the seed-to-seed spread.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the integration helpers

from integration.rl.pipeline import synthetic  # noqa: E402
from integration.trainer.chains import run_stage, stage, training  # noqa: E402

FINE = {"name": "fine", "base": "preset:tiny-siglip", "imageSize": 128, "poolSize": 8}


def grounding_iou(root: Path, train: Path, heldout: Path, seed: int, encoders: list[dict], size: int,
                  steps: int, align_steps: int = 0) -> float:
    root.mkdir(parents=True)
    base = "preset:tiny-qwen3-vl"
    if align_steps:  # a pretrain stage on the captions first (whole model), from which grounding starts
        align = stage(root, "align", "pretrain", base, seed,
                      datasets=[{"name": "captions", "uri": str(train), "tasks": ["caption"]}],
                      hyperparameters=training(align_steps, seed, size))
        align["model"]["visionEncoders"] = encoders
        run_stage(root, align)
        base = str(root / "align" / "model")
    sft = stage(root, "sft", "sft", base, seed,
                datasets=[{"name": "boxes", "uri": str(train), "tasks": ["grounding"]}],
                hyperparameters=training(steps, seed, size))
    sft["model"]["visionEncoders"] = encoders
    run_stage(root, sft)
    run_stage(root, stage(root, "bench", "eval", str(root / "sft" / "model"), seed,
                          benchmarks=[{"name": "heldout", "uri": str(heldout), "tasks": ["grounding"]}],
                          hyperparameters={"imageSize": size}, evaluation={"maxNewTokens": 72}))
    return json.loads((root / "bench" / "metrics.json").read_text())["metrics"]["heldout/groundingMiou"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-size", type=int, default=112)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--align-steps", type=int, default=0,
                        help="caption pretraining steps (whole model) before grounding, for both sides")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory(prefix="medmo-encoder-experiment-") as folder:
        tmp = Path(folder)
        train = synthetic(tmp / "train", 400, 0, "train")
        heldout = synthetic(tmp / "heldout", 60, 1, "heldout")
        runs = [(seed, name, encoders) for seed in seeds for name, encoders in (("base", []), ("fine", [FINE]))]
        with ThreadPoolExecutor(3) as pool:
            scores = dict(zip([(s, n) for s, n, _ in runs], pool.map(
                lambda run: grounding_iou(tmp / f"{run[1]}-seed{run[0]}", train, heldout, run[0], run[2],
                                          args.base_size, args.steps, args.align_steps), runs)))
    print(f"held-out grounding mean IoU, base tower at {args.base_size} px, {args.steps} grounding SFT steps"
          + (f" after {args.align_steps} caption pretraining steps" if args.align_steps else ""))
    print("| seed | base tower alone | with the 128 px SigLIP (8x8 tokens) |\n|---|---|---|")
    for seed in seeds:
        print(f"| {seed} | {scores[seed, 'base']:.3f} | {scores[seed, 'fine']:.3f} |")
    for name in ("base", "fine"):
        values = [scores[s, name] for s in seeds]
        print(f"{name}: mean {sum(values) / len(values):.3f}, spread {max(values) - min(values):.3f}")


if __name__ == "__main__":
    main()
