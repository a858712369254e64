"""The training loader: a weighted mixture of datasets, sharded over ranks, packed, exactly resumable.

The sample stream is a pure function of the seed, so a batch is a pure function of its index:

- Global positions 0, 1, 2, ... are assigned to datasets by seeded weighted draws, in chunks of
  `CHUNK` positions (each chunk drawn from its own seed).
- The m-th draw of dataset d reads its record `perm(seed, d, m // n_d)[m % n_d]`: every pass over a
  dataset is a fresh seeded permutation of it.
- Rank r of w owns positions r, r + w, r + 2w, ...: ranks' shares are disjoint and together cover
  the stream. Its batch b holds the usable records among its positions b*B ... b*B + B - 1, where B
  is `perDeviceBatchSize`; malformed ones are counted by reason and left out (so a batch may hold
  fewer than B samples; a batch with none is skipped).

The loader is infinite: it cycles each dataset, one fresh permutation per pass. The trainer decides
how many steps to run (`maxSteps`, or `epochs` x `samples_per_epoch` / global batch size).
`state_dict()` holds the rank's next batch index (and its statistics), so a resumed run sees exactly
the batches an uninterrupted one would (with the same seed, world size and batch size; after a
change of either size it continues from the nearest point of the same stream). Because batches do not
depend on each other, `num_workers` background processes can prepare them (torch's DataLoader),
in order, without changing what the trainer sees.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medmo_trainer.config import DatasetSpec, Hyperparameters
from medmo_trainer.inputs.encode import EncodedSample, encode_sample, num_tokens, pack, pad
from medmo_trainer.data.records import (
    DatasetUnavailableError,
    MalformedRecordError,
    RawRecord,
    load_images,
    read_raw_records,
    validate,
)
from medmo_trainer.model.processor import VLProcessor

logger = logging.getLogger(__name__)

CHUNK = 1024
"""Positions whose dataset choices are drawn together."""

WORKERS_ENV = "MEDMO_DATA_WORKERS"
"""Default number of batch-preparing processes per rank when `build_train_loader` is given none."""


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

    def add(self, other: LoaderStats) -> None:
        self.records_read += other.records_read
        self.samples += other.samples
        self.tokens += other.tokens
        self.truncated += other.truncated
        self.skipped.update(other.skipped)
        self.per_dataset.update(other.per_dataset)

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
    """Maps global stream positions to (dataset index, record index); a pure function of the seed."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int):
        self.sizes = sizes
        self.probabilities = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.seed = seed
        self._choices: dict[int, np.ndarray] = {}
        self._draws_before: list[np.ndarray] = [np.zeros(len(sizes), dtype=np.int64)]
        self._permutations: dict[tuple[int, int], np.ndarray] = {}

    def locate(self, position: int) -> tuple[int, int]:
        """The dataset and record index read at a global position."""
        chunk, offset = divmod(position, CHUNK)
        choices = self._chunk_choices(chunk)
        dataset = int(choices[offset])
        draw = int(self._draws_before_chunk(chunk)[dataset]) + int(np.count_nonzero(choices[:offset] == dataset))
        return dataset, self._record_index(dataset, draw)

    def _chunk_choices(self, chunk: int) -> np.ndarray:
        if chunk not in self._choices:
            if len(self._choices) > 8:
                self._choices.clear()
            rng = np.random.default_rng([self.seed, 0, chunk])
            self._choices[chunk] = rng.choice(len(self.sizes), size=CHUNK, p=self.probabilities)
        return self._choices[chunk]

    def _draws_before_chunk(self, chunk: int) -> np.ndarray:
        """Draws of each dataset in chunks 0 .. chunk-1 (prefix sums, extended on demand)."""
        while len(self._draws_before) <= chunk:
            done = len(self._draws_before) - 1
            counts = np.bincount(self._chunk_choices(done), minlength=len(self.sizes))
            self._draws_before.append(self._draws_before[-1] + counts)
        return self._draws_before[chunk]

    def _record_index(self, dataset: int, draw: int) -> int:
        size = self.sizes[dataset]
        key = (dataset, draw // size)
        if key not in self._permutations:
            if len(self._permutations) > 4 * len(self.sizes):
                self._permutations.clear()
            self._permutations[key] = np.random.default_rng([self.seed, 1, dataset, key[1]]).permutation(size)
        return int(self._permutations[key][draw % size])


@dataclass
class PreparedBatch:
    """A batch ready for the model (None when every record of its positions was malformed), with the
    statistics of making it and the ids of its records."""

    batch: dict[str, torch.Tensor] | None
    stats: LoaderStats
    record_ids: list[str]


class BatchSource(Dataset):
    """Batch index -> PreparedBatch for one rank; picklable, so DataLoader workers can run it."""

    def __init__(self, specs: list[DatasetSpec], records: list[list[RawRecord]], processor: VLProcessor,
                 hp: Hyperparameters, *, rank: int, world_size: int, seed: int):
        self.specs = specs
        self.records = records
        self.processor = processor
        self.hp = hp
        self.rank, self.world_size = rank, world_size
        self.stream = MixtureStream([len(r) for r in records], [s.weight for s in specs], seed)

    def __getitem__(self, index: int) -> PreparedBatch:
        size = self.hp.per_device_batch_size
        stats = LoaderStats()
        samples: list[EncodedSample] = []
        ids: list[str] = []
        for slot in range(index * size, (index + 1) * size):
            dataset, record_index = self.stream.locate(slot * self.world_size + self.rank)
            stats.records_read += 1
            try:
                sample, record_id = self._encode(self.records[dataset][record_index])
            except MalformedRecordError as error:
                stats.skipped[error.reason] += 1
                continue
            samples.append(sample)
            ids.append(record_id)
            stats.samples += 1
            stats.truncated += sample.truncated
            stats.per_dataset[self.specs[dataset].name] += 1
        if not samples:
            return PreparedBatch(None, stats, ids)
        if self.hp.packing:
            batch = pack(samples, self.processor.image_token_id)
        else:
            batch = pad(samples, self.processor.image_token_id, self.processor.tokenizer.pad_token_id)
        stats.tokens = num_tokens(batch)
        return PreparedBatch(batch, stats, ids)

    def __len__(self) -> int:  # infinite in truth; DataLoader only needs the method to exist
        return 2**62

    def _encode(self, raw: RawRecord) -> tuple[EncodedSample, str]:
        record = validate(raw)
        sample = encode_sample(self.processor, record, load_images(record), image_size=self.hp.image_size,
                               max_seq_length=self.hp.max_seq_length)
        return sample, record.id


def _as_is(item: PreparedBatch) -> PreparedBatch:
    return item


class TrainLoader:
    """Infinite iterator of ready batches for `model(**batch)` (see the module docstring).

    Each batch holds `input_ids`, `labels`, `mm_token_type_ids`, `pixel_values` and `image_grid_thw` (of
    all images of its records, in order; absent when every record is text-only), and
    either `position_ids` (packed: one row, no attention mask) or `attention_mask` (padded rows).
    `load_state_dict` may be called at any time: the next batch is then the one after the saved position.
    """

    def __init__(self, datasets: list[DatasetSpec], processor: VLProcessor, hp: Hyperparameters, *,
                 rank: int, world_size: int, seed: int, num_workers: int = 0):
        if not datasets:
            raise ValueError("a training loader needs at least one dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        records = []
        for spec in datasets:
            raw = read_raw_records(spec.uri, spec.tasks)
            if not raw:
                raise DatasetUnavailableError(spec.uri, f"no record of tasks {spec.tasks or 'any'}")
            records.append(raw)
        self.source = BatchSource(datasets, records, processor, hp, rank=rank, world_size=world_size, seed=seed)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_workers = num_workers
        self.stats = LoaderStats()
        self.last_record_ids: list[str] = []
        """Ids of the records in the batch yielded last (for logs and debugging)."""
        self._next_index = 0
        self._prepared: Iterator[PreparedBatch] | None = None

    @property
    def samples_per_epoch(self) -> int:
        """Records in all datasets (after task filters): one epoch's worth of samples over all ranks."""
        return sum(len(r) for r in self.source.records)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def next_batch(self) -> dict[str, torch.Tensor]:
        empty_in_a_row = 0
        while True:
            prepared = next(self._prepared_batches())
            self._next_index += 1
            self.stats.add(prepared.stats)
            if prepared.batch is not None:
                self.last_record_ids = prepared.record_ids
                return prepared.batch
            empty_in_a_row += 1
            if empty_in_a_row * self.source.hp.per_device_batch_size > self.samples_per_epoch:
                # a whole pass without one usable record: waiting longer would never end
                raise DatasetUnavailableError(
                    ", ".join(spec.uri for spec in self.source.specs),
                    f"no usable record in a full pass; skipped: {dict(self.stats.skipped)}",
                )

    def _prepared_batches(self) -> Iterator[PreparedBatch]:
        if self._prepared is None:
            if self.num_workers == 0:
                self._prepared = map(self.source.__getitem__, count(self._next_index))
            else:
                self._prepared = iter(DataLoader(
                    self.source, batch_size=None, sampler=count(self._next_index), num_workers=self.num_workers,
                    collate_fn=_as_is, prefetch_factor=2,
                ))
        return self._prepared

    def state_dict(self) -> dict:
        """Plain data (JSON-able): the next batch index of this rank and its statistics."""
        return {"seed": self.seed, "rank": self.rank, "worldSize": self.world_size,
                "batchSize": self.source.hp.per_device_batch_size, "nextBatch": self._next_index,
                "stats": self.stats.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continues from a saved position (call before iterating).

        Exact when seed, world size and batch size are unchanged. After a change of world size or batch
        size, it continues at the batch boundary nearest to where the saved run was in the global
        stream (the few samples around it may be seen twice or not at all), and says so in the log.
        """
        if state["seed"] != self.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, this loader has seed {self.seed}; "
                             "resume with the same seed")
        batch_size = self.source.hp.per_device_batch_size
        next_index = state["nextBatch"]
        if (state["worldSize"], state["batchSize"]) != (self.world_size, batch_size):
            consumed = next_index * state["batchSize"] * state["worldSize"]
            next_index = round(consumed / (batch_size * self.world_size))
            logger.warning(
                "data position saved with %d ranks x %d samples, resumed with %d x %d: continuing at global "
                "position %d (saved %d); samples near it may repeat or be skipped",
                state["worldSize"], state["batchSize"], self.world_size, batch_size,
                next_index * batch_size * self.world_size, consumed,
            )
        self._next_index = next_index
        self.stats = LoaderStats.from_dict(state["stats"])
        self._prepared = None  # prepared-ahead batches belong to the old position


def default_num_workers() -> int:
    return int(os.environ.get(WORKERS_ENV, "0"))


def build_train_loader(datasets: list[DatasetSpec], processor: VLProcessor, hp: Hyperparameters, *,
                       rank: int, world_size: int, seed: int, num_workers: int | None = None) -> TrainLoader:
    """The stage's training loader for one rank (raises DatasetUnavailableError for unreadable URIs).

    `num_workers` background processes prepare batches ahead (default: $MEDMO_DATA_WORKERS, else 0).
    """
    workers = default_num_workers() if num_workers is None else num_workers
    return TrainLoader(datasets, processor, hp, rank=rank, world_size=world_size, seed=seed, num_workers=workers)
