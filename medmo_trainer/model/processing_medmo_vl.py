"""The stock Qwen3-VL processor, extended for a model with extra vision encoders (`modeling_medmo_vl`).

Saved beside an exported model, so `AutoProcessor.from_pretrained(path, trust_remote_code=True)` gives inputs
that model takes: each image's `<|image_pad|>` placeholder expanded to the base tower's tokens plus the extra
encoders' (`config.extra_tokens_per_image`), and `encoder_pixel_values` beside `pixel_values`. It reads the
extra encoders from the model's config.json next to it. Imports only transformers (and the files beside it).
"""

from __future__ import annotations

import json

from transformers import Qwen3VLProcessor
from transformers.utils import cached_file

from .modeling_medmo_vl import encode_extra_views


class MedMOVLProcessor(Qwen3VLProcessor):
    vision_encoders: list[dict] = []

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        config = cached_file(pretrained_model_name_or_path, "config.json",
                             **{k: v for k, v in kwargs.items() if k in ("revision", "token", "cache_dir")})
        with open(config) as handle:
            processor.vision_encoders = json.load(handle).get("vision_encoders") or []
        return processor

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        extra = sum(spec["pool_size"] ** 2 for spec in self.vision_encoders)
        return super().replace_image_token(image_inputs, image_idx, **kwargs) + self.image_token * extra

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        features = super().__call__(images=images, text=text, videos=videos, **kwargs)
        if images is not None and self.vision_encoders:
            flat = images if isinstance(images, (list, tuple)) else [images]
            flat = [image for item in flat for image in (item if isinstance(item, (list, tuple)) else [item])]
            features["encoder_pixel_values"] = encode_extra_views(flat, self.vision_encoders)
        return features
