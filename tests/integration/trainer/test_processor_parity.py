"""The model a stage exports is served with the preprocessing it was trained with.

A real (tiny) sft stage runs under torchrun and exports its model; the stock
`transformers.AutoProcessor.from_pretrained(<export>)` — what a user, or a serving stack, loads —
must turn an image and a prompt into exactly the `input_ids`, `pixel_values` and `image_grid_thw`
the trainer's own encoding produced for training (and produces for evaluation and RL prompts).
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from integration.trainer_loop.trainer_loop_runs import assert_succeeded, run_stage, stage_config
from medmo_trainer.data.records import load_image
from medmo_trainer.data.schema import Record
from medmo_trainer.data.synthetic import generate
from medmo_trainer.inputs.encode import IGNORE_INDEX, encode_sample, prompt_messages
from medmo_trainer.model import load_model

IMAGE_SIZE = 80  # not the processor's default budget: the export must carry the stage's own


def _cases(data_dir) -> list[tuple[Record, Image.Image]]:
    """Synthetic records with their scans as the loader reads them, then shapes that take every resize
    path (larger than the budget, below the minimum, elongated, on the patch grid, grey, transparent)."""
    records = [Record.model_validate(json.loads(line))
               for shard in sorted(data_dir.glob("*.jsonl")) for line in shard.read_text().splitlines()]
    chosen = records[:40:8]
    scans = [load_image(str(data_dir / r.image)) for r in chosen]
    pixels = np.random.default_rng(7)
    made = [Image.fromarray(pixels.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
            ((512, 384), (20, 30), (40, 300), (64, 64))]
    made.append(Image.fromarray(pixels.integers(0, 256, (90, 120), dtype=np.uint8), "L"))
    made.append(Image.fromarray(pixels.integers(0, 256, (70, 50, 4), dtype=np.uint8), "RGBA"))
    return list(zip(chosen, scans)) + list(zip(itertools.cycle(chosen), made))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The folder a one-step sft stage (imageSize 80, 2 ranks) exported, and its training data."""
    tmp = tmp_path_factory.mktemp("parity")
    generate(str(tmp / "data"), n=8, seed=5)
    run = run_stage(tmp, stage_config(tmp, str(tmp / "data"), steps=1, hyperparameters={
        "learningRate": 1e-3, "maxSteps": 1, "perDeviceBatchSize": 2, "imageSize": IMAGE_SIZE, "maxSeqLength": 512}))
    assert_succeeded(run)
    return tmp / "model", tmp / "data"


def _stock_inputs(stock, image: Image.Image, prompt: str):
    """What a user runs: the model card's one call, the image inside the chat message."""
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
    return stock.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                     return_tensors="pt")


def test_the_stock_processor_of_an_export_gives_the_inputs_the_stage_trained_on(exported):
    model_dir, data_dir = exported
    stock = AutoProcessor.from_pretrained(model_dir)
    trained_with = load_model("preset:tiny-qwen3-vl").processor  # the stage's base model's processor

    for record, image in _cases(data_dir):
        sample = encode_sample(trained_with, record, [image], image_size=IMAGE_SIZE, max_seq_length=512)
        served = _stock_inputs(stock, image, record.prompt)

        prompt_length = int((sample.labels == IGNORE_INDEX).sum())
        shape = (image.height, image.width, image.mode)
        assert torch.equal(served["image_grid_thw"], sample.image_grid_thw), shape
        assert torch.equal(served["pixel_values"], sample.pixel_values), shape
        assert torch.equal(served["input_ids"][0], sample.input_ids[:prompt_length]), shape


def test_evaluation_and_rl_prompts_of_the_exported_model_match_the_stock_processor(exported):
    model_dir, data_dir = exported
    stock = AutoProcessor.from_pretrained(model_dir)
    trainer = load_model(str(model_dir)).processor  # how the next stage (eval, rl) loads the export

    for record, image in _cases(data_dir):
        ours = trainer([trainer.apply_chat_template(prompt_messages(record), add_generation_prompt=True)],
                       [image], image_size=IMAGE_SIZE)
        served = _stock_inputs(stock, image, record.prompt)

        shape = (image.height, image.width, image.mode)
        for key in ("input_ids", "pixel_values", "image_grid_thw", "attention_mask"):
            assert torch.equal(served[key], ours[key]), (key, shape)
