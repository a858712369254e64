"""Configuration of a Qwen3-VL model with extra vision encoders (MedMO's heterogeneous vision encoders).

This file and `modeling_medmo_vl.py` are saved beside an exported model's weights and loaded by stock
transformers with `trust_remote_code=True`: they import only torch and transformers, nothing of medmo_trainer.
"""

from __future__ import annotations

from transformers import Qwen3VLConfig


class MedMOVLConfig(Qwen3VLConfig):
    """A Qwen3-VL config plus `vision_encoders`: one dict per extra encoder, in the order their tokens follow
    the base tower's tokens of each image. Each dict holds:

    - `name`: the encoder's name (module key, and the `encoder:<name>` / `projector:<name>` trainable groups);
    - `image_size`: the square side, in pixels, each image is resized to for this encoder;
    - `pool_size`: its patch features are average-pooled to a `pool_size` x `pool_size` grid, so it adds
      `pool_size`**2 tokens per image;
    - `projector_layers`: linear layers of its MLP projector into the language model's hidden size;
    - `image_mean`, `image_std`: its pixel normalisation;
    - `encoder_config`: the encoder's own transformers config (`to_dict()`, with `model_type`).
    """

    model_type = "medmo_qwen3_vl"

    vision_encoders: list | None = None

    @property
    def extra_tokens_per_image(self) -> int:
        """Tokens the extra encoders add to every image, after the base tower's."""
        return sum(spec["pool_size"] ** 2 for spec in self.vision_encoders or [])
