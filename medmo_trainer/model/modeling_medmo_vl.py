"""A Qwen3-VL model with extra vision encoders, each with its own MLP projector into the language model.

Token order. Every image takes the base tower's merged patch tokens first (as in Qwen3-VL), then, for each
extra encoder in `config.vision_encoders` order, `pool_size`**2 tokens: the encoder's patch features of the
image resized to `image_size` x `image_size`, average-pooled to a `pool_size` x `pool_size` grid (row by
row) and projected. All of them are `<|image_pad|>` placeholders between the image's `<|vision_start|>`
and `<|vision_end|>`: an image takes `base tokens + config.extra_tokens_per_image` placeholders.

Positions (M-RoPE). The base tokens get Qwen3-VL's positions: time = start, height/width = start + row/column
of the merged grid, and the next position is start + max(grid height, grid width). Each extra encoder's grid
then continues from there as a grid of its own (time = its start, height/width = its start + row/column) and
advances the position by `pool_size`; text after the image resumes after the last grid. Deepstack features
(base tower features added to early language-model layers) are zero for the extra tokens.

Inputs. Besides Qwen3-VL's `pixel_values` and `image_grid_thw`, the model takes `encoder_pixel_values`:
one row per image, holding each extra encoder's normalised (3, image_size, image_size) view flattened, in
encoder order (`encode_extra_views` makes it). This file and `configuration_medmo_vl.py` are saved beside
exported weights, so stock transformers loads the model with `trust_remote_code=True`; they import only
torch, numpy, PIL and transformers.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModel
from transformers.models.qwen3_vl.modeling_qwen3_vl import (
    Qwen3VLForConditionalGeneration,
    Qwen3VLModel,
    Qwen3VLPreTrainedModel,
)

from .configuration_medmo_vl import MedMOVLConfig


def encode_extra_views(images, vision_encoders: list[dict]) -> torch.Tensor:
    """(images, sum of 3*image_size**2) float32: each image resized (bicubic, antialiased) to every extra
    encoder's square `image_size`, scaled to [0, 1] and normalised by its mean and std, flattened in order."""
    rows = []
    for image in images:
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
        views = []
        for spec in vision_encoders:
            side = spec["image_size"]
            view = torch.nn.functional.interpolate(pixels[None].float(), size=(side, side), mode="bicubic",
                                                   align_corners=False, antialias=True)[0]
            view = view.clamp(0, 255) / 255.0
            mean = torch.tensor(spec["image_mean"], dtype=torch.float32)[:, None, None]
            std = torch.tensor(spec["image_std"], dtype=torch.float32)[:, None, None]
            views.append(((view - mean) / std).reshape(-1))
        rows.append(torch.cat(views))
    return torch.stack(rows)


def _encoder_config(spec: dict):
    settings = dict(spec["encoder_config"])
    return AutoConfig.for_model(settings.pop("model_type"), **settings)


class ExtraProjector(nn.Module):
    """LayerNorm then an MLP (`layers` linear layers with GELU between) into the language model's width."""

    def __init__(self, in_features: int, out_features: int, layers: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_features)
        modules: list[nn.Module] = [nn.Linear(in_features, out_features)]
        for _ in range(layers - 1):
            modules += [nn.GELU(), nn.Linear(out_features, out_features)]
        self.mlp = nn.Sequential(*modules)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(features))


def _vision_positions(start: int, grid_h: int, grid_w: int, device) -> torch.Tensor:
    """(3, grid_h*grid_w) positions of a grid: time = start, height/width = start + row/column."""
    rows = torch.arange(grid_h, device=device).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, device=device).repeat(grid_h)
    return torch.stack([torch.full_like(rows, start), rows + start, cols + start])


class MedMOVLModel(Qwen3VLModel):
    config_class = MedMOVLConfig

    def __init__(self, config: MedMOVLConfig):
        Qwen3VLPreTrainedModel.__init__(self, config)
        self.visual = AutoModel.from_config(config.vision_config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.rope_deltas = None
        self.extra_encoders = nn.ModuleDict()
        self.extra_projectors = nn.ModuleDict()
        self._interpolates: dict[str, bool] = {}
        for spec in config.vision_encoders or []:
            encoder_config = _encoder_config(spec)
            encoder = AutoModel.from_config(encoder_config)
            self.extra_encoders[spec["name"]] = encoder
            self.extra_projectors[spec["name"]] = ExtraProjector(
                encoder_config.hidden_size, config.text_config.hidden_size, spec["projector_layers"])
            # CLIP and SigLIP embed positions for their config's image size unless told to interpolate;
            # DINOv2 always interpolates (and takes no such argument)
            takes_flag = "interpolate_pos_encoding" in inspect.signature(encoder.forward).parameters
            self._interpolates[spec["name"]] = takes_flag and getattr(encoder_config, "image_size", None) != spec["image_size"]
        self.post_init()

    def extra_image_features(self, encoder_pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, extra tokens per image, text hidden): every extra encoder's projected tokens, in order."""
        specs = self.config.vision_encoders or []
        sizes = [3 * spec["image_size"] ** 2 for spec in specs]
        if encoder_pixel_values.shape[-1] != sum(sizes):
            raise ValueError(f"encoder_pixel_values rows hold {encoder_pixel_values.shape[-1]} values; the extra "
                             f"encoders {[s['name'] for s in specs]} take {sum(sizes)} per image")
        tokens = []
        for spec, views in zip(specs, torch.split(encoder_pixel_values, sizes, dim=-1)):
            pooled = self.pooled_encoder_features(spec, views)
            tokens.append(self.extra_projectors[spec["name"]](pooled))
        return torch.cat(tokens, dim=1)

    def pooled_encoder_features(self, spec: dict, views: torch.Tensor) -> torch.Tensor:
        """(images, pool_size**2, encoder hidden): one extra encoder's patch features of its flattened views,
        average-pooled to its grid (row by row)."""
        name, side = spec["name"], spec["image_size"]
        encoder = self.extra_encoders[name]
        views = views.reshape(-1, 3, side, side).to(encoder.dtype)
        extra = {"interpolate_pos_encoding": True} if self._interpolates[name] else {}
        hidden = encoder(pixel_values=views, **extra).last_hidden_state
        patches_per_side = side // encoder.config.patch_size
        patches = hidden[:, -patches_per_side**2:]  # drops CLIP's and DINOv2's class (and register) tokens
        grid = patches.transpose(1, 2).reshape(patches.shape[0], -1, patches_per_side, patches_per_side)
        return nn.functional.adaptive_avg_pool2d(grid, spec["pool_size"]).flatten(2).transpose(1, 2)

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.LongTensor | None = None,
                           encoder_pixel_values: torch.Tensor | None = None, **kwargs):
        """The base tower's output, with each image's tokens followed by the extra encoders' tokens."""
        kwargs.pop("return_dict", None)
        output = super().get_image_features(pixel_values, image_grid_thw, return_dict=True, **kwargs)
        if not self.config.vision_encoders:
            return output
        if encoder_pixel_values is None:
            raise ValueError("this model has extra vision encoders: pass `encoder_pixel_values` with `pixel_values` "
                             "(modeling_medmo_vl.encode_extra_views makes them)")
        extras = self.extra_image_features(encoder_pixel_values)
        base = output.pooler_output
        if extras.shape[0] != len(base):
            raise ValueError(f"encoder_pixel_values has {extras.shape[0]} rows for {len(base)} images")
        extras = extras.to(base[0].dtype)
        output.pooler_output = tuple(torch.cat([b, e]) for b, e in zip(base, extras))
        output.deepstack_features = [
            tuple(torch.cat([f, f.new_zeros(extras.shape[1], f.shape[-1])]) for f in layer)
            for layer in output.deepstack_features
        ]
        return output

    def forward(self, *args, encoder_pixel_values: torch.Tensor | None = None, **kwargs):
        if kwargs.get("pixel_values") is not None:
            outputs = dict(kwargs.pop("mm_encoder_outputs", None) or {})
            outputs["image"] = self.get_image_features(kwargs.pop("pixel_values"), kwargs.get("image_grid_thw"),
                                                       encoder_pixel_values)
            kwargs["mm_encoder_outputs"] = outputs
        return super().forward(*args, **kwargs)

    def get_rope_index(self, input_ids: torch.LongTensor, mm_token_type_ids: torch.IntTensor,
                       image_grid_thw: torch.LongTensor | None = None, video_grid_thw: torch.LongTensor | None = None,
                       attention_mask: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen3-VL's M-RoPE positions with each image's extra-encoder grids after its base grid (module docstring)."""
        if video_grid_thw is not None:
            video_grid_thw = torch.repeat_interleave(video_grid_thw, video_grid_thw[:, 0], dim=0)
            video_grid_thw[:, 0] = 1
        merge = self.config.vision_config.spatial_merge_size
        extra_sides = [spec["pool_size"] for spec in self.config.vision_encoders or []]
        device = input_ids.device
        position_ids = torch.zeros(3, *input_ids.shape, dtype=input_ids.dtype, device=device)
        grids = {1: iter(image_grid_thw) if image_grid_thw is not None else None,
                 2: iter(video_grid_thw) if video_grid_thw is not None else None}
        deltas = []
        for row, ids in enumerate(input_ids):
            types = mm_token_type_ids[row]
            if attention_mask is not None:
                keep = attention_mask[row].bool()
                ids, types = ids[keep], types[keep]
            types = types.tolist()
            bounds = [0] + [i for i in range(1, len(types)) if types[i] != types[i - 1]] + [len(types)]
            pieces, current = [], 0
            for start, end in zip(bounds[:-1], bounds[1:]):
                kind = types[start]
                if kind == 0:
                    pieces.append(torch.arange(current, current + end - start, device=device).expand(3, -1))
                    current += end - start
                    continue
                _, grid_h, grid_w = (int(v) for v in next(grids[kind]))
                h, w = grid_h // merge, grid_w // merge
                pieces.append(_vision_positions(current, h, w, device))
                current += max(h, w)
                for side in extra_sides if kind == 1 else []:
                    pieces.append(_vision_positions(current, side, side, device))
                    current += side
            positions = torch.cat(pieces, dim=1)
            if attention_mask is not None:
                position_ids[:, row, attention_mask[row].bool()] = positions.to(position_ids.dtype)
            else:
                position_ids[:, row] = positions.to(position_ids.dtype)
            deltas.append(int(positions.max()) + 1 - len(ids))
        return position_ids, torch.tensor(deltas, device=device).unsqueeze(1)


class MedMOVLForConditionalGeneration(Qwen3VLForConditionalGeneration):
    """Qwen3-VL with extra vision encoders; `forward` and `generate` also take `encoder_pixel_values`."""

    config_class = MedMOVLConfig

    def __init__(self, config: MedMOVLConfig):
        Qwen3VLPreTrainedModel.__init__(self, config)
        self.model = MedMOVLModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.LongTensor = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values=None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                pixel_values: torch.Tensor | None = None, pixel_values_videos: torch.Tensor | None = None,
                image_grid_thw: torch.LongTensor | None = None, video_grid_thw: torch.LongTensor | None = None,
                mm_token_type_ids: torch.IntTensor | None = None, logits_to_keep: int | torch.Tensor = 0,
                mm_encoder_outputs: dict | None = None, encoder_pixel_values: torch.Tensor | None = None, **kwargs):
        """Qwen3-VL's forward; `encoder_pixel_values` go with `pixel_values` to the extra encoders."""
        if encoder_pixel_values is not None:
            kwargs["encoder_pixel_values"] = encoder_pixel_values
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels, pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
            mm_token_type_ids=mm_token_type_ids, logits_to_keep=logits_to_keep, mm_encoder_outputs=mm_encoder_outputs,
            **kwargs)

    def encode_extra_views(self, images) -> torch.Tensor:
        """`encoder_pixel_values` of PIL images, for this model's extra encoders."""
        return encode_extra_views(images, self.config.vision_encoders or [])

    def image_token_count(self, image_grid_thw: torch.Tensor) -> int:
        """`<|image_pad|>` placeholders one image of this grid takes: base tokens, then the extras'."""
        merge = self.config.vision_config.spatial_merge_size
        return int(image_grid_thw.prod()) // merge**2 + self.config.extra_tokens_per_image
