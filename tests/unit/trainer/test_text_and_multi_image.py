"""Records with no image (MedQA-style questions) and with several images train and generate like any other."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from medmo_trainer.config import DatasetSpec, Hyperparameters
from medmo_trainer.data import iter_records
from medmo_trainer.data.schema import multiple_choice_prompt
from medmo_trainer.inputs import IGNORE_INDEX, build_prompt, build_train_loader

OPTIONS = ["Aspirin", "Heparin", "Warfarin", "Alteplase", "Clopidogrel"]


@pytest.fixture(scope="module")
def mixed_dataset(tmp_path_factory) -> str:
    """A text-only multiple-choice question, a two-image comparison and a one-image question."""
    folder = tmp_path_factory.mktemp("mixed")
    (folder / "images").mkdir()
    for name, shade in (("prior", 40), ("current", 200)):
        Image.new("RGB", (64, 48), (shade, shade, shade)).save(folder / "images" / f"{name}.png")
    records = [
        {"id": "medqa-1", "task": "vqa", "answerType": "choice", "options": OPTIONS, "answer": "D",
         "prompt": multiple_choice_prompt("Which drug dissolves a fresh clot in acute ischaemic stroke?", OPTIONS)},
        {"id": "compare-1", "task": "vqa", "answerType": "closed", "options": ["yes", "no"], "answer": "yes",
         "images": ["images/prior.png", "images/current.png"],
         "prompt": "The first image is the prior study. Is the opacity larger now?"},
        {"id": "single-1", "task": "caption", "image": "images/current.png", "prompt": "Describe the scan.",
         "answer": "A uniformly bright scan."},
    ]
    (folder / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(folder)


def _first_batch(uri, processor, packing: bool):
    hp = Hyperparameters(per_device_batch_size=3, image_size=64, max_seq_length=512, packing=packing)
    loader = build_train_loader([DatasetSpec(name="mixed", uri=uri)], processor, hp, rank=0, world_size=1, seed=0)
    return loader.next_batch(), loader.last_record_ids


def test_a_batch_of_text_only_multi_image_and_single_image_records_trains(mixed_dataset, tiny_qwen3):
    processor, model = tiny_qwen3.processor, tiny_qwen3.model
    packed, ids = _first_batch(mixed_dataset, processor, packing=True)
    padded, padded_ids = _first_batch(mixed_dataset, processor, packing=False)
    assert sorted(ids) == sorted(padded_ids) == ["compare-1", "medqa-1", "single-1"]

    # three images in all (two of the comparison, one of the caption), each with its own placeholders
    assert packed["image_grid_thw"].shape == (3, 3)
    image_tokens = sum(processor.image_token_count(grid) for grid in packed["image_grid_thw"])
    assert int((packed["input_ids"] == processor.image_token_id).sum()) == image_tokens
    answers = {r.id: r.answer for r in iter_records(mixed_dataset)}
    supervised = packed["labels"][packed["labels"] != IGNORE_INDEX]
    assert processor.tokenizer.decode(supervised) == "".join(answers[i] + "<|im_end|>" for i in ids)

    # The packed row carries the project's own multimodal positions; the padded rows get the model's.
    # Equal losses mean both agree on where each image and the text around it sit.
    with torch.no_grad():
        packed_loss = model(**packed).loss
        padded_loss = model(**padded).loss
    assert torch.isfinite(packed_loss)
    assert packed_loss.item() == pytest.approx(padded_loss.item(), rel=1e-4)


@pytest.mark.parametrize("packing", [True, False])
def test_a_batch_of_text_only_records_still_runs_the_vision_tower_and_adds_nothing_to_the_loss(
        tmp_path, tiny_qwen3, packing):
    """Every rank of a data-parallel stage must run the vision tower, even on a batch of text-only questions."""
    lines = [{"id": f"q{i}", "task": "vqa", "answerType": "choice", "options": OPTIONS, "answer": "ABCDE"[i],
              "prompt": multiple_choice_prompt(f"Question {i}?", OPTIONS)} for i in range(3)]
    (tmp_path / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    batch, ids = _first_batch(str(tmp_path), tiny_qwen3.processor, packing=packing)
    assert sorted(ids) == ["q0", "q1", "q2"]
    assert batch["image_grid_thw"].shape[0] == 1  # one smallest image, in no record's prompt
    image = batch["input_ids"] == tiny_qwen3.processor.image_token_id
    assert (batch["labels"][image] == IGNORE_INDEX).all()

    model = tiny_qwen3.model
    loss = model(**batch).loss
    loss.backward()
    try:
        vision = [p.grad for p in model.model.visual.parameters()]
        assert all(grad is not None for grad in vision)  # what DDP's reduction waits for on every rank
        assert all(float(grad.abs().sum()) == 0.0 for grad in vision)  # and nothing the image could teach
        assert model.get_input_embeddings().weight.grad.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)
    # the same loss as the text alone
    if packing:
        text_only = {"input_ids": batch["input_ids"][:, ~image[0]], "labels": batch["labels"][:, ~image[0]],
                     "position_ids": batch["position_ids"][:, :, ~image[0]]}
        keep = text_only["labels"].shape[1] - 2  # the image's start and end markers close the row
        text_only = {k: v[..., :keep] for k, v in text_only.items()}
    else:
        rows = ~image.any(dim=1)
        text_only = {k: batch[k][rows] for k in ("input_ids", "labels", "attention_mask")}
    with torch.no_grad():
        assert model(**text_only).loss.item() == pytest.approx(loss.item(), rel=1e-5)


def test_generation_prompts_show_every_image_of_a_record_or_none(mixed_dataset, tiny_qwen3):
    processor = tiny_qwen3.processor
    records = {r.id: r for r in iter_records(mixed_dataset)}
    text_only = build_prompt(processor, records["medqa-1"], image_size=64)
    assert "pixel_values" not in text_only.inputs and "<|image_pad|>" not in text_only.text
    assert "D. Alteplase" in text_only.text
    two = build_prompt(processor, records["compare-1"], image_size=64)
    assert two.text.count("<|vision_start|>") == 2 and len(two.images) == 2
    # the prior study (dark) comes first, as the record lists it
    assert two.images[0].getpixel((0, 0))[0] < two.images[1].getpixel((0, 0))[0]
    out = tiny_qwen3.model.generate(**two.inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > two.inputs["input_ids"].shape[1]


def test_rl_prompts_of_text_only_and_multi_image_records_carry_their_images(mixed_dataset, tiny_qwen3):
    from medmo_trainer.rl.prompts import Prompt, encode_prompts, portable_record

    processor = tiny_qwen3.processor
    wire = {r.id: portable_record(r.model_dump(mode="json", by_alias=True, exclude_none=True))
            for r in iter_records(mixed_dataset)}
    # what a rollout worker on another node receives: local images inline, in order
    assert [image[:22] for image in wire["compare-1"]["images"]] == ["data:image/png;base64,"] * 2
    both = encode_prompts(processor, [Prompt(record=wire["compare-1"]), Prompt(record=wire["medqa-1"])], image_size=64)
    assert both["image_grid_thw"].shape[0] == 2  # the comparison's two images; the text-only prompt has none
    image_tokens = (both["input_ids"] == processor.image_token_id).sum(dim=1)
    assert image_tokens[0] == sum(processor.image_token_count(g) for g in both["image_grid_thw"]) and image_tokens[1] == 0
    alone = encode_prompts(processor, [Prompt(record=wire["medqa-1"])], image_size=64)
    assert "pixel_values" not in alone
