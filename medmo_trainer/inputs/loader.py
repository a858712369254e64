"""The training loader: a weighted mixture of datasets streamed shard by shard, split over ranks, packed,
exactly resumable.

A dataset is a sequence of shards whose record counts are known before any is read
(`medmo_trainer.data.shards`). A rank reads only the shards its share needs, one at a time, with the
next one read ahead by a background thread, and images only when a sample is made; memory per rank
is a few shards, whatever the dataset's size. Each rank's sample stream is a pure function of the
seed, so a batch is a pure function of its index:

- Every pass over dataset d puts its shards in a seeded order and each shard's records in a seeded
  order. Rank r of w owns the records at places [r*N/w, (r+1)*N/w) of that order (N: the dataset's
  records after the task filter): ranks' shares are disjoint, together cover the data, and each spans
  about 1/w of the shards (every pass another seeded choice of them).
- The rank's positions 0, 1, 2, ... are assigned to datasets by weighted draws seeded by the rank, in
  chunks of `CHUNK` positions (each chunk drawn from its own seed). The m-th draw of dataset d is the
  record at place m % n of the rank's share in pass m // n (n: the share's size).
- Batch b holds the usable records among positions b*B ... b*B + B - 1, where B is
  `perDeviceBatchSize`; malformed ones are counted by reason and left out (so a batch may hold fewer
  than B samples; a batch with none is skipped).

The loader is infinite: it cycles each dataset, one fresh order per pass. The trainer decides how many
steps to run (`maxSteps`, or `epochs` x `samples_per_epoch` / global batch size). `state_dict()`
holds the rank's next batch index (and its statistics): the shard, the place in it, the mixture's
position and every random draw are functions of that index, so a resumed run sees exactly the
batches an uninterrupted one would (with the same seed, world size and batch size; after a change of
either size it continues from the same fraction of the stream). Because batches do not depend on each
other, `num_workers` background processes can prepare them (torch's DataLoader), in order, without
changing what the trainer sees; each keeps its own few shards.

A rank whose share of the datasets is small enough to be read many times (at most
`CACHE_MAX_RECORDS` records, as fine-tuning sets like VQA-RAD or SLAKE are) keeps its encoded samples
(token ids, positions, image patches) in memory, least recently used first out, up to
`$MEDMO_ENCODED_CACHE_MIB` MiB per loader process (default 512; 0 turns it off): from its second
pass it no longer decodes images or tokenises, which on a CPU is a quarter of a tiny model's step. A
sample is a pure function of its record and the stage's settings, so what the trainer sees does not
change. Larger shares are streamed as above and keep nothing.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import count

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medmo_trainer.config import ALL_TASKS, DatasetSpec, Hyperparameters
from medmo_trainer.inputs.encode import EncodedSample, encode_sample, keep_vision_in_graph, num_tokens, pack, pad
from medmo_trainer.data.records import (
    DatasetUnavailableError,
    MalformedRecordError,
    RawRecord,
    load_images,
    validate,
)
from medmo_trainer.data.shards import DatasetSource, open_dataset
from medmo_trainer.model.processor import VLProcessor

logger = logging.getLogger(__name__)

CHUNK = 1024
"""Positions whose dataset choices are drawn together."""

WORKERS_ENV = "MEDMO_DATA_WORKERS"
"""Default number of batch-preparing processes per rank when `build_train_loader` is given none."""

CACHE_ENV = "MEDMO_ENCODED_CACHE_MIB"
"""Memory for encoded samples per loader process, in MiB (0: none)."""
DEFAULT_CACHE_MIB = 512
CACHE_MAX_RECORDS = 8192
"""A rank with a larger share of records keeps no encoded samples (one pass, or few, over them)."""


class EncodedCache:
    """Encoded samples with their record ids (or a malformed record's reason and message) by record
    place, least recently used evicted first, holding at most `budget` bytes of tensors."""

    def __init__(self, budget: int):
        self.budget = budget
        self.used = 0
        self.entries: OrderedDict[tuple[int, int, int], tuple[object, int]] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: tuple[int, int, int]):
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return entry[0]

    def put(self, key: tuple[int, int, int], value) -> None:
        size = _size_of(value)
        if size > self.budget:
            return
        self.entries[key] = (value, size)
        self.used += size
        while self.used > self.budget:
            _, (_, evicted) = self.entries.popitem(last=False)
            self.used -= evicted

    def __getstate__(self) -> dict:  # worker processes start with an empty cache of the same budget
        return {"budget": self.budget}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["budget"])


def _size_of(value) -> int:
    sample = value[0]
    if isinstance(sample, str):  # a malformed record's reason
        return 256
    tensors = (sample.input_ids, sample.labels, sample.position_ids, sample.pixel_values,
               sample.image_grid_thw, sample.encoder_pixel_values)
    return 256 + sum(t.numel() * t.element_size() for t in tensors if t is not None)


def default_cache_bytes() -> int:
    return int(float(os.environ.get(CACHE_ENV, DEFAULT_CACHE_MIB)) * 2**20)


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
    """Maps a rank's stream positions to (dataset index, draw of that dataset); a pure function of the seed."""

    def __init__(self, weights: list[float], seed: int, rank: int):
        self.probabilities = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.seed, self.rank = seed, rank
        self._choices: dict[int, np.ndarray] = {}
        self._draws_before: list[np.ndarray] = [np.zeros(len(weights), dtype=np.int64)]

    def locate(self, position: int) -> tuple[int, int]:
        """The dataset read at a position, and how many draws of it came before."""
        chunk, offset = divmod(position, CHUNK)
        choices = self._chunk_choices(chunk)
        dataset = int(choices[offset])
        draw = int(self._draws_before_chunk(chunk)[dataset]) + int(np.count_nonzero(choices[:offset] == dataset))
        return dataset, draw

    def _chunk_choices(self, chunk: int) -> np.ndarray:
        if chunk not in self._choices:
            if len(self._choices) > 8:
                self._choices.clear()
            rng = np.random.default_rng([self.seed, 0, self.rank, chunk])
            self._choices[chunk] = rng.choice(len(self.probabilities), size=CHUNK, p=self.probabilities)
        return self._choices[chunk]

    def _draws_before_chunk(self, chunk: int) -> np.ndarray:
        """Draws of each dataset in chunks 0 .. chunk-1 (prefix sums, extended on demand)."""
        while len(self._draws_before) <= chunk:
            done = len(self._draws_before) - 1
            counts = np.bincount(self._chunk_choices(done), minlength=len(self.probabilities))
            self._draws_before.append(self._draws_before[-1] + counts)
        return self._draws_before[chunk]


class ShareOrder:
    """Maps the draws of one dataset by one rank to (shard, place among the shard's kept records)."""

    def __init__(self, shard_sizes: list[int], seed: int, dataset: int, rank: int, world_size: int):
        self.sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.seed, self.dataset = seed, dataset
        total = int(self.sizes.sum())
        if total >= world_size:
            self.start = rank * total // world_size
            self.length = (rank + 1) * total // world_size - self.start
        else:  # fewer records than ranks: each rank reads one, some the same
            self.start, self.length = rank % total, 1
        self._passes: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._record_orders: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def locate(self, draw: int) -> tuple[int, int, int | None]:
        """The shard and place of a draw, and the shard this rank reads after it (None at a pass's end)."""
        epoch, offset = divmod(draw, self.length)
        shard_order, ends = self._pass(epoch)
        place = self.start + offset
        at = int(np.searchsorted(ends, place, side="right"))
        shard = int(shard_order[at])
        in_shard = place - (int(ends[at - 1]) if at else 0)
        following = None
        if ends[at] < self.start + self.length:  # the share goes on in the shard holding place ends[at]
            following = int(shard_order[np.searchsorted(ends, ends[at], side="right")])
        return shard, int(self._record_order(epoch, shard)[in_shard]), following

    def _pass(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The shards in this pass's order, and the cumulative record counts at their ends."""
        if epoch not in self._passes:
            if len(self._passes) >= 2:
                self._passes.popitem(last=False)
            order = np.random.default_rng([self.seed, 1, self.dataset, epoch]).permutation(len(self.sizes))
            self._passes[epoch] = (order, np.cumsum(self.sizes[order]))
        return self._passes[epoch]

    def _record_order(self, epoch: int, shard: int) -> np.ndarray:
        key = (epoch, shard)
        if key not in self._record_orders:
            if len(self._record_orders) >= 4:
                self._record_orders.popitem(last=False)
            rng = np.random.default_rng([self.seed, 2, self.dataset, epoch, shard])
            self._record_orders[key] = rng.permutation(int(self.sizes[shard]))
        return self._record_orders[key]


class ShardCache:
    """The kept records of the few shards a process reads now, and of the next one, read ahead.

    Holds at most `capacity` shards (least recently used leave first); one background thread reads
    ahead, so a rank waits for a shard only at the start. Made afresh in each worker process.
    """

    def __init__(self, sources: list[DatasetSource], tasks: list[frozenset[str]], capacity: int):
        self.sources, self.tasks, self.capacity = sources, tasks, capacity
        self._shards: OrderedDict[tuple[int, int], Future] = OrderedDict()
        self._reader: ThreadPoolExecutor | None = None

    def records(self, dataset: int, shard: int, following: int | None) -> list[RawRecord]:
        """The kept records of a shard (reading `following` of the same dataset ahead)."""
        wanted = self._request((dataset, shard))
        if following is not None:
            self._request((dataset, following))
        return wanted.result()

    def _request(self, key: tuple[int, int]) -> Future:
        if key in self._shards:
            self._shards.move_to_end(key)
            return self._shards[key]
        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="medmo-shards")
        dataset, shard = key
        self._shards[key] = self._reader.submit(self.sources[dataset].read, shard, self.tasks[dataset])
        while len(self._shards) > self.capacity:
            self._shards.popitem(last=False)
        return self._shards[key]

    def __getstate__(self) -> dict:  # worker processes start with no shard and their own thread
        return {"sources": self.sources, "tasks": self.tasks, "capacity": self.capacity}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["sources"], state["tasks"], state["capacity"])


@dataclass
class PreparedBatch:
    """A batch ready for the model (None when every record of its positions was malformed), with the
    statistics of making it and the ids of its records."""

    batch: dict[str, torch.Tensor] | None
    stats: LoaderStats
    record_ids: list[str]


class BatchSource(Dataset):
    """Batch index -> PreparedBatch for one rank; picklable, so DataLoader workers can run it."""

    def __init__(self, specs: list[DatasetSpec], sources: list[DatasetSource], processor: VLProcessor,
                 hp: Hyperparameters, *, rank: int, world_size: int, seed: int):
        self.specs = specs
        self.processor = processor
        self.hp = hp
        tasks = [frozenset(spec.tasks or ALL_TASKS) for spec in specs]
        self.sizes = [[shard.kept(keep) for shard in source.shards] for source, keep in zip(sources, tasks)]
        self.stream = MixtureStream([s.weight for s in specs], seed, rank)
        self.orders = [ShareOrder(sizes, seed, d, rank, world_size) for d, sizes in enumerate(self.sizes)]
        # the shard in use and the one read ahead per dataset, and one more for a batch at a shard's edge
        self.shards = ShardCache(sources, tasks, capacity=2 * len(specs) + 1)
        share = sum(map(sum, self.sizes)) // world_size
        self.encoded = EncodedCache(default_cache_bytes() if share <= CACHE_MAX_RECORDS else 0)

    def __getitem__(self, index: int) -> PreparedBatch:
        size = self.hp.per_device_batch_size
        stats = LoaderStats()
        samples: list[EncodedSample] = []
        ids: list[str] = []
        for slot in range(index * size, (index + 1) * size):
            dataset, draw = self.stream.locate(slot)
            shard, place, following = self.orders[dataset].locate(draw)
            stats.records_read += 1
            try:
                sample, record_id = self._encoded(dataset, shard, place, following)
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
        samples = keep_vision_in_graph(samples, self.processor, self.hp.image_size)
        if self.hp.packing:
            batch = pack(samples, self.processor.image_token_id)
        else:
            batch = pad(samples, self.processor.image_token_id, self.processor.tokenizer.pad_token_id)
        stats.tokens = num_tokens(batch)
        return PreparedBatch(batch, stats, ids)

    def __len__(self) -> int:  # infinite in truth; DataLoader only needs the method to exist
        return 2**62

    def _encoded(self, dataset: int, shard: int, place: int, following: int | None) -> tuple[EncodedSample, str]:
        key = (dataset, shard, place)
        cached = self.encoded.get(key)
        if cached is None:
            try:
                cached = self._encode(self.shards.records(dataset, shard, following)[place])
            except MalformedRecordError as error:
                # its reason and message only: a stored exception would keep the frames of its traceback
                cached = (error.reason, str(error).removeprefix(f"{error.reason}: "))
            self.encoded.put(key, cached)
        if isinstance(cached[0], str):
            raise MalformedRecordError(*cached)
        return cached

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
        sources = [open_dataset(spec.uri, spec.columns, spec.tasks) for spec in datasets]
        for spec, source in zip(datasets, sources):
            if not sum(shard.kept(frozenset(spec.tasks or ALL_TASKS)) for shard in source.shards):
                raise DatasetUnavailableError(spec.uri, f"no record of tasks {spec.tasks or 'any'}")
        self.source = BatchSource(datasets, sources, processor, hp, rank=rank, world_size=world_size, seed=seed)
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
        return sum(sum(sizes) for sizes in self.source.sizes)

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
