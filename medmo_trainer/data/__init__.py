"""MedMO data: the record schema, readers, the training loader and the synthetic generator."""

from medmo_trainer.data.encode import IGNORE_INDEX, PromptInputs, build_prompt, num_tokens, prompt_messages
from medmo_trainer.data.loader import LoaderStats, TrainLoader, build_train_loader
from medmo_trainer.data.records import (
    SKIP_REASONS,
    DatasetUnavailableError,
    MalformedRecordError,
    iter_records,
    load_image,
)
from medmo_trainer.data.schema import Box, Record, format_grounding, parse_grounding

__all__ = [
    "IGNORE_INDEX", "SKIP_REASONS", "Box", "DatasetUnavailableError", "LoaderStats", "MalformedRecordError",
    "PromptInputs", "Record", "TrainLoader", "build_prompt", "build_train_loader", "format_grounding",
    "iter_records", "load_image", "num_tokens", "parse_grounding", "prompt_messages",
]
