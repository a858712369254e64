"""GRPO raises the held-out box reward of an SFT-warmed tiny Qwen3-VL, on CPU.

For each of 3 seeds: a short grounding SFT of the tiny preset (cached under
$MEDMO_CACHE/rl-test/<recipe>/ since it costs minutes and depends only on the recipe), then a short
GRPO stage with 2 rollout-worker and 2 reward-worker processes. The held-out score is the policy's
expected box reward: the mean over 8 answers sampled (seeded, temperature 1) for each of 24 held-out
grounding prompts. RL must beat the SFT-only model by more than the seed-to-seed spread of
the SFT-only scores, for at least 2 of the 3 seeds.
"""

import contextlib
import hashlib
import os
import shutil
from pathlib import Path

import pytest
import transformers

import medmo_trainer.data.synthetic as synthetic_data
from medmo_trainer.model import presets, tokenizer
from integration.rl.pipeline import (
    MAX_COMPLETION_TOKENS,
    heldout_grounding,
    progress_lines,
    stage_config,
    synthetic,
    train_stage,
)

SEEDS = (0, 1, 2)
SFT_STEPS, SFT_LEARNING_RATE = 100, 2e-3
RL_STEPS, RL_LEARNING_RATE = 30, 5e-4
EVAL_PROMPTS, EVAL_SAMPLES = 24, 8
# The cached SFT models and data are only reused while the recipe, transformers, the data generator and
# the tiny preset stay the same.
SOURCES_HASH = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (synthetic_data, presets, tokenizer)))
RECIPE = f"v1-tf{transformers.__version__}-sft{SFT_STEPS}-{SFT_LEARNING_RATE}-{SOURCES_HASH.hexdigest()[:10]}"


def cache_root() -> Path:
    return Path(os.environ.get("MEDMO_CACHE", Path.home() / ".cache" / "medmo")) / "rl-test" / RECIPE


def sft_model(root: Path, data: Path, seed: int) -> str:
    """The SFT-warmed model of `seed`, trained once and kept (renamed into place only when complete)."""
    done = root / f"sft-seed{seed}"
    if not (done / "model" / "model.safetensors").exists():
        work = root / f"sft-seed{seed}.partial"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        config = stage_config(work, "sft", "sft", "preset:tiny-qwen3-vl", data, seed=seed, steps=SFT_STEPS,
                              learning_rate=SFT_LEARNING_RATE, batch_size=8)
        train_stage(config, work / "sft.log", timeout=1800)
        shutil.rmtree(done, ignore_errors=True)
        (work / "sft" / "model").rename(work / "model")
        work.rename(done)
    return str(done / "model")


def grpo(tmp: Path, model: str, data: Path, seed: int, rollouts, rewards) -> tuple[str, list[dict]]:
    rl = {
        "algorithm": {"groupSize": 8, "promptsPerStep": 4, "maxCompletionLength": MAX_COMPLETION_TOKENS},
        "rewards": {"accuracy": 0.0, "bbox": 1.0, "format": 0.0, "overlong": 0.0},
        "rolloutUrls": [w.url for w in rollouts],
        "rewardUrls": [w.url for w in rewards],
        "requestTimeoutSeconds": 120,
    }
    config = stage_config(tmp, "grpo", "rl", model, data, seed=seed, steps=RL_STEPS,
                          learning_rate=RL_LEARNING_RATE, batch_size=16, rl=rl)
    train_stage(config, tmp / "grpo.log", timeout=1800)
    return str(tmp / "grpo" / "model"), progress_lines(tmp / "grpo.log")


@pytest.mark.slow
def test_grpo_raises_heldout_box_reward_over_sft_for_most_seeds(start_worker, tmp_path):
    root = cache_root()
    train = synthetic(root / "train", 300, 0, "train")
    heldout = synthetic(root / "heldout", 40, 1, "heldout")
    sft_models = {seed: sft_model(root, train, seed) for seed in SEEDS}
    score = lambda model: heldout_grounding(model, heldout, limit=EVAL_PROMPTS, samples=EVAL_SAMPLES)  # noqa: E731
    sft_scores = {seed: score(model) for seed, model in sft_models.items()}
    rl_scores = {}
    with contextlib.ExitStack() as stack:
        # Workers start from any SFT model: each GRPO run publishes its own starting weights as version 0.
        rollouts = [stack.enter_context(start_worker("medmo_trainer.rl.rollout_server", "--model", sft_models[0],
                                                     "--threads", "1")) for _ in range(2)]
        rewards = [stack.enter_context(start_worker("medmo_trainer.rl.reward_server")) for _ in range(2)]
        for seed, model in sft_models.items():
            out, reports = grpo(tmp_path / f"seed{seed}", model, train, seed, rollouts, rewards)
            assert reports[-1]["phase"] == "Succeeded"
            rl_scores[seed] = score(out)
    # The expected IoU is printed beside the reward but not asserted: after this short SFT it is low
    # (0.03-0.06 at temperature 1) and its gain across seeds is not above the spread (README, #13's note).
    for metric in ("iou", "boxReward"):
        sft = {seed: scores[metric] for seed, scores in sft_scores.items()}
        rl = {seed: scores[metric] for seed, scores in rl_scores.items()}
        spread = max(sft.values()) - min(sft.values())
        table = "\n".join(f"seed {s}: SFT {sft[s]:.3f} -> GRPO {rl[s]:.3f}" for s in SEEDS)
        print(f"\nheld-out expected {metric}, SFT spread {spread:.3f}\n{table}")
    improved = [s for s in SEEDS if rl[s] - sft[s] > spread]  # the box reward's, the loop's last metric
    assert len(improved) >= 2, f"GRPO beat SFT by more than the SFT spread {spread:.3f} only for seeds {improved}:\n{table}"
