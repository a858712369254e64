"""Each stage of the tiny recipe moves its own metric, for 3 seeds, and GRPO's gain is larger than seed noise.

For each seed, the demo's stages (manifests/samples/medmo-tiny.yaml: its learning rates, image size,
batch sizes and GRPO settings), shortened, run as the real trainer (`python -m medmo_trainer`, one
process per stage, separate rollout and reward worker processes):

    align     (projector only, captions)  -> its caption loss falls
    ground    (grounding)
    instruct  (all tasks)                 -> held-out closed VQA accuracy and grounding IoU rise over `align`
    grpo      (grounding and VQA prompts) -> held-out grounding mean IoU rises over `instruct`

One eval stage then scores the 12 models on the same held-out records. GRPO's mean gain in mean IoU
must exceed the spread (max - min) of the SFT models' mean IoU across seeds, and no seed may lose IoU.
"""

from __future__ import annotations

import contextlib
import json
import statistics
from pathlib import Path

import pytest
import yaml
from medmo_cases import load_sample

from integration.rl.pipeline import train_stage
from medmo_trainer.data.synthetic import materialize
from medmo_trainer.metrics_log import read_metrics_log, stage_log_uri

SEEDS = (0, 1, 2)
STEPS = {"align": 10, "ground": 60, "instruct": 150, "grpo": 12}
"""Each stage shortened from the demo's (a few hundred SFT steps there)."""
HELDOUT_SAMPLES = 48


def demo_stage(name: str) -> dict:
    return next(s for s in load_sample("medmo-tiny.yaml")["spec"]["stages"] if s["name"] == name)


def stage_config(root: Path, name: str, stage_type: str, model: dict, seed: int, datasets: list[dict],
                 hyperparameters: dict, **extra) -> Path:
    config = {
        "run": "learning-signal", "stage": name, "type": stage_type, "model": model,
        "storage": {"uri": str(root / "storage")},
        "outputUri": str(root / name / "model"), "checkpointUri": str(root / name / "checkpoints"),
        "datasets": datasets, "hyperparameters": {**hyperparameters, "seed": seed},
        "strategy": {"name": "ddp"}, "checkpoint": {"everySteps": 1000, "keepLast": 1}, **extra,
    }
    path = root / f"{name}.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def run_seed(root: Path, seed: int, rollout_url: str, reward_url: str) -> dict[str, str]:
    """The align, ground, instruct and grpo models of one seed (the demo's settings, fewer steps)."""
    models = {}
    base = load_sample("medmo-tiny.yaml")["spec"]["model"]["base"]
    for name, stage_type in (("align", "pretrain"), ("ground", "sft"), ("instruct", "sft"), ("grpo", "rl")):
        demo = demo_stage(name)
        datasets = [{**d, "uri": materialize(d["uri"])} for d in demo["datasets"]]
        if name == "align":  # captions alone, so that its training loss is the caption loss
            datasets = [{**d, "tasks": ["caption"]} for d in datasets]
        hyperparameters = {**demo["hyperparameters"], "maxSteps": STEPS[name]}
        extra = {}
        if stage_type == "rl":
            extra["rl"] = {key: demo["rl"][key] for key in ("algorithm", "rewards")}
            extra["rl"] |= {"rolloutUrls": [rollout_url], "rewardUrls": [reward_url], "requestTimeoutSeconds": 300}
        model = {"base": base, **({"trainable": demo["trainable"]} if "trainable" in demo else {})}
        config = stage_config(root, name, stage_type, model, seed, datasets, hyperparameters, **extra)
        train_stage(config, root / f"{name}.log", timeout=1800)
        base = models[name] = str(root / name / "model")
    return models


def caption_losses(root: Path) -> list[float]:
    return [r["loss"] for r in read_metrics_log(stage_log_uri(str(root / "storage"), "align")) if "loss" in r]


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_every_stage_moves_its_metric_and_grpo_gains_more_than_seed_noise(start_worker, tmp_path):
    models: dict[tuple[int, str], str] = {}
    # Any model of the demo's shape: each GRPO run publishes its own starting weights as version 0.
    rollout_model = load_sample("medmo-tiny.yaml")["spec"]["model"]["base"]
    with contextlib.ExitStack() as stack:
        rollout = stack.enter_context(start_worker("medmo_trainer.rl.rollout_server", "--model", rollout_model,
                                                   "--threads", "1"))
        reward = stack.enter_context(start_worker("medmo_trainer.rl.reward_server"))
        for seed in SEEDS:
            for stage, uri in run_seed(tmp_path / f"seed{seed}", seed, rollout.url, reward.url).items():
                models[seed, stage] = uri

    bench = demo_stage("bench")
    names = {key: f"{key[1]}-{key[0]}" for key in models}
    own = (SEEDS[0], "grpo")
    eval_config = stage_config(
        tmp_path, "bench", "eval", {"base": models[own]}, 0, [], bench["hyperparameters"],
        benchmarks=[{"name": "heldout", "uri": materialize(bench["benchmarks"][0]["uri"]),
                     "tasks": ["vqa", "grounding"], "maxSamples": HELDOUT_SAMPLES}],
        evaluation={"modelName": names[own], "batchSize": 16,
                    "compareModels": [{"name": names[k], "uri": uri} for k, uri in models.items() if k != own]},
    )
    train_stage(eval_config, tmp_path / "bench.log", timeout=1800)
    scored = json.loads((tmp_path / "storage" / "bench" / "metrics.json").read_text())
    by_name = {m["name"]: m["benchmarks"]["heldout"] for m in scored["models"]}
    score = {key: by_name[name] for key, name in names.items()}
    losses = {seed: caption_losses(tmp_path / f"seed{seed}") for seed in SEEDS}
    table = "\n".join(
        f"seed {seed}: caption loss {losses[seed][0]:.3f} -> {losses[seed][-1]:.3f}; "
        + "; ".join(f"{stage} vqaClosedAcc {score[seed, stage]['vqaClosedAcc']:.3f} "
                    f"groundingMiou {score[seed, stage]['groundingMiou']:.3f}" for stage in ("align", "instruct", "grpo"))
        for seed in SEEDS
    )
    print(f"\n{table}")

    for seed in SEEDS:
        assert statistics.mean(losses[seed][-3:]) < statistics.mean(losses[seed][:3]), (
            f"alignment did not lower the caption loss:\n{table}")
        for metric in ("vqaClosedAcc", "groundingMiou"):
            assert score[seed, "instruct"][metric] > score[seed, "align"][metric], f"SFT did not raise {metric}:\n{table}"
    sft_iou = [score[seed, "instruct"]["groundingMiou"] for seed in SEEDS]
    gains = [score[seed, "grpo"]["groundingMiou"] - score[seed, "instruct"]["groundingMiou"] for seed in SEEDS]
    spread = max(sft_iou) - min(sft_iou)
    assert min(gains) >= 0 and statistics.mean(gains) > spread, (
        f"GRPO's mean IoU gains {[round(g, 3) for g in gains]} vs the SFT spread between seeds {spread:.3f}:\n{table}"
    )
