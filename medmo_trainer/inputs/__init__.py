"""Model inputs from MedMO records: chat prompts, token ids and labels, packing, and the training loader."""

from medmo_trainer.inputs.encode import IGNORE_INDEX, PromptInputs, build_prompt, num_tokens, prompt_messages
from medmo_trainer.inputs.loader import LoaderStats, TrainLoader, build_train_loader

__all__ = [
    "IGNORE_INDEX", "LoaderStats", "PromptInputs", "TrainLoader", "build_prompt", "build_train_loader", "num_tokens",
    "prompt_messages",
]
