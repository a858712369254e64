"""The training loader: a weighted mixture of datasets, sharded over ranks, packed, exactly resumable.

The sample stream is a pure function of the seed, so resuming needs only a position:

- Global positions 0, 1, 2, ... are assigned to datasets by seeded weighted draws, in chunks of
  `CHUNK` positions (each chunk drawn from its own seed, so no state beyond the chunk is needed).
- The m-th draw of dataset d reads its record `perm(seed, d, m // n_d)[m % n_d]`: every pass over a
  dataset is a fresh seeded permutation of it.
- Rank r of w reads positions r, r + w, r + 2w, ...: ranks' shares are disjoint and together cover
  the stream.
- A micro-batch is the next `perDeviceBatchSize` usable records of the rank's share; malformed ones
  are counted by reason and skipped.

The loader is infinite: it cycles each dataset, one fresh permutation per pass. The trainer decides
how many steps to run (`maxSteps`, or `epochs` x `samples_per_epoch` / global batch size).
`state_dict()` holds the rank's next position, so a resumed run sees exactly the batches an
uninterrupted one would (with the same world size).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from medmo_trainer.config import DatasetSpec, Hyperparameters
from medmo_trainer.data.encode import EncodedSample, encode_sample, num_tokens, pack, pad
from medmo_trainer.data.records import (
    DatasetUnavailableError,
    MalformedRecordError,
    RawRecord,
    load_image,
    read_raw_records,
    validate,
)
from medmo_trainer.model.processor import VLProcessor

CHUNK = 1024
"""Positions whose dataset choices are drawn together."""


@dataclass
class LoaderStats:
    """What this rank has read so far (sum over ranks for run totals)."""

    records_read: int = 0
    """Records taken from the stream, usable or not."""
    samples: int = 0
    """Records that went into batches."""
    tokens: int = 0
    """Tokens of the batches yielded (no padding counted)."""
    truncated: int = 0
    """Samples whose answers were cut at maxSeqLength."""
    skipped: Counter = field(default_factory=Counter)
    """Malformed records by reason (see `medmo_trainer.data.records.SKIP_REASONS`)."""
    per_dataset: Counter = field(default_factory=Counter)
    """Samples used per dataset name."""

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict:
        return {
            "recordsRead": self.records_read, "samples": self.samples, "tokens": self.tokens,
            "truncated": self.truncated, "skipped": dict(self.skipped), "perDataset": dict(self.per_dataset),
        }

    @classmethod
    def from_dict(cls, data: dict) -> LoaderStats:
        return cls(data["recordsRead"], data["samples"], data["tokens"], data["truncated"],
                   Counter(data["skipped"]), Counter(data["perDataset"]))


class MixtureStream:
    """Maps global stream positions to (dataset index, record index); pure function of the seed."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int):
        self.sizes = sizes
        self.probabilities = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.seed = seed
        self._chunk_cache: dict[int, np.ndarray] = {}
        self._permutation_cache: dict[tuple[int, int], np.ndarray] = {}

    def chunk_choices(self, chunk: int) -> np.ndarray:
        if chunk not in self._chunk_cache:
            rng = np.random.default_rng([self.seed, 0, chunk])
            self._chunk_cache = {chunk: rng.choice(len(self.sizes), size=CHUNK, p=self.probabilities)}
        return self._chunk_cache[chunk]

    def record_index(self, dataset: int, draw: int) -> int:
        """The record read by the `draw`-th draw of `dataset`."""
        size = self.sizes[dataset]
        key = (dataset, draw // size)
        if key not in self._permutation_cache:
            if len(self._permutation_cache) > 4 * len(self.sizes):
                self._permutation_cache.clear()
            self._permutation_cache[key] = np.random.default_rng([self.seed, 1, dataset, key[1]]).permutation(size)
        return int(self._permutation_cache[key][draw % size])


@dataclass
class StreamCursor:
    """Where a rank is in the stream: its next global position and each dataset's draws before that
    position's chunk."""

    position: int
    chunk_draws: list[int]

    def to_dict(self) -> dict:
        return {"position": self.position, "chunkDraws": list(self.chunk_draws)}


class TrainLoader:
    """Infinite iterator of ready batches for `model(**batch)` (see the module docstring).

    Each batch holds `input_ids`, `labels`, `mm_token_type_ids`, `pixel_values`, `image_grid_thw`, and
    either `position_ids` (packed: one row, no attention mask) or `attention_mask` (padded rows).
    """

    def __init__(self, datasets: list[DatasetSpec], processor: VLProcessor, hp: Hyperparameters, *,
                 rank: int, world_size: int, seed: int):
        if not datasets:
            raise ValueError("a training loader needs at least one dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.specs = datasets
        self.processor = processor
        self.hp = hp
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.records: list[list[RawRecord]] = []
        for spec in datasets:
            raw = read_raw_records(spec.uri, spec.tasks)
            if not raw:
                raise DatasetUnavailableError(spec.uri, f"no record of tasks {spec.tasks or 'any'}")
            self.records.append(raw)
        self.stream = MixtureStream([len(r) for r in self.records], [s.weight for s in datasets], seed)
        self.stats = LoaderStats()
        self.last_record_ids: list[str] = []
        """Ids of the records in the batch yielded last (for logs and debugging)."""
        self._cursor = StreamCursor(rank, [0] * len(datasets))

    @property
    def samples_per_epoch(self) -> int:
        """Records in all datasets (after task filters): one epoch's worth of samples over all ranks."""
        return sum(len(r) for r in self.records)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def next_batch(self) -> dict[str, torch.Tensor]:
        samples: list[EncodedSample] = []
        ids: list[str] = []
        skipped_in_a_row = 0
        while len(samples) < self.hp.per_device_batch_size:
            dataset, raw = self._take()
            self.stats.records_read += 1
            try:
                sample, record_id = self._encode(raw)
            except MalformedRecordError as error:
                self.stats.skipped[error.reason] += 1
                skipped_in_a_row += 1
                if skipped_in_a_row > self.samples_per_epoch:  # a whole pass of nothing usable: never ends
                    raise DatasetUnavailableError(
                        ", ".join(spec.uri for spec in self.specs),
                        f"no usable record in {skipped_in_a_row} reads; skipped: {dict(self.stats.skipped)}",
                    ) from error
                continue
            skipped_in_a_row = 0
            samples.append(sample)
            ids.append(record_id)
            self.stats.samples += 1
            self.stats.truncated += sample.truncated
            self.stats.per_dataset[self.specs[dataset].name] += 1
        tokenizer = self.processor.tokenizer
        if self.hp.packing:
            batch = pack(samples, self.processor.image_token_id)
        else:
            batch = pad(samples, self.processor.image_token_id, tokenizer.pad_token_id)
        self.stats.tokens += num_tokens(batch)
        self.last_record_ids = ids
        return batch

    def _take(self) -> tuple[int, RawRecord]:
        """The dataset index and record at the cursor; advances the cursor to this rank's next position."""
        cursor = self._cursor
        chunk, offset = divmod(cursor.position, CHUNK)
        choices = self.stream.chunk_choices(chunk)
        dataset = int(choices[offset])
        draw = cursor.chunk_draws[dataset] + int(np.count_nonzero(choices[:offset] == dataset))
        record = self.records[dataset][self.stream.record_index(dataset, draw)]
        next_position = cursor.position + self.world_size
        next_chunk = next_position // CHUNK
        for skipped_chunk in range(chunk, next_chunk):
            counts = np.bincount(self.stream.chunk_choices(skipped_chunk), minlength=len(self.specs))
            cursor.chunk_draws = [a + int(b) for a, b in zip(cursor.chunk_draws, counts)]
        cursor.position = next_position
        return dataset, record

    def _encode(self, raw: RawRecord) -> tuple[EncodedSample, str]:
        record = validate(raw)
        image = load_image(record.image)
        sample = encode_sample(self.processor, record, image, image_size=self.hp.image_size,
                               max_seq_length=self.hp.max_seq_length)
        return sample, record.id

    def state_dict(self) -> dict:
        """Plain data (JSON-able): the stream position of this rank and its statistics."""
        return {"seed": self.seed, "rank": self.rank, "worldSize": self.world_size,
                "cursor": self._cursor.to_dict(), "stats": self.stats.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continues from a saved position; the seed, rank and world size must match the saved ones."""
        saved = (state["seed"], state["rank"], state["worldSize"])
        if saved != (self.seed, self.rank, self.world_size):
            raise ValueError(
                f"loader state was saved with (seed, rank, worldSize) = {saved}, this loader has "
                f"{(self.seed, self.rank, self.world_size)}; resume with the same seed and number of ranks"
            )
        self._cursor = StreamCursor(state["cursor"]["position"], list(state["cursor"]["chunkDraws"]))
        self.stats = LoaderStats.from_dict(state["stats"])


def build_train_loader(datasets: list[DatasetSpec], processor: VLProcessor, hp: Hyperparameters, *,
                       rank: int, world_size: int, seed: int) -> TrainLoader:
    """The stage's training loader for one rank (raises DatasetUnavailableError for unreadable URIs)."""
    return TrainLoader(datasets, processor, hp, rank=rank, world_size=world_size, seed=seed)
