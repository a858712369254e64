"""The pure parts of the RL controller: prompt sampling, references, reward statistics."""

import json

import pytest
from PIL import Image

from medmo_trainer.config import DatasetSpec
from medmo_trainer.exit_codes import DataError
from medmo_trainer.rl.controller import PromptSampler, reference_of, reward_metrics
from medmo_trainer.rl.prompts import load_image, portable_record


def write_records(path, n, task="vqa"):
    lines = [
        {"id": f"r{i}", "task": task, "image": f"images/{i}.png", "prompt": "Is there a nodule?",
         "answer": "yes", "answerType": "closed", "options": ["yes", "no"]}
        for i in range(n)
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json}\n")
    return path


def test_sampler_is_deterministic_by_step_and_skips_malformed(tmp_path):
    spec = DatasetSpec(name="a", uri=str(write_records(tmp_path / "a.jsonl", 20)))
    sampler = PromptSampler([spec], seed=3)
    assert len(sampler) == 20 and sampler.skipped["badJson"] == 1
    first = [r["id"] for r in sampler.sample(step=5, count=8)]
    assert first == [r["id"] for r in PromptSampler([spec], seed=3).sample(step=5, count=8)]  # resume-safe
    assert first != [r["id"] for r in sampler.sample(step=6, count=8)]
    # relative image paths are resolved against the shard's folder, so any worker can read them
    assert all(str(tmp_path / "images") in r["image"] for r in sampler.sample(step=5, count=3))


def test_local_images_travel_inline_to_workers_on_other_nodes(tmp_path):
    """A rollout worker is another pod: it cannot open a file on the learner's volumes."""
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "scan.png")
    record = {"prompt": "Locate the nodule.", "image": str(tmp_path / "scan.png")}

    shipped = portable_record(record)

    assert shipped["image"].startswith("data:image/png;base64,") and shipped["prompt"] == record["prompt"]
    assert load_image(shipped["image"]).getpixel((3, 3)) == (200, 10, 10)
    assert portable_record({**record, "image": f"file://{tmp_path}/scan.png"}) == shipped
    in_object_store = {**record, "image": "s3://scans/1.png"}
    assert portable_record(in_object_store) == in_object_store
    missing = {**record, "image": str(tmp_path / "gone.png")}
    assert portable_record(missing) == missing  # the worker reports it, as any unreadable image


def test_sampler_follows_mixture_weights(tmp_path):
    a = DatasetSpec(name="a", uri=str(write_records(tmp_path / "a.jsonl", 5)), weight=3.0)
    (tmp_path / "b").mkdir()
    b = DatasetSpec(name="b", uri=str(write_records(tmp_path / "b" / "b.jsonl", 5)), weight=1.0)
    drawn = [r["image"] for step in range(50) for r in PromptSampler([a, b], seed=0).sample(step, 8)]
    share_b = sum("/b/" in image for image in drawn) / len(drawn)
    assert 0.18 < share_b < 0.32  # 1/(3+1) = 0.25 expected


def test_empty_dataset_is_a_data_error(tmp_path):
    (tmp_path / "e.jsonl").write_text("{bad\n")
    with pytest.raises(DataError, match="no usable RL prompt"):
        PromptSampler([DatasetSpec(name="e", uri=str(tmp_path / "e.jsonl"))], seed=0)


def test_reference_keeps_what_rewards_check():
    record = {"task": "grounding", "answer": "nodule <box>[[1, 2, 3, 4]]</box>", "prompt": "Locate.",
              "boxes": [{"label": "nodule", "box": [1, 2, 3, 4]}], "options": [], "image": "/x.png"}
    assert reference_of(record) == {"task": "grounding", "answer": record["answer"], "boxes": record["boxes"]}


def test_reward_metrics_mean_and_spread_over_applicable_samples():
    scored = [
        {"total": 1.0, "components": {"bbox": 1.0, "accuracy": None}},
        {"total": 0.0, "components": {"bbox": 0.0, "accuracy": None}},
        {"total": 0.5, "components": {"bbox": 0.5, "accuracy": 1.0}},
    ]
    metrics = reward_metrics(scored)
    # bbox: mean 0.5, population std sqrt(((0.5)^2 + (0.5)^2 + 0)/3) = 0.4082483
    assert metrics["reward/bbox"] == pytest.approx(0.5)
    assert metrics["rewardStd/bbox"] == pytest.approx(0.4082483)
    assert metrics["reward/accuracy"] == 1.0 and metrics["rewardStd/accuracy"] == 0.0  # one applicable sample
    assert metrics["reward/total"] == pytest.approx(0.5)
