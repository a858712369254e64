"""Each stage of the recipe moves the metric it exists for, by more than seeds move it.

For 3 seeds, the real stages run in turn (`python -m medmo_trainer --config`, as in a pod) on synthetic
scans, from the tiny random Qwen3-VL preset: `align` (pretrain, whole model, captions), then `sft`
(VQA and grounding) from the aligned model, then an `eval` stage that scores the SFT model and the
aligned model on held-out scans. Alignment must lower the held-out caption loss; SFT must raise
held-out closed-VQA accuracy and grounding mean IoU over the aligned model. For every seed, each gain
must exceed the seed-to-seed spread of the metric, before and after the stage.

The three seeds' chains run side by side, one thread each. GRPO's gain over SFT across seeds is
`tests/integration/rl/test_rl_improves_grounding.py`.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from medmo_trainer.data import iter_records
from medmo_trainer.data.records import load_images
from medmo_trainer.inputs.encode import encode_sample, pad
from medmo_trainer.model import load_model
from integration.rl.pipeline import synthetic
from integration.trainer.chains import IMAGE_SIZE, run_stage, stage, training

SEEDS = (0, 1, 2)
ALIGN_STEPS, SFT_STEPS = 60, 500


def chain(root: Path, train: Path, heldout: Path, seed: int) -> dict:
    """align -> sft -> eval for one seed; the eval stage's metrics.json."""
    root.mkdir(parents=True)
    aligned, tuned = str(root / "align" / "model"), str(root / "sft" / "model")
    run_stage(root, stage(root, "align", "pretrain", "preset:tiny-qwen3-vl", seed,
                          datasets=[{"name": "captions", "uri": str(train), "tasks": ["caption"]}],
                          hyperparameters=training(ALIGN_STEPS, seed)))
    run_stage(root, stage(root, "sft", "sft", aligned, seed,
                          datasets=[{"name": "answers", "uri": str(train), "tasks": ["vqa", "grounding"]}],
                          hyperparameters=training(SFT_STEPS, seed)))
    run_stage(root, stage(root, "bench", "eval", tuned, seed,
                          benchmarks=[{"name": "heldout", "uri": str(heldout), "tasks": ["vqa", "grounding"]}],
                          hyperparameters={"imageSize": IMAGE_SIZE},
                          evaluation={"modelName": "sft", "maxNewTokens": 72,
                                      "compareModels": [{"name": "aligned", "uri": aligned}]}))
    return json.loads((root / "bench" / "metrics.json").read_text())


def caption_loss(model_uri: str, heldout: Path) -> float:
    """Mean teacher-forced loss of the held-out captions (answer tokens only)."""
    loaded = load_model(model_uri)
    model, processor = loaded.model.eval(), loaded.processor
    losses = []
    with torch.no_grad():
        for record in iter_records(str(heldout), ["caption"]):
            sample = encode_sample(processor, record, load_images(record), image_size=IMAGE_SIZE, max_seq_length=512)
            batch = pad([sample], processor.image_token_id, processor.tokenizer.pad_token_id)
            losses.append(float(model(**batch).loss))
    return sum(losses) / len(losses)


def spread(values: dict[int, float]) -> float:
    return max(values.values()) - min(values.values())


@pytest.mark.slow
def test_align_lowers_caption_loss_and_sft_raises_vqa_and_grounding_for_every_seed(tmp_path):
    train = synthetic(tmp_path / "train", 200, 0, "train")
    heldout = synthetic(tmp_path / "heldout", 30, 1, "heldout")
    with ThreadPoolExecutor(len(SEEDS)) as pool:
        runs = dict(zip(SEEDS, pool.map(lambda s: chain(tmp_path / f"seed{s}", train, heldout, s), SEEDS)))
    scores = {s: {m["name"]: m["benchmarks"]["heldout"] for m in runs[s]["models"]} for s in SEEDS}

    # the presets' random weights do not depend on the stage's seed: one caption loss before alignment
    before = caption_loss("preset:tiny-qwen3-vl", heldout)
    after = {s: caption_loss(str(tmp_path / f"seed{s}" / "align" / "model"), heldout) for s in SEEDS}
    lines = [f"caption loss: preset {before:.3f}, aligned " + ", ".join(f"{after[s]:.3f}" for s in SEEDS)]
    for metric in ("vqaClosedAcc", "groundingMiou"):
        lines.append(f"{metric}: " + ", ".join(
            f"seed {s} aligned {scores[s]['aligned'][metric]:.3f} -> sft {scores[s]['sft'][metric]:.3f}" for s in SEEDS))
    table = "\n".join(lines)
    print("\n" + table)

    assert all(before - after[s] > spread(after) for s in SEEDS), table
    for metric in ("vqaClosedAcc", "groundingMiou"):
        aligned = {s: scores[s]["aligned"][metric] for s in SEEDS}
        tuned = {s: scores[s]["sft"][metric] for s in SEEDS}
        noise = max(spread(aligned), spread(tuned))
        assert all(tuned[s] - aligned[s] > noise for s in SEEDS), f"{metric}\n{table}"
