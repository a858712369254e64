"""Extra vision encoders (`model.visionEncoders`): building them and joining them to a Qwen3-VL model.

`attach_vision_encoders` turns a loaded Qwen3-VL model into a `MedMOVLForConditionalGeneration`
(`modeling_medmo_vl`, which documents the token order and positions) with the base model's weights
unchanged, each extra encoder's weights from its source and a freshly initialised projector per encoder.
An encoder's `base` is a tiny random preset (`preset:tiny-siglip`, `preset:tiny-clip-vision`,
`preset:tiny-dinov2`: transformers config classes, two layers, hidden size 32, patch 8), or a local
folder, `file://`/`s3://` URI or Hub id of a transformers vision model, loaded with `AutoModel` (a full
CLIP or SigLIP checkpoint contributes its vision half).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, CLIPVisionConfig, Dinov2Config, PretrainedConfig, SiglipVisionConfig

from medmo_trainer.config import PRESET_PREFIX, VisionEncoderSpec
from medmo_trainer.model.configuration_medmo_vl import MedMOVLConfig
from medmo_trainer.model.modeling_medmo_vl import MedMOVLForConditionalGeneration

COMPOSITE_MODEL_TYPE = MedMOVLConfig.model_type

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_HALF = (0.5, 0.5, 0.5)

_TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 8}

ENCODER_PRESETS: dict[str, tuple[Callable[[int], PretrainedConfig], tuple[float, ...], tuple[float, ...]]] = {
    # name: (config builder taking the image size, image mean, image std)
    "tiny-siglip": (lambda size: SiglipVisionConfig(**_TINY, image_size=size), _HALF, _HALF),
    "tiny-clip-vision": (lambda size: CLIPVisionConfig(**_TINY, image_size=size), _CLIP_MEAN, _CLIP_STD),
    "tiny-dinov2": (lambda size: Dinov2Config(**_TINY, image_size=size), _IMAGENET_MEAN, _IMAGENET_STD),
}
_DEFAULT_NORMALISATION = {"siglip_vision_model": (_HALF, _HALF), "siglip": (_HALF, _HALF),
                          "clip_vision_model": (_CLIP_MEAN, _CLIP_STD), "clip": (_CLIP_MEAN, _CLIP_STD)}


def register_auto_classes() -> None:
    """Lets `AutoConfig`/`AutoModelForImageTextToText` load composite models in this process without remote
    code, and makes `save_pretrained` write `auto_map` and copy the modelling files beside the weights."""
    try:
        AutoConfig.register(COMPOSITE_MODEL_TYPE, MedMOVLConfig)
        AutoModelForImageTextToText.register(MedMOVLConfig, MedMOVLForConditionalGeneration)
    except ValueError:  # registered already
        pass
    MedMOVLConfig.register_for_auto_class()
    MedMOVLForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")


def build_encoder(spec: VisionEncoderSpec, *, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """(encoder, its entry of `MedMOVLConfig.vision_encoders`)."""
    if spec.base.startswith(PRESET_PREFIX):
        name = spec.base.removeprefix(PRESET_PREFIX)
        if name not in ENCODER_PRESETS:
            from medmo_trainer.model.loading import ModelUnavailableError

            raise ModelUnavailableError(f"unknown vision encoder preset {spec.base!r}; presets: {sorted(ENCODER_PRESETS)}")
        make_config, mean, std = ENCODER_PRESETS[name]
        config = make_config(spec.image_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = AutoModel.from_config(config)
    else:
        encoder, mean, std = _load_pretrained_encoder(spec.base)
        config = encoder.config
    patch = config.patch_size
    if spec.image_size % patch:
        raise ValueError(f"visionEncoders[{spec.name}].imageSize {spec.image_size} is not a multiple of the "
                         f"encoder's patch size {patch}")
    if spec.pool_size > spec.image_size // patch:
        raise ValueError(f"visionEncoders[{spec.name}].poolSize {spec.pool_size} exceeds the encoder's "
                         f"{spec.image_size // patch} patches per side")
    entry = {
        "name": spec.name, "image_size": spec.image_size, "pool_size": spec.pool_size,
        "projector_layers": spec.projector.layers, "image_mean": list(mean), "image_std": list(std),
        "encoder_config": config.to_dict(),
    }
    return encoder, entry


def _load_pretrained_encoder(base: str) -> tuple[torch.nn.Module, tuple, tuple]:
    from medmo_trainer.model.loading import ModelUnavailableError, resolve_model_folder

    folder = resolve_model_folder(base)
    try:
        model = AutoModel.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise ModelUnavailableError(f"cannot load vision encoder {base!r}: {error}") from error
    vision_config = getattr(model.config, "vision_config", None)
    if vision_config is not None and hasattr(model, "vision_model"):
        # a full CLIP/SigLIP checkpoint: keep its vision half as the matching vision model
        encoder = AutoModel.from_config(vision_config)
        wanted = encoder.state_dict().keys()
        vision = {k: v for k, v in model.state_dict().items() if k.startswith("vision_model.")}
        if not set(vision) & set(wanted):  # the vision model's own names may lack the prefix
            vision = {k.removeprefix("vision_model."): v for k, v in vision.items()}
        encoder.load_state_dict(vision)
        model = encoder
    if not hasattr(model.config, "patch_size"):
        raise ModelUnavailableError(f"vision encoder {base!r} ({model.config.model_type}) is not a patch-based vision model")
    mean, std = _DEFAULT_NORMALISATION.get(model.config.model_type, (_IMAGENET_MEAN, _IMAGENET_STD))
    preprocessor = folder / "preprocessor_config.json"
    if preprocessor.is_file():
        settings = json.loads(preprocessor.read_text())
        mean, std = settings.get("image_mean", mean), settings.get("image_std", std)
    return model, tuple(mean), tuple(std)


def attach_vision_encoders(model, specs: list[VisionEncoderSpec], *, seed: int = 0) -> MedMOVLForConditionalGeneration:
    """The Qwen3-VL `model` with the extra encoders of `specs` and new projectors (seeded by `seed`)."""
    if getattr(model.config, "model_type", None) != "qwen3_vl":
        raise ValueError(f"model.visionEncoders need a Qwen3-VL base model, not {model.config.model_type!r}")
    encoders, entries = {}, []
    for index, spec in enumerate(specs):
        encoders[spec.name], entry = build_encoder(spec, seed=seed + 1 + index)
        entries.append(entry)
    config = MedMOVLConfig(**{**model.config.to_dict(), "vision_encoders": entries})
    config.model_type = COMPOSITE_MODEL_TYPE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1000)
        composite = MedMOVLForConditionalGeneration._from_config(config, dtype=model.dtype)
    missing, unexpected = composite.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected, unexpected
    assert all(key.startswith(("model.extra_encoders.", "model.extra_projectors.")) for key in missing), missing
    for name, encoder in encoders.items():
        composite.model.extra_encoders[name].load_state_dict(encoder.state_dict())
    composite.model.extra_encoders.to(model.dtype)
    composite.generation_config = model.generation_config
    return composite


def unreachable_encoder_parameters(model) -> set[str]:
    """Names of extra-encoder parameters that never affect the model's tokens: the parts of a vision model
    the patch features do not pass through (CLIP's post-layernorm of its class token, SigLIP's pooling
    head, DINOv2's mask token). They stay frozen whatever `trainable` says: a parameter that trains but
    never gets a gradient stalls DDP's gradient reduction. Found by differentiating each encoder's
    pooled features of a blank view."""
    inner = model.model
    unreachable: set[str] = set()
    for spec in model.config.vision_encoders or []:
        encoder = inner.extra_encoders[spec["name"]]
        parameters = dict(encoder.named_parameters())
        flags = {name: p.requires_grad for name, p in parameters.items()}
        try:
            for p in parameters.values():
                p.requires_grad_(True)
            view = torch.zeros(1, 3 * spec["image_size"] ** 2, dtype=encoder.dtype, device=encoder.device)
            with torch.enable_grad():
                features = inner.pooled_encoder_features(spec, view)
                grads = torch.autograd.grad(features.sum(), list(parameters.values()), allow_unused=True)
        finally:
            for name, p in parameters.items():
                p.requires_grad_(flags[name])
        prefix = f"model.extra_encoders.{spec['name']}."
        unreachable.update(prefix + name for name, grad in zip(parameters, grads) if grad is None)
    return unreachable
