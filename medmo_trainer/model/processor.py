"""The processor of Qwen-VL family models, assembled by the project.

transformers' own `Qwen3VLProcessor` insists on a video processor, and every video processor needs
torchvision, which the trainer image does not ship. This processor does the same work for images
and text with what is installed (torch, PIL, the model's tokenizer and chat template), and gives the
same numbers as the stock processor a served model gets from `AutoProcessor.from_pretrained` on the
export (`Qwen2VLImageProcessor`, transformers' torchvision backend): the same resized size
(`smart_resize` under the stage's pixel budget), the same antialiased bicubic resize of the uint8
image, the same fused rescale-and-normalise, the same patch layout. A model trained on one
preprocessing and served with another would be silently worse. It saves in the Hugging Face layout,
with the pixel budget the stage trained with, so `AutoProcessor` loads the same folder wherever
torchvision is present.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoTokenizer, BatchFeature, PreTrainedTokenizerBase
from transformers.image_transforms import convert_to_rgb
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

from medmo_trainer.model.modeling_medmo_vl import encode_extra_views
from medmo_trainer.model.tokenizer import IMAGE_PAD, VISION_END, VISION_START

HF_PROCESSOR_CLASS = {"qwen3_vl": "Qwen3VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                      "medmo_qwen3_vl": "Qwen3VLProcessor"}


@dataclass
class VLProcessor:
    """Tokenizer + image preprocessing + chat template of one Qwen-VL family model."""

    tokenizer: PreTrainedTokenizerBase
    image_processor: Qwen2VLImageProcessorPil
    family: str
    vision_encoders: list[dict] = field(default_factory=list)
    """The model's extra vision encoders (`MedMOVLConfig.vision_encoders`): each image also gets their views
    (`encoder_pixel_values`) and their tokens after the base tower's (`modeling_medmo_vl`)."""

    @property
    def extra_pool_sizes(self) -> list[int]:
        """Grid side of each extra encoder's tokens, in order."""
        return [spec["pool_size"] for spec in self.vision_encoders]

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)

    @property
    def patch_factor(self) -> int:
        """Image sides must be multiples of this (patch size times spatial merge size)."""
        return self.image_processor.patch_size * self.image_processor.merge_size

    def set_image_size(self, image_size: int) -> None:
        """Resizes images to at most `image_size`**2 pixels from now on, here and in the saved
        preprocessor config, so the export's stock processor resizes as this stage trained."""
        min_pixels, max_pixels = self.pixel_bounds(image_size)
        self.image_processor.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}

    def pixel_bounds(self, image_size: int) -> tuple[int, int]:
        """(min_pixels, max_pixels) of an image resized under a budget of `image_size`**2 pixels."""
        budget = image_size * image_size
        return min(self.image_processor.size["shortest_edge"], budget), budget

    def resized_shape(self, height: int, width: int, image_size: int) -> tuple[int, int]:
        """(height, width) the stock processor resizes to: the aspect ratio kept, sides multiples of the
        patch factor, at most `image_size`**2 pixels (an image_size-sided square), small images enlarged
        to the processor's minimum."""
        min_pixels, max_pixels = self.pixel_bounds(image_size)
        return smart_resize(height, width, factor=self.patch_factor, min_pixels=min_pixels, max_pixels=max_pixels)

    def encode_images(self, images: list[Image.Image], image_size: int) -> dict[str, torch.Tensor]:
        """`pixel_values` (patches of all images, concatenated) and `image_grid_thw` (one row per image).

        The same numbers as the stock image processor's (see the module docstring), without its
        per-call validation overhead.
        """
        patches, grids = [], []
        for image in images:
            pixels = torch.from_numpy(convert_to_rgb(image, return_numpy=True)).permute(2, 0, 1).contiguous()
            height, width = self.resized_shape(pixels.shape[1], pixels.shape[2], image_size)
            if (height, width) != tuple(pixels.shape[1:]):
                # On uint8 input torch's antialiased bicubic kernel rounds and clamps as torchvision's resize does.
                pixels = torch.nn.functional.interpolate(pixels[None], size=(height, width), mode="bicubic",
                                                         align_corners=False, antialias=True)[0]
            flat, grid = self._patchify(self._normalize(pixels))
            patches.append(flat)
            grids.append(grid)
        features = {"pixel_values": torch.cat(patches), "image_grid_thw": torch.tensor(grids, dtype=torch.long)}
        if self.vision_encoders:
            features["encoder_pixel_values"] = encode_extra_views(images, self.vision_encoders)
        return features

    def _normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 -> float32 rescaled and normalised in one step, with the fused constants the
        stock processor uses (mean and std divided by the rescale factor), so the floats match to the bit."""
        processor = self.image_processor
        mean = torch.tensor(processor.image_mean) * (1.0 / processor.rescale_factor)
        std = torch.tensor(processor.image_std) * (1.0 / processor.rescale_factor)
        return (pixels.to(torch.float32) - mean[:, None, None]) / std[:, None, None]

    def _patchify(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """(3, H, W) -> (patches, channels*temporal*patch*patch) rows in merge-window order."""
        processor = self.image_processor
        patch, merge, temporal = processor.patch_size, processor.merge_size, processor.temporal_patch_size
        channels, height, width = pixels.shape
        grid_h, grid_w = height // patch, width // patch
        blocks = pixels.reshape(channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
        blocks = blocks.permute(1, 4, 2, 5, 0, 3, 6)  # (gh, gw, mh, mw, C, ph, pw)
        # a still image is its own temporal patch: the frame repeats temporal_patch_size times
        blocks = blocks[:, :, :, :, :, None].expand(*blocks.shape[:5], temporal, patch, patch)
        return blocks.reshape(grid_h * grid_w, -1), [1, grid_h, grid_w]

    def image_token_count(self, grid_thw: torch.Tensor) -> int:
        """LLM tokens one image takes: its patches, merged `merge_size`**2 at a time, then the extra encoders'."""
        return int(grid_thw.prod()) // self.image_processor.merge_size**2 + sum(s * s for s in self.extra_pool_sizes)

    def expand_image_tokens(self, text: str, grids: torch.Tensor) -> str:
        """Replaces each `<|image_pad|>` of `text` by as many as its image needs."""
        pieces = text.split(IMAGE_PAD)
        if len(pieces) - 1 != len(grids):
            raise ValueError(f"text has {len(pieces) - 1} image placeholders but {len(grids)} images were given")
        out = [pieces[0]]
        for grid, piece in zip(grids, pieces[1:]):
            out.append(IMAGE_PAD * self.image_token_count(grid) + piece)
        return "".join(out)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def __call__(self, text: list[str], images: list[Image.Image] | None = None, *, image_size: int = 768,
                 padding_side: str = "left") -> BatchFeature:
        """Model inputs for a batch of chat texts whose `<|image_pad|>` placeholders match `images` in order.

        Padded on the left by default, which is what generation wants.
        """
        features: dict[str, torch.Tensor] = {}
        if images:
            features = self.encode_images(images, image_size)
            grids = iter(features["image_grid_thw"])
            text = [self.expand_image_tokens(t, torch.stack([next(grids) for _ in range(t.count(IMAGE_PAD))])
                                             if IMAGE_PAD in t else torch.empty(0, 3)) for t in text]
        encoded = self.tokenizer(text, padding=True, padding_side=padding_side, return_tensors="pt",
                                 add_special_tokens=False)
        features["input_ids"] = encoded["input_ids"]
        features["attention_mask"] = encoded["attention_mask"]
        features["mm_token_type_ids"] = (encoded["input_ids"] == self.image_token_id).long()
        return BatchFeature(features)

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, ids, *, skip_special_tokens: bool = True) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, folder: str | Path) -> None:
        """Writes tokenizer, chat template, preprocessor config and processor config to a local folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)
        settings = {"processor_class": HF_PROCESSOR_CLASS[self.family]}
        if self.vision_encoders:
            # extra encoders' tokens and views: AutoProcessor (trust_remote_code) loads the processor saved beside
            for module in ("processing_medmo_vl", "modeling_medmo_vl", "configuration_medmo_vl"):
                shutil.copyfile(Path(__file__).with_name(f"{module}.py"), folder / f"{module}.py")
            settings = {"processor_class": "MedMOVLProcessor",
                        "auto_map": {"AutoProcessor": "processing_medmo_vl.MedMOVLProcessor"}}
        (folder / "processor_config.json").write_text(json.dumps(settings, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path, family: str) -> VLProcessor:
        """Loads a processor saved by `save_pretrained` or shipped with a Hugging Face Qwen-VL checkpoint
        (the extra vision encoders' views come from the model's config.json beside it)."""
        tokenizer = AutoTokenizer.from_pretrained(folder)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(folder)
        config = Path(folder) / "config.json"
        encoders = json.loads(config.read_text()).get("vision_encoders") or [] if config.is_file() else []
        return cls(tokenizer=tokenizer, image_processor=image_processor, family=family, vision_encoders=encoders)


def vision_markers_present(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer knows the Qwen-VL vision tokens (a single id each)."""
    unk = tokenizer.unk_token_id
    ids = tokenizer.convert_tokens_to_ids([IMAGE_PAD, VISION_START, VISION_END])
    return all(i is not None and i != unk for i in ids)
