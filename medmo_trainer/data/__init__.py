"""MedMO data: the record schema, readers and the synthetic generator (model inputs: `medmo_trainer.inputs`)."""

from medmo_trainer.data.records import (
    SKIP_REASONS,
    DatasetUnavailableError,
    MalformedRecordError,
    iter_records,
    load_image,
)
from medmo_trainer.data.schema import Box, Record, format_grounding, parse_grounding

__all__ = [
    "SKIP_REASONS", "Box", "DatasetUnavailableError", "MalformedRecordError", "Record", "format_grounding",
    "iter_records", "load_image", "parse_grounding",
]
