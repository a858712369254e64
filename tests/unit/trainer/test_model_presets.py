"""Tiny presets, tokenizer, processor, module groups and padding-free packing on real Qwen-VL classes."""

from __future__ import annotations

import pytest
import torch

from medmo_trainer.config import DatasetSpec, Hyperparameters
from medmo_trainer.data.synthetic import corpus_texts
from medmo_trainer.inputs import build_train_loader
from medmo_trainer.model import FAMILIES, apply_trainable, load_model, module_groups
from medmo_trainer.model.tokenizer import SPECIAL_TOKENS, TEXT_TOKENS


@pytest.mark.parametrize("preset", ["preset:tiny-qwen3-vl", "preset:tiny-qwen2.5-vl"])
def test_preset_trains_on_a_synthetic_batch(preset, synthetic_train, small_hp):
    loaded = load_model(preset)
    loader = build_train_loader([DatasetSpec(name="syn", uri=str(synthetic_train))], loaded.processor, small_hp,
                                rank=0, world_size=1, seed=0)
    batch = next(iter(loader))
    optimizer = torch.optim.AdamW(loaded.model.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):  # the same batch: a working forward/backward must fit it
        loss = loaded.model(**batch).loss
        loss.backward()
        if not losses:
            # every parameter takes part in the loss, so DDP needs no find_unused_parameters
            assert [n for n, p in loaded.model.named_parameters() if p.grad is None] == []
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5


def test_preset_weights_are_deterministic_by_seed():
    first = load_model("preset:tiny-qwen3-vl", seed=7).model.state_dict()
    again = load_model("preset:tiny-qwen3-vl", seed=7).model.state_dict()
    other = load_model("preset:tiny-qwen3-vl", seed=8).model.state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_tokenizer_round_trips_synthetic_texts_compactly(tiny_qwen3):
    tokenizer = tiny_qwen3.processor.tokenizer
    texts = list(corpus_texts(scenes=40, seed=99))  # scenes the tokenizer was not trained on
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    characters = sum(len(t) for t in texts[:-1])
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts[:-1])
    assert tokens < characters / 3  # trained on this vocabulary: whole words, not bytes
    for token in SPECIAL_TOKENS + TEXT_TOKENS:
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, token


def test_tokenizer_writes_numbers_digit_by_digit_as_qwen_does(tiny_qwen3):
    tokenizer = tiny_qwen3.processor.tokenizer
    ids = tokenizer("nodule <box>[[265, 25, 1000, 7]]</box>", add_special_tokens=False)["input_ids"]
    numeric = [tokenizer.decode([i]) for i in ids if any(c.isdigit() for c in tokenizer.decode([i]))]
    assert numeric == list("2652510007")


def test_chat_template_puts_image_before_the_question(tiny_qwen3):
    processor = tiny_qwen3.processor
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a nodule?"}]}],
        add_generation_prompt=True,
    )
    assert text == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Is there a nodule?<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_images_are_resized_to_the_pixel_budget(tiny_qwen3):
    from PIL import Image

    processor = tiny_qwen3.processor
    # (width, height), imageSize -> grid of 16 px patches: at most imageSize**2 pixels, the aspect ratio
    # kept, sides on the 32 px merge grid, small images enlarged to the minimum (3136 px): Qwen-VL's rule
    for size, image_size, expected in [((128, 96), 64, [1, 2, 4]), ((128, 96), 80, [1, 4, 4]),
                                       ((128, 96), 32, [1, 2, 2]), ((128, 96), 768, [1, 6, 8]),
                                       ((30, 20), 768, [1, 4, 6])]:
        grid = processor.encode_images([Image.new("RGB", size)], image_size)["image_grid_thw"][0].tolist()
        assert grid == expected, (size, image_size)


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl"])
def test_image_patches_equal_the_stock_image_processor(family):
    """Bit for bit what transformers' default (torchvision) Qwen-VL image processor gives under the
    same pixel budget: resize, rescale, normalise and patch layout."""
    import numpy as np
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    from medmo_trainer.model.presets import tiny_processor

    processor = tiny_processor(family)
    processor.set_image_size(128)
    stock = Qwen2VLImageProcessor.from_dict(processor.image_processor.to_dict())
    pixels = np.random.default_rng(0).integers(0, 256, size=(150, 100, 3), dtype=np.uint8)
    images = [Image.fromarray(pixels), Image.fromarray(pixels).rotate(90, expand=True)]
    ours = processor.encode_images(images, image_size=128)
    theirs = stock(images=images, return_tensors="pt")
    assert torch.equal(ours["image_grid_thw"], theirs["image_grid_thw"])
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])


def test_module_groups_partition_the_parameters(tiny_qwen3):
    groups = module_groups(tiny_qwen3.model)
    names = [n for n, _ in tiny_qwen3.model.named_parameters()]
    assert sorted(sum(groups.values(), [])) == sorted(names)
    assert all(groups[g] for g in ("vision", "projector", "language"))
    assert any(".merger." in n for n in groups["projector"])
    assert any(".blocks." in n for n in groups["vision"])
    assert "lm_head.weight" in groups["language"]


@pytest.mark.parametrize("preset", ["preset:tiny-qwen3-vl", "preset:tiny-qwen2.5-vl"])
def test_apply_trainable_projector_leaves_only_projector_params_trainable(preset, synthetic_train, small_hp):
    loaded = load_model(preset)
    trainable = apply_trainable(loaded.model, ["projector"])
    prefixes = FAMILIES[loaded.family].group_prefixes["projector"]
    assert trainable and all(name.startswith(prefixes) for name in trainable)
    assert {n for n, p in loaded.model.named_parameters() if p.requires_grad} == set(trainable)
    loader = build_train_loader([DatasetSpec(name="syn", uri=str(synthetic_train))], loaded.processor, small_hp,
                                rank=0, world_size=1, seed=0)
    loaded.model(**next(iter(loader))).loss.backward()
    with_grad = {n for n, p in loaded.model.named_parameters() if p.grad is not None}
    assert with_grad == set(trainable)


def test_apply_trainable_rejects_unknown_groups(tiny_qwen3):
    with pytest.raises(ValueError, match="unknown module groups.*'decoder'"):
        apply_trainable(tiny_qwen3.model, ["decoder"])


@pytest.mark.parametrize("preset", ["preset:tiny-qwen3-vl", "preset:tiny-qwen2.5-vl"])
def test_packed_row_gives_the_logits_of_separate_samples(preset, synthetic_train):
    """Packing is exact: no token attends across samples, and the loader's M-RoPE positions are the
    ones the model computes itself from mm_token_type_ids."""
    loaded = load_model(preset)
    spec = [DatasetSpec(name="syn", uri=str(synthetic_train))]
    packed_hp = Hyperparameters(per_device_batch_size=3, image_size=64, packing=True)
    single_hp = Hyperparameters(per_device_batch_size=1, image_size=64, packing=False)
    packed = next(iter(build_train_loader(spec, loaded.processor, packed_hp, rank=0, world_size=1, seed=5)))
    singles = build_train_loader(spec, loaded.processor, single_hp, rank=0, world_size=1, seed=5)
    with torch.no_grad():
        packed_logits = loaded.model(**packed).logits[0]
        offset = 0
        for _ in range(3):
            single = singles.next_batch()
            length = single["input_ids"].shape[1]
            assert torch.equal(packed["input_ids"][0, offset:offset + length], single["input_ids"][0])
            logits = loaded.model(**single).logits[0]
            torch.testing.assert_close(packed_logits[offset:offset + length], logits, atol=1e-5, rtol=1e-4)
            offset += length
    assert offset == packed["input_ids"].shape[1]
