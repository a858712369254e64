"""Model FLOPs of a training step, and model FLOPs utilisation (MFU) against a device's peak.

The count follows the usual convention (PaLM appendix B, torchtitan, nanoGPT): a weight matrix of N
entries costs 2N FLOPs per token in the forward pass and 4N in the backward pass, so training costs

    6 * N_matmul  per token                       (weights: every Linear/Conv matrix the token passes)
  + 12 * L * H * Q * s  per token of a sample of s tokens   (attention scores and values: QK^T and AV,
                                                 L layers, H heads of width Q, counted non-causal)

for the language model over every text token (image placeholder tokens included), and the same for
the vision tower over every image patch (s = the patches of its image; Qwen2.5-VL's windowed layers
see a window's patches only). Embedding lookups, norms, activations and the loss are left out, as
is recomputation by gradient checkpointing (MFU counts the model's FLOPs, not the hardware's). Counts
come from the model's config alone (`model.config`), so a 2B or 8B figure needs no weights.

MFU = model FLOPs per second / (peak dense bf16 FLOPs of one device x devices). Peaks come from
`PEAK_BF16_FLOPS` by device name; an unknown device, a CPU, or training in fp32 has no MFU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

PEAK_BF16_FLOPS: dict[str, float] = {
    # Dense (not 2:4 sparse) bf16 tensor-core peaks from NVIDIA's data sheets, SXM parts unless named.
    "B200": 2250e12,
    "H200": 989e12,
    "H100": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
}
"""Peak dense bf16 FLOPs per second of one device, keyed by the model in its CUDA device name."""


def peak_bf16_flops(device_name: str) -> float | None:
    """The peak of the device called `device_name` (e.g. `NVIDIA H100 80GB HBM3`), None when unknown.

    The longest key found as a whole word wins, so `H100 PCIe` beats `H100` and `A10` never matches `A100`."""
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", device_name, re.IGNORECASE):
            return PEAK_BF16_FLOPS[key]
    return None


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOPs of `device` computing in `dtype`; None on CPU, in fp32, or for an unknown GPU."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    return peak_bf16_flops(torch.cuda.get_device_name(device))


def text_matmul_params(text_config: Any) -> int:
    """Entries of the language model's matrices one token passes: attention, gated MLP, output head."""
    hidden = text_config.hidden_size
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or hidden // heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q and o; k and v
    mlp = 3 * hidden * text_config.intermediate_size  # gate, up, down
    return text_config.num_hidden_layers * (attention + mlp) + hidden * text_config.vocab_size


def vision_matmul_params_per_patch(model_config: Any) -> float:
    """Entries of the vision tower's matrices per image patch: patch embedding, blocks, and the merger
    (and Qwen3-VL's deepstack mergers), which see one merged token per `spatial_merge_size`**2 patches."""
    vision = model_config.vision_config
    width = vision.hidden_size
    in_channels = getattr(vision, "in_channels", None) or getattr(vision, "in_chans", 3)
    patch_embed = in_channels * vision.temporal_patch_size * vision.patch_size**2 * width
    mlp_matrices = 3 if model_config.model_type == "qwen2_5_vl" else 2  # gated MLP, or fc1/fc2
    block = 4 * width * width + mlp_matrices * width * vision.intermediate_size  # qkv, proj; MLP
    merge = vision.spatial_merge_size**2
    merged_width = width * merge
    merger = merged_width * merged_width + merged_width * vision.out_hidden_size
    mergers = 1 + len(getattr(vision, "deepstack_visual_indexes", None) or ())
    return patch_embed + vision.depth * block + mergers * merger / merge


@dataclass(frozen=True)
class BatchShape:
    """What the FLOPs of a batch depend on: sample lengths (text tokens) and image sizes (patches)."""

    sample_lengths: list[int]
    image_patches: list[int]

    @classmethod
    def of(cls, batch: dict[str, torch.Tensor]) -> BatchShape:
        """The shape of a training batch: packed (positions restart at each sample) or padded (a mask)."""
        if "attention_mask" in batch:
            lengths = [int(n) for n in batch["attention_mask"].sum(dim=1)]
        else:
            text_positions = batch["position_ids"][0] if batch["position_ids"].dim() == 3 else batch["position_ids"]
            lengths = []
            for row in text_positions:
                starts = (row == 0).nonzero().flatten().tolist() + [len(row)]
                lengths += [end - start for start, end in zip(starts, starts[1:]) if end > start]
        grid = batch.get("image_grid_thw")
        patches = [int(t * h * w) for t, h, w in grid.tolist()] if grid is not None else []
        return cls(lengths, patches)


def training_flops(model_config: Any, shape: BatchShape) -> float:
    """Model FLOPs of one forward and backward pass over a batch of this shape (see the module docstring)."""
    text = model_config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    tokens = sum(shape.sample_lengths)
    flops = 6 * text_matmul_params(text) * tokens
    flops += 12 * text.num_hidden_layers * text.num_attention_heads * head_dim * sum(s * s for s in shape.sample_lengths)
    if shape.image_patches:
        vision = model_config.vision_config
        flops += 6 * vision_matmul_params_per_patch(model_config) * sum(shape.image_patches)
        flops += 12 * vision.hidden_size * sum(patches * _vision_context(model_config, patches)
                                                for patches in shape.image_patches)
    return float(flops)


def _vision_context(model_config: Any, patches: int) -> int:
    """Patches an image's patch attends to, summed over the vision tower's layers."""
    vision = model_config.vision_config
    full_layers = getattr(vision, "fullatt_block_indexes", None)
    if full_layers is None:  # every layer attends over the whole image
        return vision.depth * patches
    window = (vision.window_size // vision.patch_size) ** 2  # Qwen2.5-VL: windows of window_size pixels
    return len(full_layers) * patches + (vision.depth - len(full_layers)) * min(patches, window)


def mfu(flops: float, seconds: float, peak_flops: float | None, devices: int) -> float | None:
    """Model FLOPs utilisation of `devices` devices that did `flops` in `seconds`; None without a known peak."""
    if peak_flops is None or seconds <= 0:
        return None
    return flops / seconds / (peak_flops * devices)
