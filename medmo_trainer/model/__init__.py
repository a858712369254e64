"""Models: loading from any source, tiny presets, the project's processor, module groups, export."""

from medmo_trainer.model.families import FAMILIES, UnsupportedModelError, apply_trainable, module_groups
from medmo_trainer.model.loading import LoadedModel, ModelUnavailableError, export_hf, load_model
from medmo_trainer.model.presets import PRESETS
from medmo_trainer.model.processor import VLProcessor

__all__ = [
    "FAMILIES", "PRESETS", "LoadedModel", "ModelUnavailableError", "UnsupportedModelError", "VLProcessor",
    "apply_trainable", "export_hf", "load_model", "module_groups",
]
