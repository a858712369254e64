"""Turning records into model inputs: chat prompts, answer-only labels, multimodal RoPE positions, packing.

Packing is padding-free: the samples of a micro-batch are concatenated into one row. Each sample
keeps its own positions, which restart at 0, and no `attention_mask` is passed: transformers then
derives a block-diagonal causal mask (or flash-attention's cu_seqlens) from the restarting text
positions, so no token attends across samples and the logits equal those of separate forward passes. That
needs forward passes without a KV cache (`use_cache` off, as `load_model` leaves the model).
Qwen-VL models take `position_ids` of shape (4, batch, seq): row 0 the text positions, rows 1-3 the
multimodal RoPE (time, height, width) positions, computed here per sample exactly as the model's own
`get_rope_index` would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from transformers import BatchFeature

from medmo_trainer.data.records import MalformedRecordError, load_images
from medmo_trainer.data.schema import Record
from medmo_trainer.model.processor import VLProcessor
from medmo_trainer.model.tokenizer import IM_END, IMAGE_PAD, VISION_END, VISION_START

IGNORE_INDEX = -100


@dataclass
class EncodedSample:
    """One record as token ids, labels, positions and image patches."""

    input_ids: torch.Tensor
    """(seq,) prompt then answer tokens."""
    labels: torch.Tensor
    """(seq,) IGNORE_INDEX except on the answer tokens (and the end-of-turn token after them)."""
    position_ids: torch.Tensor
    """(4, seq): text positions, then multimodal RoPE time/height/width positions."""
    pixel_values: torch.Tensor | None
    """Patches of the record's images; None for a text-only record."""
    image_grid_thw: torch.Tensor | None
    """(images, 3); None for a text-only record."""
    truncated: bool
    encoder_pixel_values: torch.Tensor | None = None
    """(images, values) views of the images for the model's extra vision encoders; None without them."""


def prompt_messages(record: Record) -> list[dict]:
    """The chat turn asking the record's question: its images in order (none for a text-only record), then the text."""
    images = [{"type": "image"} for _ in record.image_refs]
    return [{"role": "user", "content": [*images, {"type": "text", "text": record.prompt}]}]


def rope_positions(mm_token_type_ids: torch.Tensor, image_grid_thw: torch.Tensor, merge_size: int,
                   extra_pool_sizes: list[int] | tuple[int, ...] = ()) -> torch.Tensor:
    """(3, seq) multimodal RoPE positions of one unpacked sample of text and images.

    Text tokens advance all three rows together; an image's tokens get its start position in the time
    row and start + row/column index of the merged patch grid in the height/width rows; text after an
    image resumes at start + max(grid height, grid width) (what Qwen2.5-VL and Qwen3-VL do for images).
    Extra vision encoders' tokens (`extra_pool_sizes`, one grid side each) follow as grids of their own
    that continue from there (`medmo_trainer.model.modeling_medmo_vl`).
    """
    types = mm_token_type_ids.tolist()
    changes = [0] + [i for i in range(1, len(types)) if types[i] != types[i - 1]] + [len(types)]
    positions = []
    grids = iter(image_grid_thw.tolist())
    current = 0
    for start, end in zip(changes[:-1], changes[1:]):
        if types[start] == 0:
            positions.append(torch.arange(current, current + end - start).expand(3, -1))
            current += end - start
        else:
            _, grid_h, grid_w = next(grids)
            h, w = grid_h // merge_size, grid_w // merge_size
            rows = torch.arange(h).repeat_interleave(w)
            cols = torch.arange(w).repeat(h)
            positions.append(torch.stack([torch.full_like(rows, current), rows + current, cols + current]))
            current += max(h, w)
            for side in extra_pool_sizes:
                rows = torch.arange(side).repeat_interleave(side)
                cols = torch.arange(side).repeat(side)
                positions.append(torch.stack([torch.full_like(rows, current), rows + current, cols + current]))
                current += side
    return torch.cat(positions, dim=1)


def encode_sample(processor: VLProcessor, record: Record, images: list[Image.Image], *, image_size: int,
                  max_seq_length: int) -> EncodedSample:
    """Tokenises a record with its images (none for a text-only record) for training; answers longer
    than the budget are cut (`truncated`), a prompt that alone fills `max_seq_length` raises
    MalformedRecordError('tooLong')."""
    vision = processor.encode_images(images, image_size) if images else {"pixel_values": None,
                                                                         "image_grid_thw": torch.empty(0, 3)}
    prompt = processor.apply_chat_template(prompt_messages(record), add_generation_prompt=True)
    prompt = processor.expand_image_tokens(prompt, vision["image_grid_thw"])
    tokenizer = processor.tokenizer
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(record.answer + IM_END, add_special_tokens=False)["input_ids"]
    if len(prompt_ids) >= max_seq_length:
        raise MalformedRecordError("tooLong", f"prompt of {len(prompt_ids)} tokens >= maxSeqLength {max_seq_length}")
    room = max_seq_length - len(prompt_ids)
    truncated = len(answer_ids) > room
    answer_ids = answer_ids[:room]
    input_ids = torch.tensor(prompt_ids + answer_ids)
    labels = torch.tensor([IGNORE_INDEX] * len(prompt_ids) + answer_ids)
    mm_types = (input_ids == processor.image_token_id).long()
    mrope = rope_positions(mm_types, vision["image_grid_thw"], processor.image_processor.merge_size,
                           processor.extra_pool_sizes)
    text = torch.arange(len(input_ids)).unsqueeze(0)
    return EncodedSample(input_ids, labels, torch.cat([text, mrope]), vision["pixel_values"],
                         vision["image_grid_thw"] if images else None, truncated, vision.get("encoder_pixel_values"))


def keep_vision_in_graph(samples: list[EncodedSample], processor: VLProcessor, image_size: int) -> list[EncodedSample]:
    """The samples, plus one image-only sample without labels when none of them shows an image.

    Under DDP, FSDP or DeepSpeed every rank must run the vision tower in every micro-batch: a rank
    whose batch happened to be all text-only (MedQA-style questions) would otherwise leave its vision
    parameters without a gradient and the ranks' gradient reductions (or FSDP's gathers) out of step,
    which hangs or fails the stage. The extra sample is a smallest image and its placeholders, a
    sample of its own in a packed row (positions restart, so nothing attends to it) or a row of its
    own when padded; with no labels it adds nothing to the loss and zeros to the gradients.
    """
    if any(s.pixel_values is not None for s in samples):
        return samples
    side = processor.patch_factor
    vision = processor.encode_images([Image.new("RGB", (side, side))], image_size)
    tokenizer = processor.tokenizer
    text = VISION_START + processor.expand_image_tokens(IMAGE_PAD, vision["image_grid_thw"]) + VISION_END
    input_ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    mrope = rope_positions((input_ids == processor.image_token_id).long(), vision["image_grid_thw"],
                           processor.image_processor.merge_size, processor.extra_pool_sizes)
    keepalive = EncodedSample(input_ids, torch.full_like(input_ids, IGNORE_INDEX),
                              torch.cat([torch.arange(len(input_ids)).unsqueeze(0), mrope]),
                              vision["pixel_values"], vision["image_grid_thw"], truncated=False,
                              encoder_pixel_values=vision.get("encoder_pixel_values"))
    return [*samples, keepalive]


def _vision_inputs(samples: list[EncodedSample]) -> dict[str, torch.Tensor]:
    """`pixel_values` and `image_grid_thw` of the samples' images, in order; none for a text-only batch."""
    with_images = [s for s in samples if s.pixel_values is not None]
    if not with_images:
        return {}
    inputs = {"pixel_values": torch.cat([s.pixel_values for s in with_images]),
              "image_grid_thw": torch.cat([s.image_grid_thw for s in with_images])}
    if with_images[0].encoder_pixel_values is not None:
        inputs["encoder_pixel_values"] = torch.cat([s.encoder_pixel_values for s in with_images])
    return inputs


def pack(samples: list[EncodedSample], image_token_id: int) -> dict[str, torch.Tensor]:
    """One padding-free row holding all samples (see the module docstring)."""
    input_ids = torch.cat([s.input_ids for s in samples]).unsqueeze(0)
    return {
        "input_ids": input_ids,
        "labels": torch.cat([s.labels for s in samples]).unsqueeze(0),
        "position_ids": torch.cat([s.position_ids for s in samples], dim=1).unsqueeze(1),
        "mm_token_type_ids": (input_ids == image_token_id).long(),
        **_vision_inputs(samples),
    }


def pad(samples: list[EncodedSample], image_token_id: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """One row per sample, right-padded to the longest; positions come from the model (it reads the mask)."""
    longest = max(len(s.input_ids) for s in samples)

    def padded(tensor: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(tensor, (0, longest - len(tensor)), value=value)

    input_ids = torch.stack([padded(s.input_ids, pad_token_id) for s in samples])
    return {
        "input_ids": input_ids,
        "attention_mask": torch.stack([padded(torch.ones_like(s.input_ids), 0) for s in samples]),
        "labels": torch.stack([padded(s.labels, IGNORE_INDEX) for s in samples]),
        "mm_token_type_ids": (input_ids == image_token_id).long(),
        **_vision_inputs(samples),
    }


def num_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens of a batch, for throughput."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


@dataclass
class PromptInputs:
    """A record prepared for generation: what to feed `model.generate` and what to compare against."""

    record: Record
    messages: list[dict]
    text: str
    images: list[Image.Image]
    inputs: BatchFeature
    """input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw (batch of one)."""

    @property
    def reference(self) -> str:
        return self.record.answer


def build_prompt(processor: VLProcessor, record: Record, *, image_size: int = 768) -> PromptInputs:
    """The generation prompt of a record (its images loaded and resized to the pixel budget)."""
    messages = prompt_messages(record)
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    images = load_images(record)
    return PromptInputs(record, messages, text, images, processor([text], images, image_size=image_size))
