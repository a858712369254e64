"""Supported model families: their classes, image settings and module groups.

Each family maps its parameters to the three trainable groups of `medmo_trainer.config.ModuleGroup`
by name prefix: the vision tower, the projector/merger that maps vision features into the language
model, and the language model (with its output head). A model with extra vision encoders
(`medmo_qwen3_vl`) counts them in `vision` and their projectors in `projector`, and also has one group
per encoder, `encoder:<name>`, and per projector, `projector:<name>`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel, Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

from medmo_trainer.config import ALL_MODULE_GROUPS, ModuleGroup
from medmo_trainer.model.encoders import unreachable_encoder_parameters
from medmo_trainer.model.modeling_medmo_vl import MedMOVLForConditionalGeneration


@dataclass(frozen=True)
class Family:
    """What the project knows about one model family."""

    name: str
    """transformers `model_type` of the family's top-level config."""
    model_class: type[PreTrainedModel]
    patch_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    group_prefixes: dict[ModuleGroup, tuple[str, ...]]
    """Parameter-name prefixes of each group; the first matching group wins, in the order projector,
    vision, language (the projector lives inside the vision tower's module)."""


_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

FAMILIES: dict[str, Family] = {
    "qwen3_vl": Family(
        name="qwen3_vl",
        model_class=Qwen3VLForConditionalGeneration,
        patch_size=16,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
        group_prefixes={
            # deepstack mergers project intermediate vision features into early LLM layers: projector too
            "projector": ("model.visual.merger.", "model.visual.deepstack_merger_list."),
            "vision": ("model.visual.",),
            "language": ("model.language_model.", "lm_head."),
        },
    ),
    "medmo_qwen3_vl": Family(
        name="medmo_qwen3_vl",
        model_class=MedMOVLForConditionalGeneration,
        patch_size=16,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
        group_prefixes={
            "projector": ("model.visual.merger.", "model.visual.deepstack_merger_list.", "model.extra_projectors."),
            "vision": ("model.visual.", "model.extra_encoders."),
            "language": ("model.language_model.", "lm_head."),
        },
    ),
    "qwen2_5_vl": Family(
        name="qwen2_5_vl",
        model_class=Qwen2_5_VLForConditionalGeneration,
        patch_size=14,
        image_mean=_CLIP_MEAN,
        image_std=_CLIP_STD,
        group_prefixes={
            "projector": ("model.visual.merger.",),
            "vision": ("model.visual.",),
            "language": ("model.language_model.", "lm_head."),
        },
    ),
}


class UnsupportedModelError(ValueError):
    """The model's family is not one the trainer knows how to split into module groups."""


def family_of(model: PreTrainedModel) -> Family:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; supported families: {sorted(FAMILIES)}"
        )
    return FAMILIES[model_type]


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a DDP/compile wrapper (their parameter names carry a prefix)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def module_groups(model: nn.Module) -> dict[str, list[str]]:
    """Parameter names of each module group; every parameter belongs to exactly one of the three
    `ModuleGroup`s. Extra vision encoders add `encoder:<name>` and `projector:<name>` groups (subsets of
    `vision` and `projector`)."""
    model = _unwrap(model)
    family = family_of(model)
    groups: dict[str, list[str]] = {group: [] for group in ALL_MODULE_GROUPS}
    for spec in getattr(model.config, "vision_encoders", None) or []:
        groups[f"encoder:{spec['name']}"] = []
        groups[f"projector:{spec['name']}"] = []
    order: tuple[ModuleGroup, ...] = ("projector", "vision", "language")
    for name, _ in model.named_parameters():
        group = next((g for g in order if name.startswith(family.group_prefixes[g])), None)
        if group is None:
            raise UnsupportedModelError(f"parameter {name!r} of a {family.name} model belongs to no module group")
        groups[group].append(name)
        for kind, prefix in (("encoder", "model.extra_encoders."), ("projector", "model.extra_projectors.")):
            if name.startswith(prefix):
                groups[f"{kind}:{name.removeprefix(prefix).split('.', 1)[0]}"].append(name)
    return groups


def apply_trainable(model: nn.Module, trainable: list[str] | tuple[str, ...]) -> list[str]:
    """Sets requires_grad on the parameters of the `trainable` groups only; returns their names.

    Build the optimizer from `requires_grad` parameters afterwards, so frozen groups get no state.
    """
    groups = module_groups(model)
    unknown = set(trainable) - set(groups)
    if unknown:
        raise ValueError(f"unknown module groups {sorted(unknown)}; this model has {list(groups)}")
    keep = {name for group in trainable for name in groups[group]}
    if family_of(_unwrap(model)).name == "medmo_qwen3_vl":
        keep -= unreachable_encoder_parameters(_unwrap(model))
    names = []
    for name, parameter in _unwrap(model).named_parameters():
        parameter.requires_grad_(name in keep)
        if name in keep:
            names.append(name)
    return names
