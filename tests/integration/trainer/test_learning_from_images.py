"""The image reaches the answer: a tiny model tells synthetic scans apart by their pixels alone."""

from __future__ import annotations

import json

import torch

from medmo_trainer.config import DatasetSpec, Hyperparameters
from medmo_trainer.inputs import IGNORE_INDEX, build_train_loader
from medmo_trainer.data.synthetic import generate
from medmo_trainer.model import load_model


def test_tiny_qwen3_learns_nodule_presence_from_pixels(tmp_path):
    """16 records share one question and differ only by image, half 'yes' and half 'no': answering all
    of them right needs the vision tower, the projector, packing and M-RoPE positions all to work."""
    generate(str(tmp_path / "all"), n=120, seed=2)
    records = [json.loads(line) for shard in sorted((tmp_path / "all").glob("*.jsonl"))
               for line in shard.read_text().splitlines()]
    presence = [r for r in records if r["prompt"] == "Is there a nodule?"]
    chosen = [r for r in presence if r["answer"] == "yes"][:8] + [r for r in presence if r["answer"] == "no"][:8]
    assert len(chosen) == 16
    for record in chosen:
        record["image"] = str(tmp_path / "all" / record["image"])
    (tmp_path / "presence.jsonl").write_text("\n".join(json.dumps(r) for r in chosen) + "\n")

    loaded = load_model("preset:tiny-qwen3-vl")
    hp = Hyperparameters(per_device_batch_size=16, image_size=128)
    loader = build_train_loader([DatasetSpec(name="presence", uri=str(tmp_path / "presence.jsonl"))],
                                loaded.processor, hp, rank=0, world_size=1, seed=0)
    optimizer = torch.optim.AdamW(loaded.model.parameters(), lr=1e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices this small run fastest on one thread, and the machine is shared
    try:
        for _ in range(250):
            batch = loader.next_batch()  # the same 16 records, in a new order each pass
            loaded.model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        with torch.no_grad():
            logits = loaded.model(**batch).logits[0]
    finally:
        torch.set_num_threads(threads)
    labels = batch["labels"][0]
    # the first answer token is predicted at the last prompt position
    answer_starts = [i for i in range(1, len(labels)) if labels[i] != IGNORE_INDEX and labels[i - 1] == IGNORE_INDEX]
    predicted = logits[[i - 1 for i in answer_starts]].argmax(-1)
    assert torch.equal(predicted, labels[answer_starts])
