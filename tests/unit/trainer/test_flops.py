"""Model FLOPs from a config, counted by hand for the tiny presets, and the peak table behind MFU."""

from __future__ import annotations

import pytest
import torch

from medmo_trainer.flops import (
    BatchShape,
    mfu,
    peak_bf16_flops,
    text_matmul_params,
    training_flops,
    vision_matmul_params_per_patch,
)
from medmo_trainer.model.families import FAMILIES
from medmo_trainer.model.presets import PRESETS, tiny_processor


def _config(preset: str):
    family, make_config = PRESETS[preset]
    return make_config(tiny_processor(family).tokenizer)


def test_tiny_qwen3_vl_flops_match_a_hand_count():
    config = _config("tiny-qwen3-vl")
    vocab = config.text_config.vocab_size
    # Text, per layer: q and o 64x(4x16), k and v 64x(2x16); gate, up, down 64x128. Then the 64 x vocab head.
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128
    assert per_layer == 36_864
    assert text_matmul_params(config.text_config) == 2 * per_layer + 64 * vocab
    # Vision, per patch: a 3x2x16x16 -> 32 patch embedding; 2 blocks of qkv 32x96, proj 32x32, fc1/fc2 32x64;
    # merger and one deepstack merger (4x32=128 -> 128 -> 64), each seen once per 2x2 = 4 patches.
    patch_embed, block, merger = 3 * 2 * 16 * 16 * 32, 32 * 96 + 32 * 32 + 2 * 32 * 64, 128 * 128 + 128 * 64
    assert vision_matmul_params_per_patch(config) == patch_embed + 2 * block + 2 * merger / 4

    # Two packed samples of 3 and 5 tokens, one image of 2x4x4 patches: 6N per token or patch, plus
    # attention 12 x layers x heads x head width x context per token (4 heads of 16; 2 vision heads of 16).
    shape = BatchShape(sample_lengths=[3, 5], image_patches=[32])
    text = 6 * (2 * per_layer + 64 * vocab) * 8 + 12 * 2 * 64 * (3 * 3 + 5 * 5)
    vision = 6 * (patch_embed + 2 * block + 2 * merger / 4) * 32 + 12 * 2 * 32 * 32 * 32
    assert training_flops(config, shape) == pytest.approx(text + vision)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_counted_matrices_are_those_the_model_builds(preset):
    """The formula's matrices are exactly the Linear and Conv weights of the model built from the config."""
    config = _config(preset)
    with torch.device("meta"):
        model = FAMILIES[PRESETS[preset][0]].model_class(config)

    def entries(prefix: str) -> int:
        return sum(module.weight.numel() for name, module in model.named_modules()
                   if name.startswith(prefix) and isinstance(module, (torch.nn.Linear, torch.nn.Conv3d)))

    assert text_matmul_params(config.text_config) == entries("model.language_model") + entries("lm_head")
    per_patch = entries("model.visual.patch_embed") + entries("model.visual.blocks")
    per_merged_token = entries("model.visual.merger") + entries("model.visual.deepstack_merger_list")
    assert vision_matmul_params_per_patch(config) == per_patch + per_merged_token / 4


def test_batch_shape_reads_packed_rows_by_restarting_positions_and_padded_rows_by_mask():
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    packed = {"input_ids": torch.zeros(1, 8), "position_ids": torch.stack([positions] * 4),
              "image_grid_thw": torch.tensor([[1, 4, 4], [1, 2, 6]])}
    assert BatchShape.of(packed) == BatchShape(sample_lengths=[3, 5], image_patches=[16, 12])
    padded = {"input_ids": torch.zeros(2, 5), "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    assert BatchShape.of(padded) == BatchShape(sample_lengths=[3, 5], image_patches=[])


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H200", 989e12),
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A10", 125e12),
    ("NVIDIA A10G", None),  # not in the table: no MFU rather than a wrong one
    ("Tesla T4", None),
])
def test_peak_flops_by_device_name(name, peak):
    assert peak_bf16_flops(name) == peak


def test_mfu_is_flops_per_second_over_the_devices_peak_and_absent_without_one():
    assert mfu(989e12, 2.0, 989e12, 4) == pytest.approx(0.125)
    assert mfu(1e12, 1.0, None, 1) is None
